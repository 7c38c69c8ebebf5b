import Logging
import NIOCore
import NodePassCore

/// Seals and opens a sealed pool connection (`V2PoolSeal`, `nodepass/2.2` with `tls=1`), where TLS would
/// otherwise sit: what is written goes out as records, what arrives is opened and passed on as plain bytes.
///
/// A direction ends with the empty record: `close(mode: .output)` and a full close write it first, and
/// reading it passes on `ChannelEvent.inputClosed`. A connection whose input ends without it (cut, or a
/// peer that died) is closed, never passed on as a clean end; so is one with a record that does not open
/// (logged as a warning with the peer's address). Either way `PoolConnectionBroken` goes up the pipeline
/// first, so that the relay resets its other half instead of ending it cleanly.
final class SealedRecordHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var sealer: V2RecordSealer
    private var opener: V2RecordOpener
    /// The start of a record that is not whole yet (never more than that record).
    private var partial = ByteBuffer()
    /// Small writes without a promise (a resumable relay's frame headers and acks), held until the next
    /// write or flush and sealed at the start of its first record instead of in records of their own.
    private var held = ByteBuffer()
    private var inputEnded = false
    private var outputEnded = false
    private var failed = false
    private let logger: Logger
    /// The plaintext of each record this side seals, as TLS's largest record. A stalled relay holds at most
    /// one opened record and the start of the next (31 KiB per relay measured, against 58 KiB with 32 KiB
    /// records); 32 KiB would save about a fifth of the sealing and opening cost (swift-crypto's fixed cost
    /// per record), 64 KiB nothing more. Each record gets its own buffer: a buffer for a whole 64 KiB read is
    /// large enough for glibc to hand it back to the kernel on every free (`MemoryTrimmer.keepHeapTops`).
    static let recordSize = 16 * 1024
    /// The most bytes held for the next record.
    static let holdLimit = 64

    /// The client's end (`isClient`) or the server's of a connection sealed with `keys`.
    init(keys: V2PoolSealKeys, isClient: Bool, logger: Logger) {
        self.logger = logger
        self.sealer = V2RecordSealer(key: isClient ? keys.clientToServer : keys.serverToClient)
        self.opener = V2RecordOpener(key: isClient ? keys.serverToClient : keys.clientToServer)
    }

    // MARK: inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = self.unwrapInboundIn(data)
        // First the rest of a record begun in an earlier read, taken byte-exact so that the kept buffer
        // never holds more than that record.
        while !self.failed, self.partial.readableBytes > 0, buffer.readableBytes > 0 {
            let missing =
                V2RecordOpener.missingBytes(in: self.partial)
                ?? (V2PoolSeal.headerLength - self.partial.readableBytes)
            guard var piece = buffer.readSlice(length: min(missing, buffer.readableBytes)) else { return }
            self.partial.writeBuffer(&piece)
            if V2RecordOpener.missingBytes(in: self.partial) == 0 {
                var record = self.partial
                self.partial = ByteBuffer()
                self.openRecords(in: &record, context: context)
            }
        }
        guard !self.failed, buffer.readableBytes > 0 else { return }
        // Whole records open where they arrived; only a record's unfinished start is kept.
        self.openRecords(in: &buffer, context: context)
        if !self.failed, buffer.readableBytes > 0 {
            let needed = V2RecordOpener.missingBytes(in: buffer) ?? V2PoolSeal.headerLength
            self.partial = context.channel.allocator.buffer(capacity: buffer.readableBytes + needed)
            self.partial.writeBuffer(&buffer)
        }
    }

    private func openRecords(in buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        while !self.failed, buffer.readableBytes > 0 {
            guard !self.inputEnded else {
                self.fail(
                    context: context,
                    NodePassError(.protocolViolation, "bytes followed the end of a sealed pool connection")
                )
                return
            }
            do {
                switch try self.opener.next(from: &buffer) {
                case .bytes(let bytes)?:
                    context.fireChannelRead(self.wrapInboundOut(bytes))
                case .end?:
                    self.inputEnded = true
                    context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
                case nil:
                    return
                }
            } catch {
                self.fail(context: context, error)
                return
            }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard case ChannelEvent.inputClosed = event else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        // The end was passed on with the empty record; without it, the stream was cut.
        if !self.inputEnded && !self.failed {
            self.failed = true
            context.fireUserInboundEventTriggered(PoolConnectionBroken())
            context.close(promise: nil)
        }
    }

    private func fail(context: ChannelHandlerContext, _ error: any Error) {
        self.failed = true
        self.logger.warning(
            "sealed pool connection closed: it broke the protocol",
            metadata: [
                "np.peer": "\(context.channel.peerDescription)", "np.error": "\(UserFacingError.describe(error))",
            ]
        )
        context.fireUserInboundEventTriggered(PoolConnectionBroken())
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }

    // MARK: outbound

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        var rest = self.unwrapOutboundIn(data)
        // An empty write carries no record (it only orders a callback after the writes before it).
        guard rest.readableBytes > 0 else {
            self.sealHeld(context: context)
            context.write(data, promise: promise)
            return
        }
        guard !self.outputEnded else {
            promise?.fail(ChannelError.outputClosed)
            return
        }
        if promise == nil, self.held.readableBytes + rest.readableBytes <= Self.holdLimit {
            if self.held.capacity == 0 { self.held = context.channel.allocator.buffer(capacity: Self.holdLimit) }
            self.held.writeBuffer(&rest)
            return
        }
        do {
            if self.held.readableBytes > 0 {
                // The held bytes and the start of this write make the first record (only that much is copied).
                let count = min(rest.readableBytes, Self.recordSize - self.held.readableBytes)
                var first = context.channel.allocator.buffer(capacity: self.held.readableBytes + count)
                first.writeBuffer(&self.held)
                self.held.clear()
                first.writeImmutableBuffer(rest.readSlice(length: count) ?? ByteBuffer())
                try self.seal(first, context: context, promise: rest.readableBytes == 0 ? promise : nil)
            }
            // One buffer per record: a buffer for a whole 64 KiB read would be as costly to allocate as a big
            // record.
            while let piece = rest.readSlice(length: min(rest.readableBytes, Self.recordSize)), piece.readableBytes > 0
            {
                try self.seal(piece, context: context, promise: rest.readableBytes == 0 ? promise : nil)
            }
        } catch {
            // Nothing was written with `promise`: sealing the record that carries it failed, or one before it.
            promise?.fail(error)
            self.fail(context: context, error)
        }
    }

    func flush(context: ChannelHandlerContext) {
        self.sealHeld(context: context)
        context.flush()
    }

    /// Seals `plaintext` as one record and writes it with `promise`; throws (writing nothing) when it could not.
    private func seal(
        _ plaintext: ByteBuffer,
        context: ChannelHandlerContext,
        promise: EventLoopPromise<Void>?
    ) throws {
        var sealed = context.channel.allocator.buffer(
            capacity: plaintext.readableBytes + V2PoolSeal.headerLength + V2PoolSeal.overhead
        )
        try plaintext.withUnsafeReadableBytes { try self.sealer.seal($0, into: &sealed) }
        context.write(self.wrapOutboundOut(sealed), promise: promise)
    }

    /// Writes the held bytes as a record of their own.
    private func sealHeld(context: ChannelHandlerContext) {
        guard self.held.readableBytes > 0, !self.failed else { return }
        let held = self.held
        self.held.clear()
        do {
            try self.seal(held, context: context, promise: nil)
        } catch {
            self.fail(context: context, error)
        }
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode != .input, let end = self.end(context: context) else {
            context.close(mode: mode, promise: promise)
            return
        }
        guard mode == .output else {
            // A full close does not wait: a peer that reads nothing must not hold the connection open.
            context.writeAndFlush(self.wrapOutboundOut(end), promise: nil)
            context.close(mode: mode, promise: promise)
            return
        }
        // A half-close waits for the empty record to be written (ordered after every earlier write).
        context.writeAndFlush(self.wrapOutboundOut(end)).assumeIsolated().whenComplete { _ in
            context.close(mode: .output, promise: promise)
        }
    }

    /// The empty record, once, unless the connection failed (a peer that broke the protocol gets no clean
    /// end).
    private func end(context: ChannelHandlerContext) -> ByteBuffer? {
        guard !self.outputEnded, !self.failed, context.channel.isActive else { return nil }
        self.sealHeld(context: context)
        self.outputEnded = true
        var end = context.channel.allocator.buffer(capacity: V2PoolSeal.headerLength + V2PoolSeal.overhead)
        do {
            try self.sealer.sealEnd(into: &end)
        } catch {
            return nil
        }
        return end
    }
}

@available(*, unavailable)
extension SealedRecordHandler: Sendable {}

/// A sealed pool connection was cut or broke the protocol: the bytes it carried so far may be a stream's
/// beginning only, so its relay's other half must not end cleanly (`GlueHandler` resets it).
struct PoolConnectionBroken: Sendable {}
