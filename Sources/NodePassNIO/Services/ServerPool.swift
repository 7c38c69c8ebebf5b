import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// A user connection waiting for a pool connection on the side with the users.
struct WaitingUser: Sendable {
    var ticket: UInt64
    var channel: any Channel
    var arrived: NIODeadline
}

/// The server's shared pool: the clients' control channels, idle pool connections and waiting users.
///
/// Called from every event loop; the bookkeeping is a `ServerPoolStateMachine` under a mutex, and each
/// action runs on the event loop of the channel it touches. v1 has one client at a time (a newer one
/// replaces it); v2 has up to `maximumClients`, each owning its idle pool connections, and a user takes the
/// oldest idle connection of any client.
final class ServerPool: ServerPoolConnectionDelegate, ServerV2SessionRegistry, Sendable {
    /// An idle pool connection and the client session that owns it.
    struct PoolEntry: Sendable {
        var channel: any Channel
        var owner: UInt64
    }

    private struct Session {
        var control: any Channel
        /// The launches of this client, coalesced.
        var signals: SignalWriter
        var peerIP: String?
        var v2: (id: [UInt8], secret: V2SessionSecret)?
    }

    private struct State {
        var machine: ServerPoolStateMachine<PoolEntry, WaitingUser>
        var sessions: [UInt64: Session] = [:]
        var v2SessionNumbers: [[UInt8]: UInt64] = [:]
        var nextSession: UInt64 = 0
        var nextTicket: UInt64 = 0
        var controlsSeen = 0
        /// Forward mode: launches that came before their pool connection's confirmation (ID → owner).
        var awaitedLaunches: [PoolID: UInt64] = [:]

        func session(of channel: any Channel) -> UInt64? {
            self.sessions.first { $0.value.control === channel }?.key
        }
    }

    /// The most v2 clients served at once.
    static let maximumClients = 64

    private let state: Locked<State>
    private let configuration: Configuration
    private let logger: Logger
    private let metrics: TunnelMetrics

    /// Whether launches go out as v2 frames (else as v1 lines).
    private let isV2: Bool
    /// Forward mode: clients launch, and the server dials `target` (with `sessions` bounding the relays).
    private let forward = Locked<(target: HostPort, sessions: SessionTracker)?>(nil)

    init(configuration: Configuration, isV2: Bool, metrics: TunnelMetrics, logger: Logger) {
        self.isV2 = isV2
        self.configuration = configuration
        self.metrics = metrics
        self.logger = logger
        self.state = Locked(State(machine: ServerPoolStateMachine(maximumIdle: configuration.maxPoolCapacity)))
    }

    var idleCount: Int { self.state.withLock { $0.machine.idleCount } }
    /// The number of clients connected.
    var clientCount: Int { self.state.withLock { $0.sessions.count } }

    /// Changes the state under the lock, then publishes the idle pool size, so that no change is missed.
    private func updating<Result>(_ body: (inout State) -> Result) -> Result {
        self.state.withLock { state in
            defer { self.metrics.poolIdle.set(state.machine.idleCount) }
            return body(&state)
        }
    }

    // MARK: control channels

    /// A v1 client finished its TLS handshake: it becomes the client; a previous one is closed.
    func controlConnected(_ channel: any Channel) {
        let (previous, stale, isReconnect) = self.updating { state in
            let previous = state.sessions.values.map(\.control)
            state.sessions.removeAll()
            let stale = previous.isEmpty ? [] : state.machine.controlLost()
            state.nextSession += 1
            state.sessions[state.nextSession] = Session(
                control: channel,
                signals: SignalWriter(channel: channel),
                peerIP: Self.normalizedIP(channel.remoteAddress)
            )
            state.controlsSeen += 1
            return (previous, stale, state.controlsSeen > 1)
        }
        if isReconnect { self.metrics.reconnects.increment() }
        for control in previous {
            self.logger.warning(
                "control connection replaced by a newer client",
                metadata: ["np.peer": "\(channel.peerDescription)"]
            )
            control.close(promise: nil)
        }
        for entry in stale { entry.channel.close(promise: nil) }
    }

    func v2SessionStarted(_ channel: any Channel, sessionID: [UInt8], secret: V2SessionSecret) -> Bool {
        let (admitted, isReconnect) = self.updating { state -> (Bool, Bool) in
            guard state.sessions.count < Self.maximumClients, state.v2SessionNumbers[sessionID] == nil else {
                return (false, false)
            }
            state.nextSession += 1
            state.sessions[state.nextSession] = Session(
                control: channel,
                signals: SignalWriter(channel: channel),
                peerIP: Self.normalizedIP(channel.remoteAddress),
                v2: (sessionID, secret)
            )
            state.v2SessionNumbers[sessionID] = state.nextSession
            state.controlsSeen += 1
            return (true, state.controlsSeen > 1)
        }
        if isReconnect { self.metrics.reconnects.increment() }
        return admitted
    }

