import Logging
import NIOCore
import NodePassCore

/// What a datagram carrier reports to its side, on the carrier's event loop.
protocol CarrierDelegate: AnyObject {
    /// A whole frame came on carrier `id`.
    func carrier(_ id: UInt64, received frame: DatagramFrame)
    /// A read of carrier `id` ended: flush what its frames produced.
    func carrierReadComplete(_ id: UInt64)
    /// Carrier `id` closed (or broke the protocol and is closing).
    func carrierClosed(_ id: UInt64)
}

/// Both ends of a datagram carrier (`nodepass/2.1`): a launched pool connection that carries datagram frames
/// both ways. It reads and parses frames for its delegate and writes the frames its side sends; it never
/// holds a datagram back for the connection (UDP has no back-pressure: a frame that finds the write buffer
/// full is refused, and its datagram dropped).
///
/// Put behind the pool connection's holder when the connection is launched; the channel has `autoRead` off,
/// and this handler always asks for the next read.
final class CarrierHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    let id: UInt64
    /// Strong: the delegate lets go of this handler when the carrier closes.
    private let delegate: any CarrierDelegate
    private let logger: Logger
    private var context: ChannelHandlerContext?
    /// The start of a frame that is not whole yet.
    private var partial: ByteBuffer?
    /// The frames written since the last flush, one after the other: one write per batch instead of one per
    /// datagram, and its storage is used again once the kernel has taken it.
    private var outbound = ByteBuffer()
    /// Whether the channel has writes that were not flushed.
    private var pendingFlush = false
    private var closed = false

    init(id: UInt64, delegate: any CarrierDelegate, logger: Logger) {
        self.id = id
        self.delegate = delegate
        self.logger = logger
    }

    /// The channel, while the handler is in its pipeline.
    var channel: (any Channel)? { self.context?.channel }

    /// The carrier's write buffer: a burst of datagrams fits in it while the kernel takes the previous one.
    static let writeBuffer = ChannelOptions.Types.WriteBufferWaterMark(low: 512 * 1024, high: 1024 * 1024)
    /// Frames are handed to the channel when this many bytes are batched, flushed or not: the channel's write
    /// buffer, which decides whether a datagram is taken, never misses more than this.
    static let batchLimit = 64 * 1024

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        try? context.channel.syncOptions?.setOption(.writeBufferWaterMark, value: Self.writeBuffer)
        if context.channel.isActive { context.read() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    // MARK: writing

    /// Writes a `datagram` frame (flushed by `flush()`); false when the carrier cannot take it now.
    func write(flow: UInt32, payload: ByteBuffer) -> Bool {
        // Reads are at most 65,536 bytes; the frame's length field holds the largest UDP payload, no more.
        guard let context, !self.closed, payload.readableBytes <= DatagramFrame.maximumPayload,
            context.channel.canTakeDatagram(),
            !self.closed  // the flush that `canTakeDatagram` may do can fail and close the carrier
        else { return false }
        DatagramFrame.writeDatagramHeader(flow: flow, length: payload.readableBytes, to: &self.outbound)
        self.outbound.writeImmutableBuffer(payload)
        if self.outbound.readableBytes >= Self.batchLimit { self.writeBatch(context: context) }
        return true
    }

    /// Writes an `end` frame (flushed by `flush()`).
    func writeEnd(flow: UInt32) {
        guard self.context != nil, !self.closed else { return }
        DatagramFrame.end(flow: flow).write(to: &self.outbound)
    }

    /// Sends what was written.
    func flush() {
        guard let context else { return }
        if self.outbound.readableBytes > 0 {
            context.write(NIOAny(self.outbound), promise: nil)
            self.pendingFlush = true
        }
        guard self.pendingFlush else { return }
        self.pendingFlush = false
        context.flush()
        // The kernel usually took the whole batch: the buffer is this handler's alone again and keeps its
        // storage. If the channel still holds it (a slow carrier), the next frames start a small buffer of
        // their own: each waiting write must cost about its bytes, which the write buffer's limit counts, not
        // the capacity of the largest batch so far.
        if self.outbound.modifyIfUniquelyOwned({ $0.clear() }) == nil {
            self.outbound = ByteBuffer()
        }
    }

    /// Hands a large batch to the channel before the flush, so that its write buffer counts it.
    private func writeBatch(context: ChannelHandlerContext) {
        context.write(NIOAny(self.outbound), promise: nil)
        self.pendingFlush = true
        // The channel holds those bytes until they are written: the next frames go to storage of their own.
        self.outbound = ByteBuffer()
    }

    /// Closes the carrier.
    func close() {
        self.context?.close(promise: nil)
    }

    // MARK: reading

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.closed else { return }
        var buffer = self.unwrapInboundIn(data)
        if var partial = self.partial {
            self.partial = nil
            partial.writeBuffer(&buffer)
            buffer = partial
        }
        do {
            while let frame = try DatagramFrame.read(from: &buffer) {
                self.delegate.carrier(self.id, received: frame)
                // The delegate may have closed the carrier.
                guard !self.closed else { return }
            }
        } catch {
            self.logger.warning(
                "datagram carrier closed: the peer broke the protocol",
                metadata: [
                    "np.error": "\(UserFacingError.describe(error))", "np.peer": "\(context.channel.peerDescription)",
                ]
            )
            self.closed = true
            context.close(promise: nil)
            return
        }
        if buffer.readableBytes > 0 {
            buffer.discardReadBytes()
            self.partial = buffer
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.delegate.carrierReadComplete(self.id)
        self.flush()
        if !self.closed { context.read() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            // The other side is done with the carrier.
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.closed = true
        self.partial = nil
        self.outbound = ByteBuffer()
        self.delegate.carrierClosed(self.id)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("datagram carrier error", metadata: ["np.error": "\(error)"])
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension CarrierHandler: Sendable {}

extension Channel {
    /// Whether a datagram may be written now. A full write buffer is first handed to the kernel; the datagram
    /// is dropped only if that does not help (UDP has no back-pressure, and none is made up). On the channel's
    /// event loop.
    func canTakeDatagram() -> Bool {
        if self.isWritable { return true }
        self.flush()
        return self.isWritable
    }
}
