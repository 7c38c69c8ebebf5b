import CoreMetrics
import Logging
import NIOCore
import NIOSSL
import NodePassCore

/// What every channel of one tunnel process is made of, in one place: control channels (TLS, the decoder
/// of the protocol, the control handler), pool connections (v2's authentication, the pool handler, the
/// relay end), users' and the target's connections (the relay end). The services decide when a channel
/// is made and what becomes of it; these functions, called from its initializer on its event loop, decide
/// which handlers it has and in which order.
///
/// Every `GlueHandler` is made here as well (`glue(_:)`), so that the two roles and both processes relay
/// alike. A class: it is captured by the initializer of every connection.
final class Pipelines: Sendable {
    /// The channel an end of a relay reads from.
    enum End {
        /// A user's connection (what it reads goes towards the service).
        case user
        /// The target's connection (what it reads goes back to the user).
        case target
        /// A pool connection on the side with the users (it reads what the service sent back).
        case poolWithUsers
        /// A pool connection on the side that dials (it reads what the user sent).
        case poolThatDials
    }

    /// Every relay of the tunnel, wherever it runs (SwiftNIO or the kernel).
    let sessions: SessionTracker
    let metrics: TunnelMetrics
    let logger: Logger
    let configuration: Configuration
    /// Every `GlueHandler`'s: once one side of a relay has gone, the bytes queued for the other may stay
    /// unmoved for 30 s, and never longer than the relay may stay idle.
    private let flushTimeout: TimeAmount
    /// What every relay of the process holds in user space, bounded by BUFFER_BUDGET.
    private let budget: RelayBudget
    /// The tunnel's resumable relays (v2 sessions that resume).
    let resumes: ResumableRelays

    /// Makes the pipelines of one tunnel (the client's when `isClient`), with its sessions bounded by
    /// SEMAPHORE_LIMIT.
    init(metrics: TunnelMetrics, logger: Logger, configuration: Configuration, isClient: Bool) {
        self.sessions = SessionTracker(limit: configuration.semaphoreLimit)
        self.metrics = metrics
        self.logger = logger
        self.configuration = configuration
        self.flushTimeout = min(
            GlueHandler.defaultFlushTimeout,
            configuration.idleTimeout ?? GlueHandler.defaultFlushTimeout
        )
        self.budget = RelayBudget.shared(limit: configuration.bufferBudget, logger: logger)
        self.resumes = ResumableRelays(
            configuration: configuration,
            metrics: metrics,
            budget: self.budget,
            logger: logger,
            isClient: isClient
        )
    }

    /// The unconnected `GlueHandler` of `end`; it may move to the kernel unless `NODEPASS_SPLICE=0`.
    func glue(_ end: End) -> GlueHandler {
        let bytes: Counter
        switch end {
        case .user, .poolThatDials: bytes = self.metrics.bytesUpstream
        case .target, .poolWithUsers: bytes = self.metrics.bytesDownstream
        }
        guard self.configuration.splice else {
            return GlueHandler(
                bytes: bytes,
                flushTimeout: self.flushTimeout,
                window: self.configuration.relayBuffer,
                budget: self.budget
            )
        }
        let setup: SpliceSetup
        switch end {
        case .user, .target:
            // The ends with a socket outside the tunnel keep IDLE_TIMEOUT, on both sides of the tunnel.
            let idleTimeout = self.configuration.idleTimeout
            setup = SpliceSetup(
                sessions: self.sessions,
                idleTimeout: idleTimeout,
                logger: self.logger,
                flushTimeout: self.flushTimeout
            )
        case .poolWithUsers, .poolThatDials:
            // The other half of the pair keeps the time of the move.
            setup = SpliceSetup(
                sessions: self.sessions,
                logger: self.logger,
                flushTimeout: self.flushTimeout,
                schedulesMove: false
            )
        }
        return GlueHandler(
            bytes: bytes,
            splice: setup,
            flushTimeout: self.flushTimeout,
            window: self.configuration.relayBuffer,
            budget: self.budget
        )
    }

    // MARK: control channels

    /// The decoder of a control channel: v2's frames, or v1's lines (a v1 client sends nothing after the
    /// handshake; what a stranger sends is split into bounded lines and dropped).
    private static func controlDecoder(isV2: Bool) -> any ChannelHandler {
        isV2 ? ByteToMessageHandler(V2FrameDecoder()) : ByteToMessageHandler(SignalLineDecoder())
    }

