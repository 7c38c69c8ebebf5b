import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// The server side of a resume connection (a pool connection whose opening proof says `pool resume`),
/// behind its seal or TLS: reads the client's request, finds the relay it names and checks the request's
/// proof with that relay's key, answers with its own count and hands the connection to the relay
/// (`ResumableStream.attach`). Anything wrong gets the `unknown` answer and a close. The channel must have
/// `autoRead` off.
final class ServerResumeOpeningHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private var nonce: [UInt8]?
    private var received = ByteBuffer()
    private var done = false
    private var timer: Scheduled<Void>?
    private let relays: ResumableRelays
    private let timeout: TimeAmount

    /// Makes the handler; the client has `timeout` to send its request.
    init(relays: ResumableRelays, timeout: TimeAmount) {
        self.relays = relays
        self.timeout = timeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: self.timeout) { channel.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let authenticated = event as? V2PoolAuthenticated {
            self.nonce = authenticated.nonce
            context.read()
            return
        }
        if case ChannelEvent.inputClosed = event, !self.done {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.done else {
            context.fireChannelRead(data)
            return
        }
        var buffer = self.unwrapInboundIn(data)
        self.received.writeBuffer(&buffer)
        guard let nonce = self.nonce, let request = self.received.readBytes(length: V2Resume.requestLength) else {
            return
        }
        self.done = true
        self.resume(request, nonce: nonce, context: context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !self.done { context.read() }
    }

    private func resume(_ request: [UInt8], nonce: [UInt8], context: ChannelHandlerContext) {
        let peer = context.channel.peerDescription
        guard let streamID = V2ResumeTicket.streamID(ofRequest: request), let handle = self.relays.relay(streamID),
            handle.eventLoop.inEventLoop
        else {
            self.relays.logger.info("resume refused: no such relay (it ended or its grace period passed)")
            self.refuse(context: context)
            return
        }
        guard let peerReceived = handle.ticket.verifyRequest(request, nonce: nonce) else {
            self.relays.tunnelMetrics.authenticationFailures.increment()
            self.relays.logger.warning("resume refused: its proof is not valid", metadata: ["np.peer": "\(peer)"])
            self.refuse(context: context)
            return
        }
        let stream = handle.stream.value
        guard let ownReceived = stream.prepareResume() else {
            self.refuse(context: context)
            return
        }
        var reply = context.channel.allocator.buffer(capacity: V2Resume.replyLength)
        reply.writeBytes(handle.ticket.reply(nonce: nonce, count: ownReceived))
        context.write(NIOAny(reply), promise: nil)
        let rest = self.received
        self.received = ByteBuffer()
        if !hand(context: context, to: stream, peerReceived: peerReceived, rest: rest) {
            context.close(promise: nil)
        }
    }

    private func refuse(context: ChannelHandlerContext) {
        self.relays.metrics.failedRefused.increment()
        var reply = context.channel.allocator.buffer(capacity: V2Resume.replyLength)
        reply.writeBytes(V2ResumeTicket.unknownReply)
        let channel = context.channel
        context.writeAndFlush(NIOAny(reply)).whenComplete { _ in channel.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension ServerResumeOpeningHandler: Sendable {}

/// The client side of a resume connection, behind its seal or TLS: once the opening is answered, sends the
/// request for its relay (the relay's ID, its count, the proof), reads the server's answer and hands the
/// connection to the relay, or tells the relay that the server no longer has it. `done` completes when
/// the relay goes on, and fails otherwise. The channel must have `autoRead` off.
final class ClientResumeOpeningHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let handle: ResumableStream.Handle
    private let nonce: V2PoolNonce
    private let done: EventLoopPromise<Void>
    private let timeout: TimeAmount
    private var received = ByteBuffer()
    private var finished = false
    private var requested = false
    private var timer: Scheduled<Void>?
    private var context: ChannelHandlerContext?

    init(handle: ResumableStream.Handle, nonce: V2PoolNonce, done: EventLoopPromise<Void>, timeout: TimeAmount) {
        self.handle = handle
        self.nonce = nonce
        self.done = done
        self.timeout = timeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: self.timeout) { channel.close(promise: nil) }
        // The authentication handler calls this once it has answered the opening (and added the seal or TLS).
        self.nonce.onAnswered = { [weak self] in self?.sendRequest() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.timer?.cancel()
        self.timer = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        // The server's nonce comes first (the authentication handler reads until it has it).
        context.read()
    }

    private func sendRequest() {
        guard let context = self.context, !self.requested else { return }
        self.requested = true
        let stream = self.handle.stream.value
        guard let count = stream.prepareResume() else {
            self.fail(context: context, NodePassError(.protocolViolation, "the relay ended"))
            return
        }
        var request = context.channel.allocator.buffer(capacity: V2Resume.requestLength)
        request.writeBytes(self.handle.ticket.request(nonce: self.nonce.bytes, count: count))
        context.writeAndFlush(NIOAny(request), promise: nil)
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.finished else {
            context.fireChannelRead(data)
            return
        }
        var buffer = self.unwrapInboundIn(data)
        self.received.writeBuffer(&buffer)
        guard self.requested, let reply = self.received.readBytes(length: V2Resume.replyLength) else { return }
        self.finished = true
        let stream = self.handle.stream.value
        switch self.handle.ticket.verifyReply(reply, nonce: self.nonce.bytes) {
        case .some((.resumed, let peerReceived)):
            let rest = self.received
            self.received = ByteBuffer()
            guard hand(context: context, to: stream, peerReceived: peerReceived, rest: rest) else {
                self.fail(context: context, NodePassError(.protocolViolation, "the relay ended"))
                return
            }
            self.done.succeed()
        case .some((.unknown, _)):
            stream.resumeRefused()
            self.fail(context: context, NodePassError(.protocolViolation, "the server no longer has the relay"))
        case .none:
            self.fail(context: context, NodePassError(.protocolViolation, "the server's resume answer is not valid"))
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.requested && !self.finished { context.read() }
    }

    private func fail(context: ChannelHandlerContext, _ error: any Error) {
        self.finished = true
        self.done.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        if !self.finished {
            self.finished = true
            self.done.fail(ChannelError.ioOnClosedChannel)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension ClientResumeOpeningHandler: Sendable {}

/// Hands the resume connection of `context` to `stream` once the exchange succeeded: a `ResumePoolHandler`
/// right behind the opening handler, the relay attached to it (`peerReceived`: the other side's count),
/// the bytes that came after the exchange (`rest`) passed on, and the opening handler removed. False when
/// the relay cannot take it (it ended, or the count is impossible).
private func hand(
    context: ChannelHandlerContext,
    to stream: ResumableStream,
    peerReceived: UInt64,
    rest: ByteBuffer
) -> Bool {
    let poolHandler = ResumePoolHandler(stream: stream)
    do {
        try context.pipeline.syncOperations.addHandler(poolHandler, position: .after(context.handler))
    } catch {
        return false
    }
    guard stream.attach(poolHandler, peerReceived: peerReceived) else { return false }
    if rest.readableBytes > 0 {
        context.fireChannelRead(NIOAny(rest))
        context.fireChannelReadComplete()
    }
    context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    return true
}