    /// The secret of the v2 session `sessionID`, if it is connected.
    func secret(forSession sessionID: [UInt8]) -> V2SessionSecret? {
        self.state.withLock { state in
            state.v2SessionNumbers[sessionID].flatMap { state.sessions[$0]?.v2?.secret }
        }
    }

    /// A control channel closed; if it was a client's, that client's idle pool goes with it.
    func controlClosed(_ channel: any Channel) {
        let result = self.updating { state -> (stale: [PoolEntry], remaining: Int)? in
            guard let number = state.session(of: channel), let session = state.sessions.removeValue(forKey: number) else {
                return nil
            }
            if let v2 = session.v2 { state.v2SessionNumbers[v2.id] = nil }
            return (state.machine.controlLost { $0.owner == number }, state.sessions.count)
        }
        guard let result else { return }
        self.logger.warning(
            "client disconnected",
            metadata: ["np.pool.closed": "\(result.stale.count)", "np.clients": "\(result.remaining)"]
        )
        for entry in result.stale { entry.channel.close(promise: nil) }
    }

    /// Switches to forward mode before any client connects: launches come from clients, the server dials.
    func serveForward(target: HostPort, sessions: SessionTracker) {
        self.forward.withLock { $0 = (target, sessions) }
        // Each client keeps up to MAX_POOL_CAPACITY idle connections of its own.
        let maximum = self.configuration.maxPoolCapacity * Self.maximumClients
        self.updating { $0.machine = ServerPoolStateMachine(maximumIdle: maximum) }
    }

    func launchReceived(_ id: PoolID, from channel: any Channel) {
        var logger = self.logger
        logger[metadataKey: "np.pool.id"] = "\(id)"
        guard self.forward.withLock({ $0 }) != nil else {
            logger.warning("launch from a client ignored: this server has the users (reverse mode)")
            return
        }
        enum Outcome {
            case relay(PoolEntry)
            case awaitConfirmation
            case unknown
        }
        let outcome = self.updating { state -> Outcome in
            guard let owner = state.session(of: channel) else { return .unknown }
            if let entry = state.machine.takeIdle(id: id, where: { $0.owner == owner }) { return .relay(entry) }
            // The confirmation may still be in flight on the pool connection (another TCP connection than
            // the launch's): wait for it, within the time a confirmation may take.
            guard state.awaitedLaunches.count < self.configuration.maxPoolCapacity else { return .unknown }
            state.awaitedLaunches[id] = owner
            return .awaitConfirmation
        }
        switch outcome {
        case .relay(let entry):
            self.dialTarget(for: entry, id: id)
        case .unknown:
            logger.warning("launch for an unknown pool connection ignored")
        case .awaitConfirmation:
            let logger = logger
            channel.eventLoop.scheduleTask(in: self.configuration.idReadTimeout) {
                let expired = self.state.withLock { $0.awaitedLaunches.removeValue(forKey: id) != nil }
                if expired { logger.warning("launch for an unknown pool connection ignored") }
            }
        }
    }