    /// A control channel the server accepted. `fingerprint` is the control certificate's (v2 binds its
    /// handshake to it); `poolPort` is announced (v1) or sent in the session's parameters (v2).
    func serverControl(
        _ channel: any Channel,
        tls: NIOSSLContext,
        protocol tunnelProtocol: ServerProtocol,
        fingerprint: [UInt8],
        poolPort: Int,
        delegate: any ServerControlDelegate,
        handshakes: ConnectionBound
    ) throws {
        SocketTuning.setUserTimeout(self.configuration.reportInterval * 3, on: channel)
        let version: ServerControlStateMachine.Version
        var parameters = V2SessionParameters(
            mode: .reverse,
            tls: .plain,
            poolPort: poolPort,
            heartbeatMilliseconds: UInt32(clamping: self.configuration.reportInterval.nanoseconds / 1_000_000),
            sessionID: [],
            dataFingerprint: []
        )
        switch tunnelProtocol {
        case .v1:
            version = .v1(poolPort: poolPort)
        case .v2(let v2):
            version = .v2(key: v2.key, fingerprint: fingerprint, transports: v2.transports, resume: v2.resume)
            (parameters.mode, parameters.tls, parameters.dataFingerprint) = (v2.mode, v2.tls, v2.dataFingerprint)
        }
        try channel.pipeline.syncOperations.addHandlers([
            NIOSSLServerHandler(context: tls),
            Self.controlDecoder(isV2: tunnelProtocol.isV2),
            ServerControlHandler(
                version: version,
                configuration: self.configuration,
                delegate: delegate,
                metrics: self.metrics,
                logger: self.logger,
                parameters: parameters,
                onHandshakeEnded: { handshakes.finish($0) }
            ),
        ])
    }

    /// The control channel the client dialled; `connected` completes when the server accepts it.
    func clientControl(
        _ channel: any Channel,
        tls: NIOSSLContext,
        protocol tunnelProtocol: ClientProtocol,
        pool: any ClientControlDelegate,
        connected: EventLoopPromise<Void>
    ) throws {
        SocketTuning.apply(to: channel)
        try channel.pipeline.syncOperations.addHandlers([
            try NIOSSLClientHandler(context: tls, serverHostname: nil),
            Self.controlDecoder(isV2: tunnelProtocol.isV2),
            ClientControlHandler(
                protocol: tunnelProtocol,
                pool: pool,
                configuration: self.configuration,
                connected: connected,
                handshakeDuration: self.metrics.handshakeDuration,
                logger: self.logger
            ),
        ])
    }

    // MARK: pool connections

    /// A v2 pool connection the server accepted, before it proves its session (`authentication`; a proven one
    /// moves to the relays' event loop as a new channel, set up by `serverPoolConnection`).
    func serverPoolOpening(_ channel: any Channel, authentication: ServerPoolAuthenticationHandler.Settings) throws {
        try SocketTuning.prepareRelay(channel)
        authentication.openings.admit(
            channel,
            logger: self.logger,
            evicted: "too many pool openings in progress; the oldest was closed"
        )
        try channel.pipeline.syncOperations.addHandler(ServerPoolAuthenticationHandler(settings: authentication))
    }

    /// A pool connection on the server: accepted (v1), or proven and moved (v2: `authenticated`, with `tls`
    /// after `tls=1`/`tls=2`, or sealed with `sealing`; it starts on `V2PoolAuthenticated`). `forward`: the
    /// server dials for it (forward mode), else it carries the server's users. `resume`: it resumes a relay
    /// (`ServerResumeOpeningHandler`) instead of joining the pool.
    func serverPoolConnection(
        _ channel: any Channel,
        tls: NIOSSLContext?,
        sealing: V2PoolSealKeys? = nil,
        authenticated: Bool,
        resume: Bool = false,
        forward: Bool,
        pool: any ServerPoolConnectionDelegate
    ) throws {
        try SocketTuning.prepareRelay(channel)
        if let sealing {
            try channel.pipeline.syncOperations.addHandler(
                SealedRecordHandler(keys: sealing, isClient: false, logger: self.logger)
            )
        } else if let tls {
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
        }
        if resume {
            try channel.pipeline.syncOperations.addHandler(
                ServerResumeOpeningHandler(relays: self.resumes, timeout: self.configuration.idReadTimeout)
            )
            return
        }
        let glue = self.glue(forward ? .poolThatDials : .poolWithUsers)
        let claimTimeout = self.configuration.poolWaitTimeout + self.configuration.dialTimeout
        try channel.pipeline.syncOperations.addHandlers([
            ServerPoolConnectionHandler(
                delegate: pool,
                glue: glue,
                waitsForAuthentication: authenticated,
                claimTimeout: forward ? claimTimeout : nil
            ),
            glue,
        ])
    }

