import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NodePassCore

/// The side that dials the target (the client in reverse mode, the server in forward mode): keeps idle pool
/// connections by ID, and for each launch dials TARGET on the launched connection's event loop and relays;
/// a connection launched for datagrams (`nodepass/2.1`) becomes a carrier served by a `DatagramDialer`.
///
/// A launch may come before its connection is ready (they travel on different TCP connections): it waits
/// for it for at most `launchWait`. Called from any thread; the bookkeeping is a `DialQueueStateMachine`
/// under a lock.
final class TargetDialer: PoolConnectionRole {
    private let state: Locked<DialQueueStateMachine<PoolConnection>>
    /// Set once, by the pool that makes this role, before the role is reachable from another thread.
    nonisolated(unsafe) weak var owners: (any PoolConnectionOwners)?
    private let target: HostPort
    private let pipelines: Pipelines
    /// The gauge of idle pool connections, when this queue is what it shows (the server's).
    private let idleGauge: Meter?
    private var logger: Logger { self.pipelines.logger }
    /// How long a launch waits for its pool connection: every one is ready within the ID-read bound of
    /// connecting (or it is closed).
    private var launchWait: TimeAmount { self.pipelines.configuration.idReadTimeout }
    /// The datagram carriers, by owner, closed with their owner.
    private let carriers = Locked<[UInt64: [ObjectIdentifier: any Channel]]>([:])
    private let nextCarrier = Locked<UInt64>(0)
    /// UDP_MAX_FLOWS, for the flows of every carrier together.
    private let flowBudget: DatagramFlowBudget

    init(
        target: HostPort,
        maximumIdle: Int,
        owners: (any PoolConnectionOwners)? = nil,
        pipelines: Pipelines,
        idleGauge: Meter?,
        maximumClaimed: Int? = nil
    ) {
        // Launches that come before their connection are bounded as idle connections are, and so are
        // connections used before their launch unless told otherwise.
        let queue = DialQueueStateMachine<PoolConnection>(
            maximumIdle: maximumIdle,
            maximumAwaited: pipelines.configuration.maxPoolCapacity,
            maximumClaimed: maximumClaimed ?? pipelines.configuration.maxPoolCapacity
        )
        self.state = Locked(queue)
        self.target = target
        self.flowBudget = DatagramFlowBudget(maximum: pipelines.configuration.udpMaxFlows)
        self.owners = owners
        self.pipelines = pipelines
        self.idleGauge = idleGauge
    }

    /// Changes the state under the lock, then publishes the idle pool size, so that no change is missed.
    private func updating<Result>(_ body: (inout DialQueueStateMachine<PoolConnection>) -> Result) -> Result {
        self.state.withLock { machine in
            defer { self.idleGauge?.set(machine.idleCount) }
            return body(&machine)
        }
    }

    // MARK: pool connections (PoolConnectionRole)

    var idleCount: Int { self.state.withLock { $0.idleCount } }
    var isFull: Bool { self.state.withLock { $0.isFull } }

    func idleCount(owner: UInt64) -> Int {
        self.state.withLock { $0.idleCount(owner: owner) }
    }

    func isInUse(_ id: PoolID) -> Bool {
        self.state.withLock { $0.isInUse(id) }
    }

    func connectionReady(_ connection: PoolConnection) -> Bool {
        let action = self.updating {
            $0.connectionReady(id: connection.id, owner: connection.owner, connection: connection)
        }
        switch action {
        case .keep:
            return true
        case .dial(let connection, let launch):
            self.owners?.connectionTaken(connection, wasClaimed: false)
            self.serve(connection, launch)
            return true
        case .close(let connection):
            connection.channel.close(promise: nil)
            return false
        }
    }

    func connectionClaimed(_ id: PoolID) -> Bool {
        switch self.updating({ $0.connectionClaimed(id: id) }) {
        case .counted:
            return true
        case .none:
            return false
        case .close(let connection):
            self.logger.warning(
                "pool connection closed: the other side used as many as the pool holds without launching them",
                metadata: ["np.pool.id": "\(id)", "np.peer": "\(connection.channel.peerDescription)"]
            )
            // Not now: the pool asks while holding its lock, and the close reports to the pool at once.
            let channel = connection.channel
            channel.eventLoop.execute { channel.close(promise: nil) }
            // Counted as used: it is no longer idle, and the pool replaces it.
            return true
        }
    }

