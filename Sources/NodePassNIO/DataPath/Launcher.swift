import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// The side with the users (the server in reverse mode, the client in forward mode): each user takes the
/// oldest idle pool connection or waits for one (at most POOL_WAIT), and the launch goes out on the
/// connection owner's control channel as the relay starts.
///
/// Called from any thread; the bookkeeping is a `LaunchQueueStateMachine` under a lock, and each relay starts
/// on its pool connection's event loop (which is also its user's).
final class Launcher: PoolConnectionRole {
    /// A user connection waiting for a pool connection.
    struct WaitingUser: Sendable {
        var ticket: UInt64
        var end: RelayEnd
        var arrived: NIODeadline

        var channel: any Channel { self.end.channel }
    }

    private struct State {
        var queue: LaunchQueueStateMachine<PoolConnection, WaitingUser>
        var nextTicket: UInt64 = 0
    }

    private let state: Locked<State>
    /// Set once, by the pool that makes this role, before the role is reachable from another thread.
    nonisolated(unsafe) weak var owners: (any PoolConnectionOwners)?
    private let waitTimeout: TimeAmount
    private let metrics: TunnelMetrics
    /// The gauge of idle pool connections, when this queue is what it shows (the server's).
    private let idleGauge: Meter?
    private let logger: Logger
    private let ownerLostHooks = Locked<(@Sendable (UInt64?) -> Void)?>(nil)
    /// The tunnel's resumable relays; relays over a pool connection with a ticket resume.
    private let resumes: ResumableRelays?

    /// Told when an owner's pool connections go (nil: everyone's), so that the owner's datagram carriers go
    /// with them (`DatagramUsers`).
    var ownerLostHook: (@Sendable (UInt64?) -> Void)? {
        get { self.ownerLostHooks.withLock { $0 } }
        set { self.ownerLostHooks.withLock { $0 = newValue } }
    }

    init(
        maximumIdle: Int,
        waitTimeout: TimeAmount,
        owners: (any PoolConnectionOwners)? = nil,
        metrics: TunnelMetrics,
        idleGauge: Meter?,
        logger: Logger,
        resumes: ResumableRelays? = nil
    ) {
        self.resumes = resumes
        self.state = Locked(State(queue: LaunchQueueStateMachine(maximumIdle: maximumIdle)))
        self.owners = owners
        self.waitTimeout = waitTimeout
        self.metrics = metrics
        self.idleGauge = idleGauge
        self.logger = logger
    }

    /// Changes the state under the lock, then publishes the idle pool size, so that no change is missed.
    private func updating<Result>(_ body: (inout State) -> Result) -> Result {
        self.state.withLock { state in
            defer { self.idleGauge?.set(state.queue.idleCount) }
            return body(&state)
        }
    }

    // MARK: pool connections (PoolConnectionRole)

    var idleCount: Int { self.state.withLock { $0.queue.idleCount } }
    var isFull: Bool { self.state.withLock { $0.queue.isFull } }

    func idleCount(owner: UInt64) -> Int {
        self.state.withLock { $0.queue.idleCount { $0.owner == owner } }
    }

    func isInUse(_ id: PoolID) -> Bool {
        self.state.withLock { $0.queue.isInUse(id) }
    }

    func connectionReady(_ connection: PoolConnection) -> Bool {
        let action = self.updating { $0.queue.poolConnectionReady(id: connection.id, connection: connection) }
        self.perform(action)
        if case .close = action { return false }
        return true
    }

    func connectionClaimed(_ id: PoolID) -> Bool {
        // The server never writes first on a connection that this side launches: it is broken, not used.
        self.updating { $0.queue.poolConnectionClosed(id: id) }
    }

    func connectionClosed(id: PoolID, channel: any Channel) -> Bool {
        self.updating { $0.queue.poolConnectionClosed(id: id) }
    }

    @discardableResult
    func ownerLost(_ owner: UInt64) -> Int {
        let lost = self.updating { $0.queue.controlLost { $0.owner == owner } }
        for connection in lost { connection.channel.close(promise: nil) }
        self.ownerLostHook?(owner)
        return lost.count
    }

    func closeAll() {
        let drained = self.updating { $0.queue.drain() }
        for connection in drained.connections { connection.channel.close(promise: nil) }
        for user in drained.users { user.channel.close(promise: nil) }
        self.ownerLostHook?(nil)
    }

    // MARK: datagram carriers

