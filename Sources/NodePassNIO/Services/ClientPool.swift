import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NodePassCore

/// The client's pool: dials pool connections to the server's pool port, sizes the pool with a
/// `ClientPoolStateMachine`, and hands each connection that received its ID to its role: the `TargetDialer`
/// in reverse mode (the server launches, this side dials TARGET), the `Launcher` in forward mode (v2: users
/// connect to this side, which launches).
///
/// Each start of the pool is a generation; a connection's owner is its generation, and events of an ended
/// generation are dropped.
final class ClientPool: PoolConnectionOwners, ClientControlDelegate {
    private struct State {
        var machine: ClientPoolStateMachine
        var generation: UInt64 = 0
        var poolPort: Int?
        var poolHost: String?
        var v2: V2PoolSettings?
        /// Forward mode: writes this side's launches on the control channel.
        var forwardControl: SignalWriter?
        /// What the session carries (UDP only under `nodepass/2.1`).
        var transports: TunnelTransports = [.tcp]
        var ticker: RepeatedTask?
        /// Pool dials that failed since the last period, with the last error: reported at the next period if
        /// the pool still runs then, so that a server that is going away (the control channel ends a moment
        /// later) is not reported as a failure.
        var unreportedDialFailures: (count: Int, last: any Error)?
        /// A pool connection showed a certificate that is not the announced one, and no pool connection has
        /// succeeded since: the error is logged once (each is counted).
        var certificateMismatchLogged = false
        /// Pool connections of the current generation from their dial until they get their ID: a new
        /// generation (the server named another pool port, or the control channel ended) closes them.
        var dialling: [ObjectIdentifier: any Channel] = [:]
    }

    /// Period of the capacity adaptation.
    static let adaptationPeriod = TimeAmount.seconds(1)

    private let state: Locked<State>
    /// Forward mode: the event loop of every pool connection and of every user, so that both halves of a
    /// relay share a thread (a buffer passes by a direct call, and a plain relay can move to the splice
    /// engine, which needs both halves on one loop). Reverse mode spreads pool connections over the group;
    /// each target connection is dialled on its pool connection's loop.
    let forwardLoop: any EventLoop
    private let url: TunnelURL
    private let group: any EventLoopGroup
    private let pipelines: Pipelines
    private var configuration: Configuration { self.pipelines.configuration }
    private let logger: Logger
    private let metrics: TunnelMetrics
    /// Reverse mode's role.
    private let dialer: TargetDialer
    /// Forward mode's role.
    private let launcher: Launcher

    /// The least number of pool connections a v2 server may use before their launches.
    static let minimumClaimedV2 = 1024

    init(url: TunnelURL, group: any EventLoopGroup, pipelines: Pipelines) {
        let configuration = pipelines.configuration
        self.metrics = pipelines.metrics
        self.url = url
        self.group = group
        self.forwardLoop = group.next()
        self.pipelines = pipelines
        self.logger = pipelines.logger
        self.state = Locked(
            State(
                machine: ClientPoolStateMachine(
                    minimum: configuration.minPoolCapacity,
                    maximum: configuration.maxPoolCapacity
                )
            )
        )
        self.dialer = TargetDialer(
            target: url.target,
            // The sizing bounds the pool; claimed connections wait here for their launch on top of it (the
            // pool replaces them). A v1 server is a stranger: it may claim as many as the pool holds. A v2
            // server proved the key, and in a burst of users its launches can trail its bytes on many more
            // connections than the pool holds (the pool keeps replacing the claimed ones), so that the bound
            // only caps memory there: at most 64 KiB each.
            maximumIdle: .max,
            pipelines: pipelines,
            idleGauge: nil,
            maximumClaimed: url.key == nil
                ? configuration.maxPoolCapacity : max(configuration.maxPoolCapacity * 4, Self.minimumClaimedV2)
        )
        self.launcher = Launcher(
            maximumIdle: configuration.maxPoolCapacity,
            waitTimeout: configuration.poolWaitTimeout,
            metrics: pipelines.metrics,
            idleGauge: nil,
            logger: pipelines.logger,
            resumes: pipelines.resumes
        )
        self.dialer.owners = self
        self.launcher.owners = self
        pipelines.resumes.connector = self
    }

