import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// The only handler of a v2 server pool connection before it proves its session, on the process' opening
/// loop (`PoolOpeningLoop`, not a loop that relays, so that strangers who open pool connections by the
/// thousand cost the users a share of the CPU, not a place in the relays' queue): sends a fresh nonce, reads
/// the client's session ID and proof (and, for a sealed session, the client's nonce that follows it), and
/// checks the proof before doing anything costly. On success the connection moves to the relays' event
/// loop (`Settings.dataLoop`, `SocketMove`) as a new channel set up by `Settings.setUp` (the seal or TLS, the
/// pool handler), which gets `V2PoolAuthenticated` and then whatever followed the proof; on failure it logs
/// the peer's address and closes. The channel must have `autoRead` off.
final class ServerPoolAuthenticationHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private enum State {
        case awaitingProof(nonce: [UInt8], received: ByteBuffer)
        /// A sealed session's proof was valid: the client's nonce follows it.
        case awaitingClientNonce(V2PoolAuthenticated, V2SessionSecret, received: ByteBuffer)
        /// Proven: what the read in progress brings is kept until it ends, then the connection moves.
        case proven(V2PoolAuthenticated, received: ByteBuffer)
        case moved
        case failed
    }

    /// What every pool connection of one server is checked with; made once when the server starts.
    struct Settings: Sendable {
        /// The event loop of the relays, where a proven connection moves.
        var dataLoop: any EventLoop
        /// Sets up a proven connection's new channel on `dataLoop` (its TLS or seal, the pool handler).
        var setUp: @Sendable (any Channel, V2PoolAuthenticated) throws -> Void
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
        var buffer = self.unwrapInboundIn(data)
        if case .proven(let authenticated, var received) = self.state {
            self.state = .moved  // a placeholder while `received` grows, so that it is not copied
            received.writeBuffer(&buffer)
            self.state = .proven(authenticated, received: received)
            return
        }
        if case .awaitingClientNonce(let authenticated, let secret, var received) = self.state {
            received.writeBuffer(&buffer)
            self.clientNonceArrived(authenticated, secret, received: received, context: context)
            return
        }
        guard case .awaitingProof(let nonce, var received) = self.state else { return }
        received.writeBuffer(&buffer)
        guard received.readableBytes >= V2PoolOpening.clientMessageLength else {
            self.state = .awaitingProof(nonce: nonce, received: received)
            return
        }
        let message = received.readBytes(length: V2PoolOpening.clientMessageLength) ?? []
        guard let (sessionID, proof) = V2PoolOpening.splitClientMessage(message),
            let secret = self.settings.secretForSession(sessionID)
        else {
            self.fail(context: context)
            return
        }
        var authenticated = V2PoolAuthenticated(sessionID: sessionID, nonce: nonce)
        if !secret.isValidPoolClientProof(proof, nonce: nonce) {
            // A connection that resumes a relay proves the session under its own label.
            guard secret.resumesRelays, secret.isValidPoolResumeProof(proof, nonce: nonce) else {
                self.fail(context: context)
                return
            }
            authenticated.resume = true
        }
        guard secret.sealsPoolConnections else {
            self.proven(authenticated, received: received, context: context)
            return
        }
        self.clientNonceArrived(authenticated, secret, received: received, context: context)
    }

    /// A sealed session's connection is proven once the client's nonce, which its keys need, is there too.
    private func clientNonceArrived(
        _ authenticated: V2PoolAuthenticated,
        _ secret: V2SessionSecret,
        received: ByteBuffer,
        context: ChannelHandlerContext
    ) {
        var received = received
        guard let clientNonce = received.readBytes(length: V2PoolSeal.clientNonceLength) else {
            self.state = .awaitingClientNonce(authenticated, secret, received: received)
            return
        }
        var sealed = authenticated
        sealed.sealing = secret.poolSealKeys(serverNonce: authenticated.nonce, clientNonce: clientNonce)
        self.proven(sealed, received: received, context: context)
    }

    private func proven(_ authenticated: V2PoolAuthenticated, received: ByteBuffer, context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        self.state = .proven(authenticated, received: received)
        self.settings.openings.finish(context.channel)
    }

    /// Moves the proven connection once the read that brought the proof has ended (a read may deliver more
    /// than one buffer, and none may be left behind in this channel).
    private func move(context: ChannelHandlerContext, authenticated: V2PoolAuthenticated, received: ByteBuffer) {
        self.state = .moved
        let logger = self.settings.logger
        let peer = context.channel.peerDescription
        let setUp = self.settings.setUp
        let moved = SocketMove.move(context.channel, to: self.settings.dataLoop) { channel in
            try setUp(channel, authenticated)
            // First in the new pipeline: the proof's outcome and the bytes behind it go through before the
            // channel can read anything.
            try channel.pipeline.syncOperations.addHandler(
                ProvenOpening(authenticated: authenticated, received: received),
                position: .first
            )
        }
        moved.whenFailure { error in
            logger.warning(
                "proven pool connection lost on its way to the relays' event loop",
                metadata: ["np.peer": "\(peer)", "np.error": "\(UserFacingError.describe(error))"]
            )
        }
    }

    private var isAwaiting: Bool {
        switch self.state {
        case .awaitingProof, .awaitingClientNonce: true
        case .proven, .moved, .failed: false
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
        case .awaitingProof, .awaitingClientNonce: context.read()
        case .proven(let authenticated, let received):
            self.move(context: context, authenticated: authenticated, received: received)
        case .moved, .failed: break
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if self.isAwaiting, case ChannelEvent.inputClosed = event {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        if self.isAwaiting {
            self.state = .failed
            self.settings.openings.finish(context.channel)
        }
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension ServerPoolAuthenticationHandler: Sendable {}

/// The first handler of a proven pool connection's new channel: when the channel becomes active, passes
/// `V2PoolAuthenticated` and the bytes that followed the proof down the pipeline, then leaves it.
private final class ProvenOpening: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let authenticated: V2PoolAuthenticated
    private let received: ByteBuffer

    init(authenticated: V2PoolAuthenticated, received: ByteBuffer) {
        self.authenticated = authenticated
        self.received = received
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        context.fireUserInboundEventTriggered(self.authenticated)
        if self.received.readableBytes > 0 {
            context.fireChannelRead(NIOAny(self.received))
            context.fireChannelReadComplete()
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
