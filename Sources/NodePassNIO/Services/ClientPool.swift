import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NodePassCore
import Synchronization

/// The client's pool: dials pool connections to the server's pool port, keeps them by ID, and on
/// `launch://ID` dials the target and relays. Sizing comes from `ClientPoolStateMachine`.
final class ClientPool: Sendable {
    private struct State {
        var machine: ClientPoolStateMachine
        var generation: UInt64 = 0
        var poolPort: Int?
        var poolHost: String?
        var v2: V2PoolSettings?
        var connections: [PoolID: any Channel] = [:]
        var claimed: Set<PoolID> = []
        var awaitedLaunches: Set<PoolID> = []
        var ticker: RepeatedTask?
        var lastDialFailureLog = NIODeadline.distantPast
    }

    /// Period of the capacity adaptation.
    static let adaptationPeriod = TimeAmount.seconds(1)

    private let state: Mutex<State>
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
        self.sessions = sessions
        self.logger = logger
        self.state = Mutex(
            State(
                machine: ClientPoolStateMachine(
                    minimum: configuration.minPoolCapacity,
                    maximum: configuration.maxPoolCapacity
                )
            )
        )
    }

    /// Changes the state under the lock, then publishes the pool's size, so that no change is missed.
    private func updating<Result>(_ body: (inout State) -> sending Result) -> sending Result {
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

    /// The server named its pool port: (re)start the pool towards it, at `host` (the address the control
    /// channel reached, so that pool connections come from the same client address the server expects),
    /// or at the tunnel's host name when that is unknown. `v2` authenticates the connections of a v2 session.
    func start(port: Int, host: String?, v2: V2PoolSettings? = nil) {
        self.stop()
        let loop = self.group.next()
        let (generation, adjustment) = self.updating { state in
            state.generation &+= 1
            state.poolPort = port
            state.poolHost = host
            state.v2 = v2
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
        let (poolPort, poolHost, v2) = self.state.withLock { ($0.poolPort, $0.poolHost, $0.v2) }
        guard adjustment.open > 0, let port = poolPort else { return }
        let host = poolHost ?? self.url.tunnel.dialHost
        let delegate = GenerationDelegate(pool: self, generation: generation)
        for _ in 0..<adjustment.open {
            let bootstrap = ClientBootstrap(group: self.group)
                .connectTimeout(self.configuration.dialTimeout)
                .channelOption(.autoRead, value: false)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelInitializer { [configuration, metrics] channel in
                    SocketTuning.apply(to: channel)
                    return channel.eventLoop.makeCompletedFuture {
                        var idReader = PoolIDReader.v1
                        if let v2 {
                            let nonce = V2PoolNonce()
                            try channel.pipeline.syncOperations.addHandler(
                                ClientPoolAuthenticationHandler(settings: v2, nonce: nonce)
                            )
                            idReader = PoolIDReader(length: V2PoolOpening.serverMessageLength) { opening in
                                V2PoolOpening.verifyServerMessage(
                                    Array(opening.readableBytesView),
                                    secret: v2.secret,
                                    nonce: nonce.bytes
                                )
                            }
                        }
                        try channel.pipeline.syncOperations.addHandlers([
                            ClientPoolConnectionHandler(
                                delegate: delegate,
                                idReader: idReader,
                                idReadTimeout: configuration.idReadTimeout,
                                claimTimeout: configuration.poolWaitTimeout + configuration.dialTimeout
                            ),
                            GlueHandler(bytes: metrics.bytesUpstream),
                        ])
                    }
                }
            bootstrap.connect(host: host, port: port).whenFailure { error in
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
        let launchNow = self.updating { state -> Bool? in
            guard state.generation == generation else { return nil }
            guard state.connections[id] == nil else {
                state.machine.connectionFailed()
                return nil
            }
            state.machine.connectionEstablished()
            state.connections[id] = channel
            return state.awaitedLaunches.remove(id) != nil
        }
        switch launchNow {
        case nil: channel.close(promise: nil)
        case true?: self.launch(id)
        case false?: break
        }
    }

    fileprivate func claimed(id: PoolID, generation: UInt64) {
        let adjustment = self.updating { state -> ClientPoolStateMachine.Adjustment in
            guard state.generation == generation, state.connections[id] != nil else { return .none }
            state.claimed.insert(id)
            return state.machine.connectionTaken()
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
                let adjustment = state.claimed.remove(id) != nil ? .none : state.machine.connectionTaken()
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
            self.apply(adjustment, generation: generation)
            self.relay(id: id, pool: channel)
        }
    }

    private func relay(id: PoolID, pool: any Channel) {
        let logger = {
            var logger = self.logger
            logger[metadataKey: "np.pool.id"] = "\(id)"
            return logger
        }()
        guard self.sessions.add(pool) else {
            self.metrics.failed(.limit)
            logger.warning("SEMAPHORE_LIMIT reached; launch refused", metadata: ["np.limit": "\(self.sessions.limit)"])
            pool.close(promise: nil)
            return
        }
        let metrics = self.metrics
        let launched = NIODeadline.now()
        metrics.accepted.increment()
        metrics.active.increment()
        pool.closeFuture.whenComplete { _ in metrics.active.decrement() }
        let target = self.url.target
        ClientBootstrap(group: pool.eventLoop)
            .connectTimeout(self.configuration.dialTimeout)
            .channelOption(.autoRead, value: false)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                SocketTuning.apply(to: channel)
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(GlueHandler(bytes: metrics.bytesDownstream))
                }
            }
            .connect(host: target.dialHost, port: target.port)
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    metrics.failed(.target)
                    logger.warning("cannot reach the target", metadata: ["np.target": "\(target)", "np.error": "\(error)"])
                    pool.close(promise: nil)
                case .success(let targetChannel):
                    // Same event loop as the pool connection: both halves are set up before any byte moves.
                    do {
                        let handler = try pool.pipeline.syncOperations.handler(type: ClientPoolConnectionHandler.self)
                        let context = try pool.pipeline.syncOperations.context(handler: handler)
                        guard handler.handOff(context: context, to: targetChannel) else {
                            targetChannel.close(promise: nil)
                            return
                        }
                        let glue = try targetChannel.pipeline.syncOperations.handler(type: GlueHandler.self)
                        glue.connect(to: pool, context: try targetChannel.pipeline.syncOperations.context(handler: glue))
                        TunnelMetrics.record(metrics.newConnectionDuration, since: launched)
                        logger.debug("relaying", metadata: ["np.target": "\(target)", "np.pool.local": "\(pool.localAddress.map { "\($0)" } ?? "?")"])
                    } catch {
                        targetChannel.close(promise: nil)
                        pool.close(promise: nil)
                    }
                }
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
