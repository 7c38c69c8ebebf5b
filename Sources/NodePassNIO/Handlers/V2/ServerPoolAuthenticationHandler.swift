import CoreMetrics
import Logging
import NIOCore
import NIOSSL
import NodePassCore

/// The first handler of a v2 server pool connection: sends a fresh nonce, reads the client's session ID and
/// proof, and checks the proof before doing anything costly. On success it adds TLS after itself (with
/// `tls=1`/`tls=2`), fires `V2PoolAuthenticated` down the pipeline and passes everything through from then
/// on; on failure it logs the peer's address and closes. The channel must have `autoRead` off.
final class ServerPoolAuthenticationHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private enum State {
        case awaitingProof(nonce: [UInt8], received: ByteBuffer)
        case authenticated
        case failed
    }

    private var state: State
    private let secretForSession: @Sendable ([UInt8]) -> V2SessionSecret?
    private let tls: NIOSSLContext?
    private let timeout: TimeAmount
    private let metrics: TunnelMetrics
    private let logger: Logger
    private let onEnded: @Sendable (any Channel) -> Void
    private var timer: Scheduled<Void>?

    init(
        tls: NIOSSLContext?,
        timeout: TimeAmount,
        metrics: TunnelMetrics,
        logger: Logger,
        secretForSession: @escaping @Sendable ([UInt8]) -> V2SessionSecret?,
        onEnded: @escaping @Sendable (any Channel) -> Void
    ) {
        self.state = .awaitingProof(nonce: SecureRandom.bytes(V2PoolOpening.nonceLength), received: ByteBuffer())
        self.tls = tls
        self.timeout = timeout
        self.metrics = metrics
        self.logger = logger
        self.secretForSession = secretForSession
        self.onEnded = onEnded
    }

    func channelActive(context: ChannelHandlerContext) {
        guard case .awaitingProof(let nonce, _) = self.state else {
            context.fireChannelActive()
            return
        }
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: self.timeout) { channel.close(promise: nil) }
        var buffer = context.channel.allocator.buffer(capacity: nonce.count)
        buffer.writeBytes(nonce)
        context.writeAndFlush(NIOAny(buffer), promise: nil)
        context.fireChannelActive()
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .awaitingProof(let nonce, var received) = self.state else {
            if case .authenticated = self.state { context.fireChannelRead(data) }
            return
        }
        var buffer = self.unwrapInboundIn(data)
        received.writeBuffer(&buffer)
        guard received.readableBytes >= V2PoolOpening.clientMessageLength else {
            self.state = .awaitingProof(nonce: nonce, received: received)
            return
        }
        let message = received.readBytes(length: V2PoolOpening.clientMessageLength) ?? []
        guard let (sessionID, proof) = V2PoolOpening.splitClientMessage(message),
            let secret = self.secretForSession(sessionID),
            secret.isValidPoolClientProof(proof, nonce: nonce)
        else {
            self.fail(context: context)
            return
        }
        self.timer?.cancel()
        self.timer = nil
        self.state = .authenticated
        self.onEnded(context.channel)
        if let tls = self.tls {
            do {
                try context.pipeline.syncOperations.addHandler(
                    NIOSSLServerHandler(context: tls),
                    position: .after(self)
                )
            } catch {
                context.close(promise: nil)
                return
            }
        }
        context.fireUserInboundEventTriggered(V2PoolAuthenticated(sessionID: sessionID, nonce: nonce))
        if received.readableBytes > 0 {
            context.fireChannelRead(NIOAny(received))
            context.fireChannelReadComplete()
        }
    }

    private func fail(context: ChannelHandlerContext) {
        self.state = .failed
        self.timer?.cancel()
        self.timer = nil
        self.metrics.authenticationFailures.increment()
        self.logger.warning(
            "pool connection refused: authentication failed",
            metadata: ["np.peer": "\(context.channel.peerDescription)"]
        )
        self.onEnded(context.channel)
        context.close(promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        switch self.state {
        case .awaitingProof: context.read()
        case .authenticated: context.fireChannelReadComplete()
        case .failed: break
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .awaitingProof = self.state, case ChannelEvent.inputClosed = event {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        if case .awaitingProof = self.state {
            self.state = .failed
            self.onEnded(context.channel)
        }
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension ServerPoolAuthenticationHandler: Sendable {}
