import NIOCore
import NIOSSL
import NodePassCore

/// The handler of a resumable relay's local end (a user's or the target's connection): passes what it reads
/// and its end of input to the `ResumableStream`, and reads when the stream asks. The channel must have
/// `autoRead` off.
final class ResumeLocalHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    /// The relay, set when it starts.
    var stream: ResumableStream?
    private var context: ChannelHandlerContext?

    init() {}

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Asks the channel for the next read.
    func read() {
        self.context?.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.stream?.localRead(self.unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.stream?.localReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard case ChannelEvent.inputClosed = event else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        self.stream?.localEnded()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.stream?.localInactive()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.stream?.localFailed()
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension ResumeLocalHandler: Sendable {}

/// The handler of the pool connection that carries a resumable relay now: reads its frames
/// (`V2ResumeFrameDecoder`) for the `ResumableStream`, writes the stream's frames, and reports its end.
/// Once detached (a newer connection took over, or the relay ended) it reports nothing more. The channel
/// must have `autoRead` off.
final class ResumePoolHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private var stream: ResumableStream?
    private var context: ChannelHandlerContext?
    private var decoder = V2ResumeFrameDecoder()
    /// Each frame goes out as one buffer (its bytes copied after its header): TLS encrypts each write as
    /// records of its own, where a header written alone would be a record of three bytes. A plain connection
    /// sends the header and the bytes together anyway (one `writev`), and a sealed one seals small writes
    /// with the next write (`SealedRecordHandler`): neither copies.
    private var joinsFrames = false

    init(stream: ResumableStream) {
        self.stream = stream
    }

    var isInPipeline: Bool { self.context != nil }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// The stream no longer listens to this connection.
    func detach() {
        self.stream = nil
    }

    /// Sizes the connection's reads by `window`, and has the kernel end it when the path is dead: keepalive
    /// after 5 s of silence, and written bytes unacknowledged for 30 s (`SocketTuning.detectDeadPath`).
    func prepareChannel(window: RelayReadWindow) {
        guard let channel = self.context?.channel else { return }
        if let options = channel.syncOptions {
            try? options.setOption(.recvAllocator, value: RelayReadAllocator(window: window))
            try? options.setOption(.maxMessagesPerRead, value: 1)
        }
        SocketTuning.detectDeadPath(on: channel)
        self.joinsFrames = (try? channel.pipeline.syncOperations.context(handlerType: NIOSSLHandler.self)) != nil
    }

    func read() {
        self.context?.read()
    }

    func flush() {
        self.context?.flush()
    }

    func close() {
        self.context?.close(promise: nil)
    }

    /// Closes the connection once what was written to it is flushed.
    func flushAndClose() {
        guard let context = self.context else { return }
        let channel = context.channel
        context.writeAndFlush(NIOAny(ByteBuffer())).whenComplete { _ in channel.close(promise: nil) }
    }

    /// Writes `buffer` as data frames (at most `V2Resume.maximumDataLength` bytes each), after an ack of
    /// `ack` positions when given; `promise` completes with the last frame.
    func writeData(_ buffer: ByteBuffer, ack: UInt64? = nil, promise: EventLoopPromise<Void>?) {
        guard let context = self.context else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        var ack = ack
        var rest = buffer
        while rest.readableBytes > 0 {
            let count = min(rest.readableBytes, V2Resume.maximumDataLength)
            let slice = rest.readSlice(length: count) ?? ByteBuffer()
            let last = rest.readableBytes == 0
            let ackLength = ack == nil ? 0 : V2Resume.ackLength
            var header = context.channel.allocator.buffer(
                capacity: ackLength + V2Resume.dataHeaderLength + (self.joinsFrames ? count : 0)
            )
            if let count = ack {
                V2Resume.writeAck(count, to: &header)
                ack = nil
            }
            V2Resume.writeDataHeader(length: count, to: &header)
            if self.joinsFrames {
                header.writeImmutableBuffer(slice)
                context.write(NIOAny(header), promise: last ? promise : nil)
            } else {
                context.write(NIOAny(header), promise: nil)
                context.write(NIOAny(slice), promise: last ? promise : nil)
            }
        }
    }

    /// Writes a frame of one byte (`end`, `abort`).
    func writeFrame(type: UInt8) {
        guard let context = self.context else { return }
        var frame = context.channel.allocator.buffer(capacity: 1)
        frame.writeInteger(type)
        context.write(NIOAny(frame), promise: nil)
    }

    func writeAck(_ count: UInt64) {
        guard let context = self.context else { return }
        var frame = context.channel.allocator.buffer(capacity: V2Resume.ackLength)
        V2Resume.writeAck(count, to: &frame)
        context.write(NIOAny(frame), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let stream = self.stream else { return }
        self.decoder.feed(self.unwrapInboundIn(data))
        do {
            while self.stream != nil, let frame = try self.decoder.next() {
                stream.poolFrame(frame, from: self)
            }
        } catch {
            stream.poolViolated(error, from: self)
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.stream?.poolReadComplete(from: self)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            // The other side never half-closes a pool connection that still carries the relay.
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        let stream = self.stream
        self.stream = nil
        stream?.poolLost(self)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension ResumePoolHandler: Sendable {}