    /// The monotonic clock the pool's growth is timed with, in nanoseconds.
    private static var now: UInt64 { NIODeadline.now().uptimeNanoseconds }

    /// Changes the state under the lock, then publishes the pool's size, so that no change is missed.
    private func updating<Result>(_ body: (inout State) -> Result) -> Result {
        self.state.withLock { state in
            defer {
                self.metrics.poolIdle.set(state.machine.idle)
                self.metrics.poolCapacity.set(state.machine.capacity)
            }
            return body(&state)
        }
    }

    /// Idle pool connections (with an ID, not yet used by the server).
    var idleCount: Int { self.state.withLock { $0.machine.idle } }
    /// Whether the current session is in forward mode (this side has the users).
    var isForward: Bool { self.state.withLock { $0.forwardControl != nil } }
    /// What the current session carries.
    var transports: TunnelTransports { self.state.withLock { $0.transports } }
    /// Forward mode: the side with the users, for the UDP listener on TARGET.
    var forwardLauncher: Launcher { self.launcher }

    /// The server named its pool port: (re)start the pool towards it, at `host` (the address the control
    /// channel reached, so that pool connections come from the same client address the server expects),
    /// or at the tunnel's host name when that is unknown. `v2` authenticates the connections of a v2 session;
    /// `forwardControl` (v2 forward mode) is the control channel on which this side sends its launches;
    /// `transports`: what the session carries.
    func start(
        port: Int,
        host: String?,
        v2: V2PoolSettings? = nil,
        forwardControl: (any Channel)? = nil,
        transports: TunnelTransports = [.tcp]
    ) {
        self.stop()
        let loop = self.group.next()
        let (generation, adjustment) = self.updating { state in
            state.generation &+= 1
            state.poolPort = port
            state.poolHost = host
            state.v2 = v2
            state.forwardControl = forwardControl.map { SignalWriter(channel: $0, isV2: true) }
            state.transports = transports
            state.machine.reset()
            state.certificateMismatchLogged = false
            let generation = state.generation
            state.ticker = loop.scheduleRepeatedTask(
                initialDelay: Self.adaptationPeriod,
                delay: Self.adaptationPeriod
            ) { [weak self] _ in
                self?.periodElapsed(generation: generation)
            }
            return (generation, state.machine.started())
        }
        self.logger.debug("pool started", metadata: ["np.pool.port": "\(port)", "np.pool.open": "\(adjustment.open)"])
        self.apply(adjustment, generation: generation)
        // Relays of an earlier session resume on this one (their pool connections may have died with the
        // control channel without either end noticing yet).
        if v2?.secret.resumesRelays == true, self.pipelines.resumes.count > 0 {
            self.pipelines.resumes.sessionRestarted()
        }
    }

    /// The control channel is gone: close the idle pool and the connections still being opened (relayed
    /// sessions go on).
    func stop() {
        var dialling: [any Channel] = []
        let ended = self.updating { state -> UInt64 in
            defer { state.generation &+= 1 }
            dialling = Array(state.dialling.values)
            state.dialling = [:]
            state.poolPort = nil
            state.forwardControl = nil
            state.transports = [.tcp]
            state.ticker?.cancel()
            state.ticker = nil
            state.unreportedDialFailures = nil
            state.machine.reset()
            return state.generation
        }
        for channel in dialling { channel.close(promise: nil) }
        // Users waiting in forward mode stay: they take a connection of the next generation (or time out).
        self.dialer.ownerLost(ended)
        self.launcher.ownerLost(ended)
    }

    private func periodElapsed(generation: UInt64) {
        var failures: (count: Int, last: any Error, server: HostPort)?
        let adjustment = self.updating { state -> ClientPoolStateMachine.Adjustment in
            guard state.generation == generation else { return .none }
            if let unreported = state.unreportedDialFailures {
                let server = HostPort(host: state.poolHost ?? self.url.tunnel.dialHost, port: state.poolPort ?? 0)
                failures = (unreported.count, unreported.last, server)
                state.unreportedDialFailures = nil
            }
            return state.machine.periodElapsed()
        }
        if let failures {
            self.logger.warning(
                """
                cannot open pool connections to the server at \(failures.server): \
                \(UserFacingError.describe(failures.last)) \
                (the server's pool port must be reachable from here)
                """,
                metadata: ["np.failures": "\(failures.count)"]
            )
        }
        self.apply(adjustment, generation: generation)
    }