    func connectionClosed(id: PoolID, channel: any Channel) -> Bool {
        self.updating { $0.connectionClosed(id: id) { $0.channel === channel } } == false
    }

    @discardableResult
    func ownerLost(_ owner: UInt64) -> Int {
        let lost = self.updating { $0.ownerLost(owner) }
        for connection in lost { connection.channel.close(promise: nil) }
        let carriers = self.carriers.withLock { $0.removeValue(forKey: owner) ?? [:] }
        for carrier in carriers.values { carrier.close(promise: nil) }
        return lost.count
    }

    func closeAll() {
        for connection in self.updating({ $0.drain() }) { connection.channel.close(promise: nil) }
        let carriers = self.carriers.withLock { carriers in
            defer { carriers = [:] }
            return carriers.values.flatMap(\.values)
        }
        for carrier in carriers { carrier.close(promise: nil) }
    }

    // MARK: launches

    /// `owner` launched its pool connection `id` for `launch`: serve it now, or once it is ready.
    func launchReceived(_ id: PoolID, owner: UInt64, launch: PoolLaunch = .stream, on loop: any EventLoop) {
        switch self.updating({ $0.launchReceived(id: id, owner: owner, launch: launch) }) {
        case .dial(let connection, let wasClaimed):
            self.owners?.connectionTaken(connection, wasClaimed: wasClaimed)
            self.serve(connection, launch)
        case .awaitConnection:
            // Every pool connection is ready within `launchWait` of connecting (or is closed), and the other
            // side can only launch it after it connected: that bound is long enough.
            loop.scheduleTask(in: self.launchWait) {
                if self.state.withLock({ $0.launchExpired(id: id, owner: owner) }) {
                    self.logger.warning(
                        "launch for an unknown pool connection ignored",
                        metadata: ["np.pool.id": "\(id)"]
                    )
                }
            }
        case .unknown:
            self.logger.warning("launch for an unknown pool connection ignored", metadata: ["np.pool.id": "\(id)"])
        }
    }

    /// Serves a launched connection on its own event loop: one hop there, instead of one for each of the
    /// dial, the session's close callback and the relay's start.
    private func serve(_ pool: PoolConnection, _ launch: PoolLaunch) {
        let loop = pool.channel.eventLoop
        guard loop.inEventLoop else {
            loop.execute { self.serve(pool, launch) }
            return
        }
        switch launch {
        case .stream: self.dial(pool)
        case .datagrams: self.carry(pool)
        }
    }

    /// On the pool connection's event loop: makes it a datagram carrier whose flows go to TARGET over UDP.
    private func carry(_ pool: PoolConnection) {
        let target = self.target
        let loop = pool.channel.eventLoop
        // A name is resolved off the event loops, once per carrier; meanwhile the pool connection holds
        // what arrives.
        let resolved: EventLoopFuture<SocketAddress>
        if let address = try? SocketAddress(ipAddress: target.dialHost, port: target.port) {
            resolved = loop.makeSucceededFuture(address)
        } else {
            resolved = NIOThreadPool.singleton.runIfActive(eventLoop: loop) { try DatagramTarget.resolve(target) }
        }
        resolved.assumeIsolated().whenComplete { result in
            switch result {
            case .success(let address):
                self.startCarrier(pool, target: address)
            case .failure(let error):
                self.logger.warning(
                    "cannot resolve the target for UDP",
                    metadata: ["np.target": "\(target)", "np.error": "\(UserFacingError.describe(error))"]
                )
                pool.channel.close(promise: nil)
            }
        }
    }

    /// On the pool connection's event loop: hands it to a `DatagramDialer` for TARGET at `address`.
    private func startCarrier(_ pool: PoolConnection, target address: SocketAddress) {
        let id = self.nextCarrier.withLock { next in
            next += 1
            return next
        }
        let dialer = DatagramDialer(
            target: address,
            loop: pool.channel.eventLoop,
            budget: self.flowBudget,
            pipelines: self.pipelines
        )
        guard pool.handOff(toCarrier: dialer.makeCarrier(id: id)) else {
            dialer.carrierClosed(id)
            pool.channel.close(promise: nil)
            return
        }
        dialer.started()
        let (owner, key, channel) = (pool.owner, ObjectIdentifier(pool.channel), pool.channel)
        self.carriers.withLock { $0[owner, default: [:]][key] = channel }
        channel.closeFuture.whenComplete { _ in
            self.carriers.withLock { $0[owner]?[key] = nil }
        }
        // Registered first, then checked: an owner lost meanwhile has either closed it already or is gone now.
        guard self.owners?.isCurrent(owner) ?? false else {
            channel.close(promise: nil)
            return
        }
        self.logger.debug("datagram carrier started", metadata: ["np.pool.id": "\(pool.id)"])
    }

