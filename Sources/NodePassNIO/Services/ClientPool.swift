import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NodePassCore

/// The client's pool: dials pool connections to the server's pool port and keeps them by ID. In reverse
/// mode, on `launch://ID` it dials the target and relays; in forward mode (v2) it has the users: each one
/// takes the oldest idle pool connection and the pool sends the launch. Sizing comes from
/// `ClientPoolStateMachine`.
final class ClientPool: Sendable {
    private struct State {
        var machine: ClientPoolStateMachine
        var generation: UInt64 = 0
        var poolPort: Int?
        var poolHost: String?
        var v2: V2PoolSettings?
        /// Forward mode: writes this side's launches on the control channel.
        var forwardControl: SignalWriter?
        /// Forward mode: idle connections in the order they came, and users waiting for one.
        var launcher: ServerPoolStateMachine<any Channel, WaitingUser>
        var nextTicket: UInt64 = 0
        var connections: [PoolID: any Channel] = [:]
        var claimed: Set<PoolID> = []
        var awaitedLaunches: Set<PoolID> = []
        var ticker: RepeatedTask?
        var lastDialFailureLog = NIODeadline.distantPast
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
    private let configuration: Configuration
    private let group: any EventLoopGroup
    private let sessions: SessionTracker
    private let logger: Logger
    private let metrics: TunnelMetrics