    private func apply(_ adjustment: ClientPoolStateMachine.Adjustment, generation: UInt64) {
        guard adjustment.open > 0 else { return }
        let (poolPort, poolHost, v2, forward) = self.state.withLock {
            ($0.poolPort, $0.poolHost, $0.v2, $0.forwardControl != nil)
        }
        guard let port = poolPort else { return }
        let host = poolHost ?? self.url.tunnel.dialHost
        let delegate = GenerationDelegate(pool: self, generation: generation)
        for _ in 0..<adjustment.open {
            let bootstrap = ClientBootstrap(group: forward ? self.forwardLoop : self.group)
                .connectTimeout(self.configuration.dialTimeout)
                .channelInitializer { [pipelines] channel in
                    guard self.dialStarted(channel, generation: generation) else {
                        return channel.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
                    }
                    return channel.eventLoop.makeCompletedFuture {
                        try pipelines.clientPoolConnection(channel, v2: v2, forward: forward, delegate: delegate)
                    }
                }
            bootstrap.dial(host: host, port: port).whenFailure { error in
                self.dialFailed(generation: generation, error: error)
            }
        }
    }

    /// Tracks `channel` until it gets its ID or closes; false when its generation has ended already.
    private func dialStarted(_ channel: any Channel, generation: UInt64) -> Bool {
        let current = self.state.withLock { state in
            guard state.generation == generation else { return false }
            state.dialling[ObjectIdentifier(channel)] = channel
            return true
        }
        guard current else { return false }
        channel.closeFuture.whenComplete { _ in
            self.state.withLock { _ = $0.dialling.removeValue(forKey: ObjectIdentifier(channel)) }
        }
        return true
    }

    private func dialFailed(generation: UInt64, error: any Error) {
        self.updating { state in
            guard state.generation == generation else { return }
            state.machine.connectionFailed()
            state.unreportedDialFailures = ((state.unreportedDialFailures?.count ?? 0) + 1, error)
        }
        self.logger.debug("pool connection failed", metadata: ["np.error": "\(error)"])
    }

    fileprivate func established(_ connection: PoolConnection, generation: UInt64) {
        var connection = connection
        connection.owner = generation
        let role = self.updating { state -> (any PoolConnectionRole)? in
            guard state.generation == generation else { return nil }
            state.dialling.removeValue(forKey: ObjectIdentifier(connection.channel))
            state.machine.connectionEstablished()
            state.certificateMismatchLogged = false
            return self.role(of: state)
        }
        guard let role else {
            connection.channel.close(promise: nil)
            return
        }
        if !role.connectionReady(connection) {
            self.updating { $0.machine.connectionRefused() }
        }
    }

    // The role is asked under the pool's lock (the lock order of docs/ARCHITECTURE.md: a pool may ask its
    // role, a role never calls its pool while holding its own lock).

    fileprivate func certificateMismatched(_ channel: any Channel, generation: UInt64) {
        self.metrics.poolCertificateMismatches.increment()
        let first = self.state.withLock { state -> Bool in
            guard state.generation == generation, !state.certificateMismatchLogged else { return false }
            state.certificateMismatchLogged = true
            return true
        }
        guard first else { return }
        self.logger.error(
            """
            pool connection refused: its TLS certificate is not the one the server announced (something on the \
            path to the server's pool port intercepts TLS?); pool connections are retried less and less often
            """,
            metadata: ["np.peer": "\(channel.peerDescription)"]
        )
    }

    fileprivate func claimed(id: PoolID, generation: UInt64) {
        let adjustment = self.updating { state -> ClientPoolStateMachine.Adjustment in
            guard state.generation == generation, self.role(of: state).connectionClaimed(id) else { return .none }
            return state.machine.connectionTaken(now: Self.now)
        }
        self.apply(adjustment, generation: generation)
    }