    /// Forward mode: the server dials its TARGET for a launched pool connection and relays.
    private func dialTarget(for entry: PoolEntry, id: PoolID) {
        guard let forward = self.forward.withLock({ $0 }) else { return }
        let pool = entry.channel
        TargetRelay.start(
            pool: pool,
            id: id,
            target: forward.target,
            dialTimeout: self.configuration.dialTimeout,
            sessions: forward.sessions,
            metrics: self.metrics,
            logger: self.logger
        ) { target in
            guard let handler = try? pool.pipeline.syncOperations.handler(type: ServerPoolConnectionHandler.self),
                let context = try? pool.pipeline.syncOperations.context(handler: handler)
            else { return false }
            return handler.handOff(context: context, to: target)
        }
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

    func poolConnectionAccepted(_ channel: any Channel, authentication: V2PoolAuthenticated?) -> PoolAdmission? {
        // Only v1 checks the address (v2 connections prove their session instead).
        let peerIP = authentication == nil ? Self.normalizedIP(channel.remoteAddress) : nil
        let isForward = self.forward.withLock { $0 != nil }
        var refusal: (reason: Logger.Message, warn: Bool)?
        let admitted = self.state.withLock { state -> (PoolID, UInt64, V2SessionSecret?)? in
            guard !state.sessions.isEmpty else {
                refusal = ("pool connection refused: no client", false)
                return nil
            }
            guard !state.machine.isFull else {
                refusal = ("pool connection refused: pool full", false)
                return nil
            }
            let owner: UInt64
            var secret: V2SessionSecret?
            if let authentication {
                guard let number = state.v2SessionNumbers[authentication.sessionID],
                    let session = state.sessions[number]
                else {
                    refusal = ("pool connection refused: its session has ended", false)
                    return nil
                }
                owner = number
                secret = session.v2?.secret
                // In forward mode each client uses only its own pool connections: no client may take the
                // others' share of the pool.
                if isForward, state.machine.idleCount(where: { $0.owner == number }) >= self.configuration.maxPoolCapacity {
                    refusal = ("pool connection refused: this client's pool is full", false)
                    return nil
                }
            } else {
                guard let (number, session) = state.sessions.first, session.v2 == nil, peerIP != nil,
                    peerIP == session.peerIP
                else {
                    refusal = ("pool connection refused: not from the client's address", true)
                    return nil
                }
                owner = number
            }
            refusal = nil
            for _ in 0..<8 {
                let id = PoolID.random()
                if !state.machine.isInUse(id) { return (id, owner, secret) }
            }
            return nil
        }
        if let refusal {
            let metadata: Logger.Metadata = ["np.peer": "\(peerIP ?? Self.normalizedIP(channel.remoteAddress) ?? "?")"]
            if refusal.warn {
                self.logger.warning(refusal.reason, metadata: metadata)
            } else {
                self.logger.debug(refusal.reason, metadata: metadata)
            }
        }
        guard let (id, owner, secret) = admitted else { return nil }
        var opening = channel.allocator.buffer(capacity: V2PoolOpening.serverMessageLength)
        var confirmation: [UInt8]?
        if let authentication, let secret {
            opening.writeBytes(V2PoolOpening.serverMessage(id: id, secret: secret, nonce: authentication.nonce))
            confirmation = secret.poolConfirmation(nonce: authentication.nonce, id: id)
        } else {
            id.write(to: &opening)
        }
        return PoolAdmission(id: id, opening: opening, owner: owner, confirmation: confirmation)
    }

    func poolConnectionReady(_ channel: any Channel, admission: PoolAdmission) {
        let entry = PoolEntry(channel: channel, owner: admission.owner)
        let launched = self.updating { state -> ServerPoolStateMachine<PoolEntry, WaitingUser>.Action? in
            // Its client may have left while the connection was being confirmed.
            guard state.sessions[admission.owner] != nil else { return .close(entry) }
            if state.awaitedLaunches[admission.id] == admission.owner {
                state.awaitedLaunches[admission.id] = nil
                return nil
            }
            return state.machine.poolConnectionReady(id: admission.id, connection: entry)
        }
        guard let action = launched else {
            self.dialTarget(for: entry, id: admission.id)
            return
        }
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
        let (ticket, action) = self.updating { state -> (UInt64, ServerPoolStateMachine<PoolEntry, WaitingUser>.Action) in
            state.nextTicket += 1
            let user = WaitingUser(ticket: state.nextTicket, channel: channel, arrived: .now())
            return (state.nextTicket, state.machine.userArrived(ticket: user.ticket, user: user))
        }
        if case .wait = action {
            self.logger.debug("user waits for a pool connection", metadata: ["np.peer": "\(channel.peerDescription)"])
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

    private func perform(_ action: ServerPoolStateMachine<PoolEntry, WaitingUser>.Action) {
        switch action {
        case .keep, .wait:
            break
        case .close(let entry):
            entry.channel.close(promise: nil)
        case .relay(let id, let connection, let user):
            self.relay(id: id, entry: connection, user: user)
        }
    }

    private func relay(id: PoolID, entry: PoolEntry, user: WaitingUser) {
        let pool = entry.channel
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
                // The pool connection died meanwhile: the user takes the next one.
                self.retry(user)
                return
            }
            guard let signals = self.state.withLock({ $0.sessions[entry.owner]?.signals }) else {
                // That client left meanwhile: the user takes the next pool connection of any client.
                pool.close(promise: nil)
                self.retry(user)
                return
            }
            GlueHandler.connect(pool, to: user.channel)
            signals.send { buffer in
                if self.isV2 {
                    V2Message.launch(id).write(to: &buffer)
                } else {
                    Signal.launch(id).write(to: &buffer)
                }
            }
            self.logger.debug("launch sent", metadata: ["np.pool.id": "\(id)"])
            TunnelMetrics.record(self.metrics.newConnectionDuration, since: user.arrived)
            GlueHandler.connect(user.channel, to: pool)
        }
    }

    /// Puts a user whose pool connection failed first in line for the next one.
    private func retry(_ user: WaitingUser) {
        let action = self.updating { $0.machine.userArrived(ticket: user.ticket, user: user, retry: true) }
        if case .wait = action {
            self.scheduleWaitTimeout(ticket: user.ticket, on: user.channel.eventLoop)
        }
        self.perform(action)
    }

    /// Shutting down: closes the control channel, the idle pool and the waiting users.
    func close() {
        let (controls, drained) = self.updating { state in
            let controls = state.sessions.values.map(\.control)
            state.sessions.removeAll()
            state.v2SessionNumbers.removeAll()
            return (controls, state.machine.drain())
        }
        for control in controls { control.close(promise: nil) }
        for entry in drained.connections { entry.channel.close(promise: nil) }
        for user in drained.users { user.channel.close(promise: nil) }
    }
}