    /// Dials the target on the pool connection's event loop and relays between the two: with a
    /// `GlueHandler` pair, or as a `ResumableStream` when the pool connection has a resume ticket.
    private func dial(_ pool: PoolConnection) {
        let (pipelines, logger, target) = (self.pipelines, self.logger, self.target)
        let (metrics, sessions) = (pipelines.metrics, pipelines.sessions)
        // Counted before the session exists: its end may be reported at once (a channel already closed).
        metrics.active.increment()
        guard sessions.add(pool.channel, onEnd: { metrics.active.decrement() }) else {
            metrics.active.decrement()
            metrics.failed(.limit)
            logger.warning(
                "SEMAPHORE_LIMIT reached; launch refused",
                metadata: ["np.limit": "\(sessions.limit)", "np.pool.id": "\(pool.id)"]
            )
            pool.channel.close(promise: nil)
            return
        }
        let launched = NIODeadline.now()
        metrics.accepted.increment()
        let targetEnd = TargetEnd()
        ClientBootstrap(group: pool.channel.eventLoop)
            .connectTimeout(pipelines.configuration.dialTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if pool.resume != nil {
                        targetEnd.resumable = try pipelines.resumableTarget(channel)
                    } else {
                        targetEnd.glue = try pipelines.target(channel)
                    }
                }
            }
            .dial(host: target.dialHost, port: target.port)
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    metrics.failed(.target)
                    logger.warning(
                        "cannot reach the target",
                        metadata: [
                            "np.target": "\(target)", "np.error": "\(UserFacingError.describe(error))",
                            "np.pool.id": "\(pool.id)",
                        ]
                    )
                    pool.channel.close(promise: nil)
                case .success(let targetChannel):
                    // Same event loop as the pool connection: both halves are set up before any byte moves.
                    guard self.relay(pool, targetChannel, targetEnd) else {
                        targetChannel.close(promise: nil)
                        pool.channel.close(promise: nil)
                        return
                    }
                    TunnelMetrics.record(metrics.newConnectionDuration, since: launched)
                    logger.debug(
                        pool.resume == nil ? "relaying" : "relaying (resumable)",
                        metadata: [
                            "np.target": "\(target)", "np.pool.id": "\(pool.id)",
                            "np.pool.local": "\(pool.channel.localAddress.map { "\($0)" } ?? "?")",
                        ]
                    )
                }
            }
    }

    /// Starts the relay between `pool` and the target's connection; false when either is gone. A resumable
    /// relay's session belongs to the target's connection from then on (its pool connection may be
    /// replaced).
    private func relay(_ pool: PoolConnection, _ targetChannel: any Channel, _ end: TargetEnd) -> Bool {
        guard let ticket = pool.resume else {
            guard let glue = end.glue, pool.handOff(to: targetChannel) else { return false }
            glue.connect(to: pool.channel)
            return true
        }
        let metrics = self.pipelines.metrics
        guard let handler = end.resumable, self.pipelines.sessions.rekey(from: pool.channel, to: targetChannel)
        else { return false }
        return ResumableStream.start(
            ticket: ticket,
            local: targetChannel,
            localHandler: handler,
            pool: pool,
            relays: self.pipelines.resumes,
            bytes: metrics.bytesDownstream,
            received: metrics.bytesUpstream
        ) != nil
    }
}

/// The target connection's handler (a `GlueHandler`, or a `ResumeLocalHandler` for a resumable relay), from
/// its channel initializer to the end of its dial.
///
/// `@unchecked Sendable`: the initializer and the dial's completion both run on the pool connection's event
/// loop (the target is dialled on it), one after the other; nothing else touches it. (Not a `NIOLoopBoundBox`:
/// its generic metadata is looked up at every dial.)
private final class TargetEnd: @unchecked Sendable {
    var glue: GlueHandler?
    var resumable: ResumeLocalHandler?
}