    fileprivate func closed(_ channel: any Channel, id: PoolID?, generation: UInt64) {
        let adjustment = self.updating { state -> ClientPoolStateMachine.Adjustment in
            guard state.generation == generation else { return .none }
            guard let id else {
                state.machine.connectionFailed()
                return .none
            }
            guard self.role(of: state).connectionClosed(id: id, channel: channel) else { return .none }
            return state.machine.connectionLost()
        }
        self.apply(adjustment, generation: generation)
    }

    /// The role of the current pool generation.
    private func role(of state: State) -> any PoolConnectionRole {
        state.forwardControl == nil ? self.dialer : self.launcher
    }

    private func connectionTaken(generation: UInt64) {
        let adjustment = self.updating { state -> ClientPoolStateMachine.Adjustment in
            guard state.generation == generation else { return .none }
            return state.machine.connectionTaken(now: Self.now)
        }
        self.apply(adjustment, generation: generation)
    }

    /// The server launched the pool connection `id`: dial the target and relay over it, or (`.datagrams`)
    /// carry datagrams over it.
    func launch(_ id: PoolID, _ launch: PoolLaunch) {
        guard let generation = self.state.withLock({ $0.poolPort == nil ? nil : $0.generation }) else {
            self.logger.warning("launch for an unknown pool connection ignored", metadata: ["np.pool.id": "\(id)"])
            return
        }
        self.dialer.launchReceived(id, owner: generation, launch: launch, on: self.group.next())
    }

    /// A user connected to this side's TARGET (forward mode): relay it now, or let it wait for a pool
    /// connection.
    func userArrived(_ user: RelayEnd) {
        self.launcher.userArrived(user)
    }

    // MARK: the roles' owners (PoolConnectionOwners)

    func launchWriter(for owner: UInt64) -> SignalWriter? {
        self.state.withLock { $0.generation == owner ? $0.forwardControl : nil }
    }

    func connectionTaken(_ connection: PoolConnection, wasClaimed: Bool) {
        // A claimed connection was counted when the server used it.
        guard !wasClaimed else { return }
        self.connectionTaken(generation: connection.owner)
    }

    var datagramOwners: Set<UInt64> {
        self.state.withLock { $0.poolPort != nil && $0.transports.contains(.udp) ? [$0.generation] : [] }
    }

    func isCurrent(_ owner: UInt64) -> Bool {
        self.state.withLock { $0.poolPort != nil && $0.generation == owner }
    }
}

/// Forwards one pool generation's connection events, so that late events of an old generation are dropped.
extension ClientPool: ResumeConnector {
    func openResumeConnection(for stream: ResumableStream.Handle) -> EventLoopFuture<Void> {
        let loop = stream.eventLoop
        let session = self.state.withLock { state -> (port: Int, host: String?, v2: V2PoolSettings)? in
            guard let port = state.poolPort, let v2 = state.v2, v2.secret.resumesRelays else { return nil }
            return (port, state.poolHost, v2)
        }
        guard let session else {
            return loop.makeFailedFuture(NodePassError(.controlChannelLost, "no session with the server yet"))
        }
        let done = loop.makePromise(of: Void.self)
        let pipelines = self.pipelines
        ClientBootstrap(group: loop)
            .connectTimeout(self.configuration.dialTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try pipelines.clientResumeConnection(channel, v2: session.v2, stream: stream, done: done)
                }
            }
            .dial(host: session.host ?? self.url.tunnel.dialHost, port: session.port)
            .whenFailure { done.fail($0) }
        return done.futureResult
    }
}

private final class GenerationDelegate: ClientPoolConnectionDelegate {
    private let pool: ClientPool
    private let generation: UInt64

    init(pool: ClientPool, generation: UInt64) {
        self.pool = pool
        self.generation = generation
    }

    func poolConnectionEstablished(_ connection: PoolConnection) {
        self.pool.established(connection, generation: self.generation)
    }

    func poolConnectionClaimed(id: PoolID) {
        self.pool.claimed(id: id, generation: self.generation)
    }

    func poolConnectionClosed(_ channel: any Channel, id: PoolID?) {
        self.pool.closed(channel, id: id, generation: self.generation)
    }

    func poolCertificateMismatched(_ channel: any Channel) {
        self.pool.certificateMismatched(channel, generation: self.generation)
    }
}