    /// Takes the oldest idle pool connection whose owner `accepts`, for a datagram carrier (`nodepass/2.1`),
    /// with the writer of its owner's launches; nil when there is none.
    func takeForCarrier(where accepts: (UInt64) -> Bool) -> (PoolConnection, SignalWriter)? {
        guard let (_, connection) = self.updating({ $0.queue.takeIdle { accepts($0.owner) } }) else { return nil }
        self.owners?.connectionTaken(connection, wasClaimed: false)
        guard let signals = self.owners?.launchWriter(for: connection.owner) else {
            connection.channel.close(promise: nil)
            return nil
        }
        return (connection, signals)
    }

    // MARK: users

    /// A user connected: relay it now, or let it wait for a pool connection.
    func userArrived(_ end: RelayEnd) {
        let channel = end.channel
        let (user, action) = self.updating { state in
            state.nextTicket += 1
            let user = WaitingUser(ticket: state.nextTicket, end: end, arrived: .now())
            return (user, state.queue.userArrived(ticket: user.ticket, user: user))
        }
        if case .wait = action {
            self.logger.debug("user waits for a pool connection", metadata: ["np.peer": "\(channel.peerDescription)"])
        }
        self.queued(user, action: action)
    }

    /// Puts a user whose pool connection failed first in line for the next one.
    private func retry(_ user: WaitingUser) {
        let action = self.updating { $0.queue.userArrived(ticket: user.ticket, user: user, retry: true) }
        self.queued(user, action: action)
    }

    private func queued(_ user: WaitingUser, action: LaunchQueueStateMachine<PoolConnection, WaitingUser>.Action) {
        if case .wait = action {
            self.scheduleWaitTimeout(ticket: user.ticket, on: user.channel.eventLoop)
        }
        self.perform(action)
    }

    /// Closes the user with this ticket if it is still waiting when the pool-wait timeout ends.
    private func scheduleWaitTimeout(ticket: UInt64, on loop: any EventLoop) {
        loop.scheduleTask(in: self.waitTimeout) {
            guard let user = self.updating({ $0.queue.userLeft(ticket: ticket) }) else { return }
            self.metrics.failed(.poolWait)
            self.logger.warning(
                "no pool connection in time; user connection closed",
                metadata: ["np.wait": "\(DurationParser.format(self.waitTimeout))"]
            )
            user.channel.close(promise: nil)
        }
    }

    private func perform(_ action: LaunchQueueStateMachine<PoolConnection, WaitingUser>.Action) {
        switch action {
        case .keep, .wait:
            break
        case .close(let connection):
            connection.channel.close(promise: nil)
        case .relay(_, let connection, let user):
            connection.channel.eventLoop.execute { self.relay(connection, user: user) }
        }
    }

    /// On the pool connection's event loop: hands the pool connection to the user, sends the launch, relays.
    private func relay(_ connection: PoolConnection, user: WaitingUser) {
        let owners = self.owners
        owners?.connectionTaken(connection, wasClaimed: false)
        // The owner may have left meanwhile, or the connection died: the user takes the next one.
        guard let signals = owners?.launchWriter(for: connection.owner) else {
            connection.channel.close(promise: nil)
            self.retry(user)
            return
        }
        let resumable = connection.resume.map { self.startResumable(connection, ticket: $0, user: user) }
        guard resumable ?? connection.handOff(to: user.channel) else {
            connection.channel.close(promise: nil)
            // A user whose `GlueHandler` gave way to a resumable relay cannot take another connection.
            if resumable == nil { self.retry(user) } else { user.channel.close(promise: nil) }
            return
        }
        signals.sendLaunch(connection.id)
        self.logger.debug("launch sent", metadata: ["np.pool.id": "\(connection.id)"])
        TunnelMetrics.record(self.metrics.newConnectionDuration, since: user.arrived)
        if resumable == nil { user.end.connect(to: connection.channel) }
    }

    /// On the pool connection's event loop: starts a resumable relay (`ResumableStream`) of the user over
    /// `connection`, its local handler taking the place of the user's `GlueHandler`; false when the user or
    /// the connection is gone.
    private func startResumable(_ connection: PoolConnection, ticket: V2ResumeTicket, user: WaitingUser) -> Bool {
        guard let relays = self.resumes, let local = user.end.replaceGlue() else { return false }
        return ResumableStream.start(
            ticket: ticket,
            local: user.channel,
            localHandler: local,
            pool: connection,
            relays: relays,
            bytes: self.metrics.bytesUpstream,
            received: self.metrics.bytesDownstream
        ) != nil
    }
}
