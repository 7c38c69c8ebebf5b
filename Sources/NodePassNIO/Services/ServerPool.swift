import CoreMetrics
import Logging
import NIOCore
import NodePassCore
import Synchronization

/// The server's shared pool: the current control channel, idle pool connections and waiting users.
///
/// Called from every event loop; the bookkeeping is a `ServerPoolStateMachine` under a mutex, and each
/// action runs on the event loop of the channel it touches.
final class ServerPool: ServerPoolConnectionDelegate, Sendable {
    struct WaitingUser: Sendable {
        var ticket: UInt64
        var channel: any Channel
        var arrived: NIODeadline
    }

    private struct State {
        var machine: ServerPoolStateMachine<any Channel, WaitingUser>
        var control: (any Channel)?
        var controlPeerIP: String?
        var nextTicket: UInt64 = 0
        var controlsSeen = 0
    }

    private let state: Mutex<State>
    private let configuration: Configuration
    private let logger: Logger
    private let metrics: TunnelMetrics

    init(configuration: Configuration, metrics: TunnelMetrics, logger: Logger) {
        self.configuration = configuration
        self.metrics = metrics
        self.logger = logger
        self.state = Mutex(State(machine: ServerPoolStateMachine(maximumIdle: configuration.maxPoolCapacity)))
    }

    var idleCount: Int { self.state.withLock { $0.machine.idleCount } }

    /// Changes the state under the lock, then publishes the idle pool size, so that no change is missed.
    private func updating<Result>(_ body: (inout State) -> sending Result) -> sending Result {
        self.state.withLock { state in
            defer { self.metrics.poolIdle.set(state.machine.idleCount) }
            return body(&state)
        }
    }

    // MARK: control channel

    /// A client finished its TLS handshake: it becomes the client; a previous one is closed.
    func controlConnected(_ channel: any Channel) {
        let (previous, stale, isReconnect) = self.updating { state in
            let previous = state.control
            state.control = channel
            state.controlPeerIP = Self.normalizedIP(channel.remoteAddress)
            state.controlsSeen += 1
            let stale = previous == nil ? [] : state.machine.controlLost()
            return (previous, stale, state.controlsSeen > 1)
        }
        if isReconnect { self.metrics.reconnects.increment() }
        if let previous {
            self.logger.warning(
                "control connection replaced by a newer client",
                metadata: ["np.peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"]
            )
            previous.close(promise: nil)
        }
        for connection in stale { connection.close(promise: nil) }
    }

    /// A control channel closed; if it was the current one, its idle pool goes with it.
    func controlClosed(_ channel: any Channel) {
        let stale = self.updating { state -> [any Channel]? in
            guard let current = state.control, current === channel else { return nil }
            state.control = nil
            state.controlPeerIP = nil
            return state.machine.controlLost()
        }
        guard let stale else { return }
        self.logger.warning("client disconnected; waiting for a client", metadata: ["np.pool.closed": "\(stale.count)"])
        for connection in stale { connection.close(promise: nil) }
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

    // MARK: pool connections (ServerPoolConnectionDelegate)

    func poolConnectionAccepted(_ channel: any Channel) -> PoolID? {
        let peerIP = Self.normalizedIP(channel.remoteAddress)
        return self.state.withLock { state -> PoolID? in
            guard state.control != nil else {
                self.logger.debug("pool connection refused: no client", metadata: ["np.peer": "\(peerIP ?? "?")"])
                return nil
            }
            guard !state.machine.isFull else {
                self.logger.debug("pool connection refused: pool full", metadata: ["np.peer": "\(peerIP ?? "?")"])
                return nil
            }
            guard peerIP != nil, peerIP == state.controlPeerIP else {
                self.logger.warning(
                    "pool connection refused: not from the client's address",
                    metadata: ["np.peer": "\(peerIP ?? "?")"]
                )
                return nil
            }
            for _ in 0..<8 {
                let id = PoolID.random()
                if !state.machine.isInUse(id) { return id }
            }
            return nil
        }
    }

    func poolConnectionReady(_ channel: any Channel, id: PoolID) {
        let action = self.updating { $0.machine.poolConnectionReady(id: id, connection: channel) }
        self.perform(action)
    }

    func poolConnectionClosed(id: PoolID, protocolViolation: Bool) {
        self.updating { _ = $0.machine.poolConnectionClosed(id: id) }
        if protocolViolation {
            self.logger.warning("idle pool connection sent bytes before its launch; closed", metadata: ["np.pool.id": "\(id)"])
        }
    }

    // MARK: users

    /// A user connected to the target port: relay it now, or let it wait for a pool connection.
    func userArrived(_ channel: any Channel) {
        let (ticket, action) = self.updating { state -> (UInt64, ServerPoolStateMachine<any Channel, WaitingUser>.Action) in
            state.nextTicket += 1
            let user = WaitingUser(ticket: state.nextTicket, channel: channel, arrived: .now())
            return (state.nextTicket, state.machine.userArrived(ticket: user.ticket, user: user))
        }
        if case .wait = action {
            self.logger.debug("user waits for a pool connection", metadata: ["np.peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"])
            self.scheduleWaitTimeout(ticket: ticket, on: channel.eventLoop)
        }
        self.perform(action)
    }

    /// Closes the user with this ticket if it is still waiting when the pool-wait timeout ends.
    private func scheduleWaitTimeout(ticket: UInt64, on loop: any EventLoop) {
        loop.scheduleTask(in: self.configuration.poolWaitTimeout) {
            guard let user = self.updating({ $0.machine.userLeft(ticket: ticket) }) else { return }
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
        case .relay(let id, let connection, let user):
            self.relay(id: id, pool: connection, user: user)
        }
    }

    private func relay(id: PoolID, pool: any Channel, user: WaitingUser) {
        pool.eventLoop.execute {
            let handedOff: Bool
            do {
                let handler = try pool.pipeline.syncOperations.handler(type: ServerPoolConnectionHandler.self)
                let context = try pool.pipeline.syncOperations.context(handler: handler)
                handedOff = handler.handOff(context: context)
            } catch {
                handedOff = false
            }
            guard handedOff else {
                // The pool connection died meanwhile: the user takes the next one, first in line.
                let action = self.updating {
                    $0.machine.userArrived(ticket: user.ticket, user: user, retry: true)
                }
                if case .wait = action {
                    self.scheduleWaitTimeout(ticket: user.ticket, on: user.channel.eventLoop)
                }
                self.perform(action)
                return
            }
            guard let control = self.state.withLock({ $0.control }) else {
                pool.close(promise: nil)
                user.channel.close(promise: nil)
                return
            }
            GlueHandler.connect(pool, to: user.channel)
            var line = control.allocator.buffer(capacity: 20)
            Signal.launch(id).write(to: &line)
            control.writeAndFlush(line, promise: nil)
            self.logger.debug("launch sent", metadata: ["np.pool.id": "\(id)"])
            TunnelMetrics.record(self.metrics.newConnectionDuration, since: user.arrived)
            GlueHandler.connect(user.channel, to: pool)
        }
    }

    /// Shutting down: closes the control channel, the idle pool and the waiting users.
    func close() {
        let (control, drained) = self.updating { state in
            let control = state.control
            state.control = nil
            return (control, state.machine.drain())
        }
        control?.close(promise: nil)
        for connection in drained.connections { connection.close(promise: nil) }
        for user in drained.users { user.channel.close(promise: nil) }
    }
}