    init(
        url: TunnelURL,
        configuration: Configuration,
        group: any EventLoopGroup,
        sessions: SessionTracker,
        metrics: TunnelMetrics,
        logger: Logger
    ) {
        self.metrics = metrics
        self.url = url
        self.configuration = configuration
        self.group = group
        self.forwardLoop = group.next()
        self.sessions = sessions
        self.logger = logger
        self.state = Locked(
            State(
                machine: ClientPoolStateMachine(
                    minimum: configuration.minPoolCapacity,
                    maximum: configuration.maxPoolCapacity
                ),
                launcher: ServerPoolStateMachine(maximumIdle: configuration.maxPoolCapacity)
            )
        )
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

    /// The server named its pool port: (re)start the pool towards it, at `host` (the address the control
    /// channel reached, so that pool connections come from the same client address the server expects),
    /// or at the tunnel's host name when that is unknown. `v2` authenticates the connections of a v2 session;
    /// `forwardControl` (v2 forward mode) is the control channel on which this side sends its launches.
    func start(port: Int, host: String?, v2: V2PoolSettings? = nil, forwardControl: (any Channel)? = nil) {
        self.stop()
        let loop = self.group.next()
        let (generation, adjustment) = self.updating { state in
            state.generation &+= 1
            state.poolPort = port
            state.poolHost = host
            state.v2 = v2
            state.forwardControl = forwardControl.map { SignalWriter(channel: $0) }
            state.machine.reset()
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
    }

    /// The control channel is gone: close the idle pool (relayed sessions go on).
    func stop() {
        let idle = self.updating { state -> [any Channel] in
            state.generation &+= 1
            state.poolPort = nil
            state.forwardControl = nil
            _ = state.launcher.controlLost()
            state.ticker?.cancel()
            state.ticker = nil
            state.machine.reset()
            state.claimed.removeAll()
            state.awaitedLaunches.removeAll()
            defer { state.connections.removeAll() }
            return Array(state.connections.values)
        }
        for channel in idle { channel.close(promise: nil) }
    }

    private func periodElapsed(generation: UInt64) {
        let adjustment = self.updating { state -> ClientPoolStateMachine.Adjustment in
            guard state.generation == generation else { return .none }
            return state.machine.periodElapsed()
        }
        self.apply(adjustment, generation: generation)
    }

    private func apply(_ adjustment: ClientPoolStateMachine.Adjustment, generation: UInt64) {
        let (poolPort, poolHost, v2, forward) = self.state.withLock {
            ($0.poolPort, $0.poolHost, $0.v2, $0.forwardControl != nil)
        }
        // What a pool connection reads goes towards the service in reverse mode, back to the user in forward mode.
        let bytes = forward ? self.metrics.bytesDownstream : self.metrics.bytesUpstream
        guard adjustment.open > 0, let port = poolPort else { return }
        let host = poolHost ?? self.url.tunnel.dialHost
        let delegate = GenerationDelegate(pool: self, generation: generation)
        for _ in 0..<adjustment.open {
            let bootstrap = ClientBootstrap(group: forward ? self.forwardLoop : self.group)
                .connectTimeout(self.configuration.dialTimeout)
                .channelInitializer { [configuration, sessions = self.sessions, logger = self.logger] channel in
                    SocketTuning.apply(to: channel)
                    return channel.eventLoop.makeCompletedFuture {
                        try SocketTuning.prepareRelay(channel)
                        var idReader = PoolIDReader.v1
                        if let v2 {
                            let nonce = V2PoolNonce()
                            try channel.pipeline.syncOperations.addHandler(
                                ClientPoolAuthenticationHandler(settings: v2, nonce: nonce)
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
                                reply: { id in v2.secret.poolConfirmation(nonce: nonce.bytes, id: id) }
                            )
                        }
                        try channel.pipeline.syncOperations.addHandlers([
                            ClientPoolConnectionHandler(
                                delegate: delegate,
                                idReader: idReader,
                                idReadTimeout: configuration.idReadTimeout,
                                claimTimeout: configuration.poolWaitTimeout + configuration.dialTimeout
                            ),
                            GlueHandler(
                                bytes: bytes,
                                splice: SpliceSetup(sessions: sessions, logger: logger, schedulesMove: false)
                            ),
                        ])
                    }
                }
            bootstrap.dial(host: host, port: port).whenFailure { error in
                self.dialFailed(generation: generation, error: error)
            }
        }
    }

    private func dialFailed(generation: UInt64, error: any Error) {
        let now = NIODeadline.now()
        let shouldLog = self.updating { state -> Bool in
            guard state.generation == generation else { return false }
            state.machine.connectionFailed()
            guard now - state.lastDialFailureLog > .seconds(1) else { return false }
            state.lastDialFailureLog = now
            return true
        }
        if shouldLog {
            self.logger.warning("pool connection failed", metadata: ["np.error": "\(error)"])
        }
    }

    fileprivate func established(_ channel: any Channel, id: PoolID, generation: UInt64) {
        enum Next {
            case close, launch, keep
            case forward(ServerPoolStateMachine<any Channel, WaitingUser>.Action)
        }
        let next = self.updating { state -> Next in
            guard state.generation == generation else { return .close }
            guard state.connections[id] == nil else {
                state.machine.connectionFailed()
                return .close
            }
            state.machine.connectionEstablished()
            state.connections[id] = channel
            if state.forwardControl != nil {
                return .forward(state.launcher.poolConnectionReady(id: id, connection: channel))
            }
            return state.awaitedLaunches.remove(id) != nil ? .launch : .keep
        }
        switch next {
        case .close: channel.close(promise: nil)
        case .launch: self.launch(id)
        case .keep: break
        case .forward(let action): self.perform(action)
        }
    }

    fileprivate func claimed(id: PoolID, generation: UInt64) {
        let adjustment = self.updating { state -> ClientPoolStateMachine.Adjustment in
            guard state.generation == generation, state.connections[id] != nil else { return .none }
            state.claimed.insert(id)
            // In forward mode the server never writes first: the connection is broken, not launched.
            state.launcher.poolConnectionClosed(id: id)
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
            guard let known = state.connections[id], known === channel else { return .none }
            state.connections[id] = nil
            state.launcher.poolConnectionClosed(id: id)
            if state.claimed.remove(id) != nil { return .none }
            return state.machine.connectionLost()
        }
        self.apply(adjustment, generation: generation)
    }

    /// The server sent `launch://ID`: dial the target and relay over that pool connection.
    func launch(_ id: PoolID) {
        enum Outcome {
            case relay(any Channel, ClientPoolStateMachine.Adjustment, UInt64)
            case awaitID(UInt64)
            case unknown
        }
        let outcome = self.updating { state -> Outcome in
            if let channel = state.connections.removeValue(forKey: id) {
                let adjustment = state.claimed.remove(id) != nil ? .none : state.machine.connectionTaken(now: Self.now)
                return .relay(channel, adjustment, state.generation)
            }
            guard state.poolPort != nil, state.awaitedLaunches.count < self.configuration.maxPoolCapacity else {
                return .unknown
            }
            state.awaitedLaunches.insert(id)
            return .awaitID(state.generation)
        }
        switch outcome {
        case .unknown:
            self.logger.warning("launch for an unknown pool connection ignored", metadata: ["np.pool.id": "\(id)"])
        case .awaitID(let generation):
            // The ID may still be in flight on its pool connection: give it a moment.
            // Every pool connection reads its ID within idReadTimeout of connecting (or is closed), and the
            // server can only launch it after it connected: that bound is long enough.
            self.group.next().scheduleTask(in: self.configuration.idReadTimeout) {
                let expired = self.state.withLock { state in
                    state.generation == generation && state.awaitedLaunches.remove(id) != nil
                }
                if expired {
                    self.logger.warning("launch for an unknown pool connection ignored", metadata: ["np.pool.id": "\(id)"])
                }
            }
        case .relay(let channel, let adjustment, let generation):
            // The user's target dial first, the pool's refill behind it.
            self.relay(id: id, pool: channel)
            self.apply(adjustment, generation: generation)
        }
    }

    // MARK: forward mode: this side has the users

    /// A user connected to this side's TARGET (forward mode): relay it now, or let it wait for a pool
    /// connection.
    func userArrived(_ channel: any Channel) {
        let (ticket, action) = self.updating { state -> (UInt64, ServerPoolStateMachine<any Channel, WaitingUser>.Action) in
            state.nextTicket += 1
            let user = WaitingUser(ticket: state.nextTicket, channel: channel, arrived: .now())
            return (state.nextTicket, state.launcher.userArrived(ticket: user.ticket, user: user))
        }
        if case .wait = action {
            self.scheduleWaitTimeout(ticket: ticket, on: channel.eventLoop)
        }
        self.perform(action)
    }

    private func scheduleWaitTimeout(ticket: UInt64, on loop: any EventLoop) {
        loop.scheduleTask(in: self.configuration.poolWaitTimeout) {
            guard let user = self.updating({ $0.launcher.userLeft(ticket: ticket) }) else { return }
            self.metrics.failed(.poolWait)
            self.logger.warning(
                "no pool connection in time; user connection closed",
                metadata: ["np.wait": "\(DurationParser.format(self.configuration.poolWaitTimeout))"]
            )
            user.channel.close(promise: nil)
        }
    }

    private func perform(_ action: ServerPoolStateMachine<any Channel, WaitingUser>.Action) {
        switch action {
        case .keep, .wait:
            break
        case .close(let connection):
            connection.close(promise: nil)
        case .relay(let id, let pool, let user):
            pool.eventLoop.execute { self.relayForward(id: id, pool: pool, user: user) }
        }
    }

    /// On the pool connection's event loop: hands the pool connection to the user, sends the launch, relays.
    private func relayForward(id: PoolID, pool: any Channel, user: WaitingUser) {
        let (control, adjustment, generation) = self.updating { state in
            if let known = state.connections[id], known === pool {
                state.connections[id] = nil
            }
            return (state.forwardControl, state.machine.connectionTaken(now: Self.now), state.generation)
        }
        self.apply(adjustment, generation: generation)
        var handedOff = false
        if control != nil, let handler = try? pool.pipeline.syncOperations.handler(type: ClientPoolConnectionHandler.self),
            let context = try? pool.pipeline.syncOperations.context(handler: handler)
        {
            handedOff = handler.handOff(context: context, to: user.channel)
        }
        guard handedOff, let control else {
            pool.close(promise: nil)
            // The user takes the next pool connection, first in line.
            let action = self.updating { $0.launcher.userArrived(ticket: user.ticket, user: user, retry: true) }
            if case .wait = action {
                self.scheduleWaitTimeout(ticket: user.ticket, on: user.channel.eventLoop)
            }
            self.perform(action)
            return
        }
        control.send { V2Message.launch(id).write(to: &$0) }
        self.logger.debug("launch sent", metadata: ["np.pool.id": "\(id)"])
        TunnelMetrics.record(self.metrics.newConnectionDuration, since: user.arrived)
        GlueHandler.connect(user.channel, to: pool)
    }

    private func relay(id: PoolID, pool: any Channel) {
        TargetRelay.start(
            pool: pool,
            id: id,
            target: self.url.target,
            dialTimeout: self.configuration.dialTimeout,
            sessions: self.sessions,
            metrics: self.metrics,
            logger: self.logger
        ) { target in
            guard let handler = try? pool.pipeline.syncOperations.handler(type: ClientPoolConnectionHandler.self),
                let context = try? pool.pipeline.syncOperations.context(handler: handler)
            else { return false }
            return handler.handOff(context: context, to: target)
        }
    }
}

/// Forwards one pool generation's connection events, so that late events of an old generation are dropped.
private final class GenerationDelegate: ClientPoolConnectionDelegate {
    private let pool: ClientPool
    private let generation: UInt64

    init(pool: ClientPool, generation: UInt64) {
        self.pool = pool
        self.generation = generation
    }

    func poolConnectionEstablished(_ channel: any Channel, id: PoolID) {
        self.pool.established(channel, id: id, generation: self.generation)
    }

    func poolConnectionClaimed(id: PoolID) {
        self.pool.claimed(id: id, generation: self.generation)
    }

    func poolConnectionClosed(_ channel: any Channel, id: PoolID?) {
        self.pool.closed(channel, id: id, generation: self.generation)
    }
}