    /// A pool connection the client dialled: v2 authenticates its opening with `v2` (nil in v1).
    /// `forward`: it carries the client's users, else the client dials for it.
    func clientPoolConnection(
        _ channel: any Channel,
        v2: V2PoolSettings?,
        forward: Bool,
        delegate: any ClientPoolConnectionDelegate
    ) throws {
        SocketTuning.apply(to: channel)
        try SocketTuning.prepareRelay(channel)
        var idReader = PoolIDReader.v1
        if let v2 {
            let sessionID = v2.sessionID
            let nonce = V2PoolNonce()
            try channel.pipeline.syncOperations.addHandler(
                ClientPoolAuthenticationHandler(settings: v2, nonce: nonce, logger: self.logger) {
                    delegate.poolCertificateMismatched($0)
                }
            )
            idReader = PoolIDReader(
                length: V2PoolOpening.serverMessageLength,
                parse: { opening in
                    V2PoolOpening.verifyServerMessage(
                        Array(opening.readableBytesView),
                        secret: v2.secret,
                        nonce: nonce.bytes
                    )
                },
                reply: { id in v2.secret.poolConfirmation(nonce: nonce.bytes, id: id) },
                ticket: v2.secret.resumesRelays
                    ? { id in V2ResumeTicket(secret: v2.secret, sessionID: sessionID, nonce: nonce.bytes, id: id) }
                    : nil
            )
        }
        let glue = self.glue(forward ? .poolWithUsers : .poolThatDials)
        try channel.pipeline.syncOperations.addHandlers([
            ClientPoolConnectionHandler(
                delegate: delegate,
                glue: glue,
                idReader: idReader,
                idReadTimeout: self.configuration.idReadTimeout,
                claimTimeout: self.configuration.poolWaitTimeout + self.configuration.dialTimeout
            ),
            glue,
        ])
    }

    /// A pool connection the client dialled to resume the relay `stream` (`v2`: the current session);
    /// `done` completes when the relay goes on over it.
    func clientResumeConnection(
        _ channel: any Channel,
        v2: V2PoolSettings,
        stream: ResumableStream.Handle,
        done: EventLoopPromise<Void>
    ) throws {
        SocketTuning.apply(to: channel)
        try SocketTuning.prepareRelay(channel)
        let nonce = V2PoolNonce()
        try channel.pipeline.syncOperations.addHandlers([
            ClientPoolAuthenticationHandler(settings: v2, nonce: nonce, resume: true, logger: self.logger) { _ in },
            ClientResumeOpeningHandler(
                handle: stream,
                nonce: nonce,
                done: done,
                timeout: self.configuration.idReadTimeout
            ),
        ])
    }

    // MARK: users and the target

    /// A user's connection (already counted against SEMAPHORE_LIMIT): `arrived` gets its relay end once
    /// it is active.
    func user(_ channel: any Channel, arrived: @escaping @Sendable (RelayEnd) -> Void) throws {
        try SocketTuning.prepareRelay(channel)
        try self.closeWhenIdle(channel, message: "idle user connection closed")
        let glue = self.glue(.user)
        try channel.pipeline.syncOperations.addHandlers([
            ChannelActiveHandler { arrived(RelayEnd(channel: $0, glue: glue)) },
            glue,
        ])
    }

    /// A connection dialled to the target; returns its relay end's handler.
    func target(_ channel: any Channel) throws -> GlueHandler {
        SocketTuning.apply(to: channel)
        try SocketTuning.prepareRelay(channel)
        try self.closeWhenIdle(channel, message: "idle target connection closed")
        let glue = self.glue(.target)
        try channel.pipeline.syncOperations.addHandler(glue)
        return glue
    }

    /// A connection dialled to the target for a resumable relay; returns its handler.
    func resumableTarget(_ channel: any Channel) throws -> ResumeLocalHandler {
        SocketTuning.apply(to: channel)
        try SocketTuning.prepareRelay(channel)
        try self.closeWhenIdle(channel, message: "idle target connection closed")
        let handler = ResumeLocalHandler()
        try channel.pipeline.syncOperations.addHandler(handler)
        return handler
    }

    /// With IDLE_TIMEOUT, closes `channel` (a user's or the target's connection) once nothing moved either
    /// way for that long; reads and completed writes both count as activity.
    private func closeWhenIdle(_ channel: any Channel, message: Logger.Message) throws {
        guard let idleTimeout = self.configuration.idleTimeout else { return }
        try IdleConnectionCloser.install(on: channel, after: idleTimeout, logger: self.logger, message: message)
    }

}
