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

    /// What every pool connection of one server is checked with; made once when the server starts.
    struct Settings: Sendable {
        /// The TLS that follows a proven opening (`tls=1`/`tls=2`); nil with `tls=0`.
        var tls: NIOSSLContext?
        /// How long a client has to send its session ID and proof.
        var timeout: TimeAmount
        /// The secret of a connected session, by its ID.
        var secretForSession: @Sendable ([UInt8]) -> V2SessionSecret?
        /// The openings not proven yet: each connection stays counted until it proves the key or fails.
        var openings: ConnectionBound
        var metrics: TunnelMetrics
        var logger: Logger
    }

    private var state: State
    private let settings: Settings
    private var timer: Scheduled<Void>?

    init(settings: Settings) {
        self.state = .awaitingProof(nonce: SecureRandom.bytes(V2PoolOpening.nonceLength), received: ByteBuffer())
        self.settings = settings
    }

    func channelActive(context: ChannelHandlerContext) {
        guard case .awaitingProof(let nonce, _) = self.state else {
            context.fireChannelActive()
            return
        }
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: self.settings.timeout) { channel.close(promise: nil) }
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
            let secret = self.settings.secretForSession(sessionID),
            secret.isValidPoolClientProof(proof, nonce: nonce)
        else {
            self.fail(context: context)
            return
        }
        self.timer?.cancel()
        self.timer = nil
        self.state = .authenticated
        self.settings.openings.finish(context.channel)
        if let tls = self.settings.tls {
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
        self.settings.metrics.authenticationFailures.increment()
        self.settings.logger.warning(
            "pool connection refused: authentication failed",
            metadata: ["np.peer": "\(context.channel.peerDescription)"]
        )
        self.settings.openings.finish(context.channel)
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
            self.settings.openings.finish(context.channel)
        }
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension ServerPoolAuthenticationHandler: Sendable {}
