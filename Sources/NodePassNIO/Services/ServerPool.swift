import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// The server's pool: the clients' control channels and the admission of their pool connections, which it
/// hands to its role: the `Launcher` in reverse mode (users connect here), the `TargetDialer` in forward mode
/// (clients launch, the server dials TARGET).
///
/// Called from every event loop; the sessions are a `ServerSessionsStateMachine` under a lock. v1 has one
/// client at a time (a newer one replaces it); v2 has up to `maximumClients`, each owning its idle pool
/// connections.
final class ServerPool: ServerPoolConnectionDelegate, ServerControlDelegate, PoolConnectionOwners {
    /// A client's control channel and the writer of its launches.
    struct Control: Sendable {
        var channel: any Channel
        var signals: SignalWriter
        /// The session carries UDP (`nodepass/2.1`, UDP on).
        var datagrams = false
    }

    /// The most v2 clients served at once.
    static let maximumClients = 64

    private let sessions: Locked<ServerSessionsStateMachine<Control>>
    private let configuration: Configuration
    private let logger: Logger
    private let metrics: TunnelMetrics
    /// What the pool connections are for; set once by `serve`, before any client connects.
    private let role = Locked<(any PoolConnectionRole)?>(nil)
    /// The live resumable relays, whose first pool connection's ID no new pool connection takes.
    private let resumes: ResumableRelays?

    init(configuration: Configuration, metrics: TunnelMetrics, logger: Logger, resumes: ResumableRelays? = nil) {
        self.resumes = resumes
        self.configuration = configuration
        self.metrics = metrics
        self.logger = logger
        self.sessions = Locked(ServerSessionsStateMachine(maximumClients: Self.maximumClients))
    }

    /// Reverse mode: users connect to this side, which launches. Returns the launcher to give them to.
    func serveReverse() -> Launcher {
        let launcher = Launcher(
            maximumIdle: self.configuration.maxPoolCapacity,
            waitTimeout: self.configuration.poolWaitTimeout,
            owners: self,
            metrics: self.metrics,
            idleGauge: self.metrics.poolIdle,
            logger: self.logger,
            resumes: self.resumes
        )
        self.role.withLock { $0 = launcher }
        return launcher
    }

    /// Forward mode: clients launch, and the server dials `target`, with channels as `pipelines` makes them.
    func serveForward(target: HostPort, pipelines: Pipelines) {
        let dialer = TargetDialer(
            target: target,
            // Each client keeps up to MAX_POOL_CAPACITY idle connections of its own.
            maximumIdle: self.configuration.maxPoolCapacity * Self.maximumClients,
            owners: self,
            pipelines: pipelines,
            idleGauge: self.metrics.poolIdle
        )
        self.role.withLock { $0 = dialer }
    }

    private var currentRole: (any PoolConnectionRole)? { self.role.withLock { $0 } }

    var idleCount: Int { self.currentRole?.idleCount ?? 0 }
    /// The number of clients connected.
    var clientCount: Int { self.sessions.withLock { $0.count } }

    // MARK: control channels

    /// A v1 client finished its TLS handshake: it becomes the client; a previous one is closed.
    func controlConnected(_ channel: any Channel) -> SessionAdmission {
        let control = Control(channel: channel, signals: SignalWriter(channel: channel, isV2: false))
        let connected = self.sessions.withLock {
            $0.v1ClientConnected(control, peerIP: Self.normalizedIP(channel.remoteAddress))
        }
        guard let (_, replaced, isReconnect) = connected else { return .closing }
        if isReconnect { self.metrics.reconnects.increment() }
        for previous in replaced {
            self.logger.warning(
                "control connection replaced by a newer client",
                metadata: ["np.peer": "\(channel.peerDescription)"]
            )
            previous.control.channel.close(promise: nil)
            self.currentRole?.ownerLost(previous.owner)
        }
        return .admitted
    }

    func v2SessionStarted(
        _ channel: any Channel,
        sessionID: [UInt8],
        secret: V2SessionSecret,
        datagrams: Bool
    ) -> SessionAdmission {
        let signals = SignalWriter(channel: channel, isV2: true)
        let control = Control(channel: channel, signals: signals, datagrams: datagrams)
        let (started, closing) = self.sessions.withLock { sessions in
            let started = sessions.v2ClientAuthenticated(
                control,
                peerIP: Self.normalizedIP(channel.remoteAddress),
                sessionID: sessionID,
                secret: secret
            )
            return (started, sessions.isClosed)
        }
        guard let started else { return closing ? .closing : .full }
        if started.isReconnect { self.metrics.reconnects.increment() }
        return .admitted
    }

    /// The secret of the v2 session `sessionID`, if it is connected.
    func secret(forSession sessionID: [UInt8]) -> V2SessionSecret? {
        self.sessions.withLock { $0.secret(forSession: sessionID) }
    }

    /// A control channel closed; if it was a client's, that client's idle pool goes with it.
    func controlClosed(_ channel: any Channel) {
        let ended = self.sessions.withLock { sessions -> (owner: UInt64, remaining: Int)? in
            guard let owner = sessions.owner(where: { $0.channel === channel }),
                sessions.controlClosed(owner) != nil
            else { return nil }
            return (owner, sessions.count)
        }
        guard let ended else { return }
        let closed = self.currentRole?.ownerLost(ended.owner) ?? 0
        self.logger.warning(
            "client disconnected",
            metadata: ["np.pool.closed": "\(closed)", "np.clients": "\(ended.remaining)"]
        )
    }

    func launchReceived(_ id: PoolID, launch: PoolLaunch, from channel: any Channel) {
        guard let dialer = self.currentRole as? TargetDialer else {
            self.logger.warning(
                "launch from a client ignored: this server has the users (reverse mode)",
                metadata: ["np.pool.id": "\(id)"]
            )
            return
        }
        guard let owner = self.sessions.withLock({ $0.owner { $0.channel === channel } }) else {
            self.logger.warning("launch for an unknown pool connection ignored", metadata: ["np.pool.id": "\(id)"])
            return
        }
        dialer.launchReceived(id, owner: owner, launch: launch, on: channel.eventLoop)
    }

    /// The peer's IP address as text, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) written as IPv4.
    static func normalizedIP(_ address: SocketAddress?) -> String? {
        guard let ip = address?.ipAddress else { return nil }
        let mappedPrefix = "::ffff:"
        if ip.lowercased().hasPrefix(mappedPrefix), ip.contains(".") {
            return String(ip.dropFirst(mappedPrefix.count))
        }
        return ip
    }

    // MARK: the roles' owners (PoolConnectionOwners)

    func launchWriter(for owner: UInt64) -> SignalWriter? {
        self.sessions.withLock { $0.session(owner)?.control.signals }
    }

    func connectionTaken(_ connection: PoolConnection, wasClaimed: Bool) {}

    var datagramOwners: Set<UInt64> {
        self.sessions.withLock { $0.owners { $0.datagrams } }
    }

    func isCurrent(_ owner: UInt64) -> Bool {
        self.sessions.withLock { $0.session(owner) != nil }
    }

    // MARK: pool connections (ServerPoolConnectionDelegate)

    func poolConnectionAccepted(_ channel: any Channel, authentication: V2PoolAuthenticated?) -> PoolAdmission? {
        guard let role = self.currentRole else { return nil }
        let credential: ServerSessionsStateMachine<Control>.Credential
        if let authentication {
            credential = .v2(sessionID: authentication.sessionID)
        } else {
            // Only v1 checks the address (v2 connections prove their session instead).
            credential = .v1(peerIP: Self.normalizedIP(channel.remoteAddress))
        }
        let occupancy = ServerSessionsStateMachine<Control>.PoolOccupancy(
            isFull: role.isFull,
            perClientLimit: role is TargetDialer ? self.configuration.maxPoolCapacity : nil,
            idleCount: { role.idleCount(owner: $0) },
            isInUse: { [resumes] in role.isInUse($0) || resumes?.isLive($0) == true }
        )
        let decision = self.sessions.withLock {
            $0.admitPoolConnection(credential, pool: occupancy) { PoolID.random() }
        }
        switch decision {
        case .refuse(let refusal):
            self.logRefusal(refusal, channel: channel, credential: credential)
            return nil
        case .admit(let id, let owner, let secret):
            var opening = channel.allocator.buffer(capacity: V2PoolOpening.serverMessageLength)
            var confirmation: [UInt8]?
            if let authentication, let secret {
                opening.writeBytes(V2PoolOpening.serverMessage(id: id, secret: secret, nonce: authentication.nonce))
                confirmation = secret.poolConfirmation(nonce: authentication.nonce, id: id)
            } else {
                id.write(to: &opening)
            }
            var resume: V2ResumeTicket?
            if let authentication, let secret, secret.resumesRelays {
                resume = V2ResumeTicket(
                    secret: secret,
                    sessionID: authentication.sessionID,
                    nonce: authentication.nonce,
                    id: id
                )
            }
            return PoolAdmission(id: id, opening: opening, owner: owner, confirmation: confirmation, resume: resume)
        }
    }

    private func logRefusal(
        _ refusal: ServerSessionsStateMachine<Control>.Refusal,
        channel: any Channel,
        credential: ServerSessionsStateMachine<Control>.Credential
    ) {
        let peer: String
        if case .v1(let peerIP?) = credential {
            peer = peerIP
        } else {
            peer = Self.normalizedIP(channel.remoteAddress) ?? "?"
        }
        let metadata: Logger.Metadata = ["np.peer": "\(peer)"]
        switch refusal {
        case .noClient: self.logger.debug("pool connection refused: no client", metadata: metadata)
        case .poolFull: self.logger.debug("pool connection refused: pool full", metadata: metadata)
        case .sessionEnded: self.logger.debug("pool connection refused: its session has ended", metadata: metadata)
        case .clientPoolFull:
            self.logger.debug("pool connection refused: this client's pool is full", metadata: metadata)
        case .noFreeID: break
        case .notFromClientAddress:
            self.logger.warning("pool connection refused: not from the client's address", metadata: metadata)
        }
    }

    func poolConnectionReady(_ connection: PoolConnection) {
        // Its client may have left while the connection was being confirmed.
        guard self.sessions.withLock({ $0.session(connection.owner) != nil }), let role = self.currentRole else {
            connection.channel.close(promise: nil)
            return
        }
        _ = role.connectionReady(connection)
    }

    func poolConnectionClosed(id: PoolID, channel: any Channel, protocolViolation: Bool) {
        _ = self.currentRole?.connectionClosed(id: id, channel: channel)
        if protocolViolation {
            self.logger.warning(
                "idle pool connection sent bytes before its launch; closed",
                metadata: ["np.pool.id": "\(id)"]
            )
        }
    }

    /// Shutting down: closes the control channels, the idle pool and the waiting users.
    func close() {
        let controls = self.sessions.withLock { $0.closeAll() }
        for control in controls { control.channel.close(promise: nil) }
        self.currentRole?.closeAll()
    }
}
