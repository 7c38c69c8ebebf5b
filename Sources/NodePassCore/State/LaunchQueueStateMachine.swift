import DequeModule

/// The side with the users (the server in reverse mode, the client in forward mode): idle pool connections
/// waiting for a user, and users waiting for a pool connection.
///
/// Pure bookkeeping, generic over what a connection and a waiting user are, so that it can be tested
/// without sockets. The oldest idle connection is handed out first; the oldest waiting user is served first.
public struct LaunchQueueStateMachine<Connection, User> {
    /// What the caller must do after an event.
    public enum Action {
        /// Keep the connection idle.
        case keep
        /// Relay `user` over `connection` (send `launch://id` first).
        case relay(id: PoolID, connection: Connection, user: User)
        /// Close this pool connection: the pool is full.
        case close(Connection)
        /// The user waits for a pool connection; schedule its timeout.
        case wait
    }

    @usableFromInline var idle = Deque<(id: PoolID, connection: Connection)>()
    /// How many entries of `idle` have each ID (two admissions may draw the same ID), so that the checks
    /// made for every new pool connection do not walk the pool.
    @usableFromInline var idleIDs: [PoolID: Int] = [:]
    @usableFromInline var waiting = Deque<(ticket: UInt64, user: User)>()
    /// The most idle connections kept.
    public let maximumIdle: Int

    /// Makes an empty pool keeping at most `maximumIdle` idle connections.
    @inlinable
    public init(maximumIdle: Int) {
        self.maximumIdle = max(1, maximumIdle)
    }

    /// The number of idle pool connections.
    @inlinable
    public var idleCount: Int { self.idle.count }
    /// The number of idle pool connections that `belongs` accepts.
    @inlinable
    public func idleCount(where belongs: (Connection) -> Bool) -> Int {
        self.idle.reduce(0) { $0 + (belongs($1.connection) ? 1 : 0) }
    }

    /// The number of users waiting for a pool connection.
    @inlinable
    public var waitingCount: Int { self.waiting.count }

    /// True when a new pool connection would be closed at once: the idle pool is full and nobody waits.
    @inlinable
    public var isFull: Bool {
        self.idle.count >= self.maximumIdle && self.waiting.isEmpty
    }

    /// True when an idle connection already has this ID (draw another one).
    @inlinable
    public func isInUse(_ id: PoolID) -> Bool {
        self.idleIDs[id] != nil
    }

    /// A pool connection was opened and its ID sent.
    @inlinable
    public mutating func poolConnectionReady(id: PoolID, connection: Connection) -> Action {
        if let waiter = self.waiting.popFirst() {
            return .relay(id: id, connection: connection, user: waiter.user)
        }
        guard self.idle.count < self.maximumIdle else {
            return .close(connection)
        }
        self.idle.append((id, connection))
        self.idleIDs[id, default: 0] += 1
        return .keep
    }

    /// An idle pool connection closed or misbehaved; it is forgotten. Returns whether it was idle.
    @discardableResult
    @inlinable
    public mutating func poolConnectionClosed(id: PoolID) -> Bool {
        guard self.idleIDs[id] != nil, let index = self.idle.firstIndex(where: { $0.id == id }) else { return false }
        self.idle.remove(at: index)
        self.forget(id)
        return true
    }

    /// Takes the oldest idle connection that `accepts` (for a datagram carrier), if any.
    @inlinable
    public mutating func takeIdle(where accepts: (Connection) -> Bool) -> (id: PoolID, connection: Connection)? {
        guard let index = self.idle.firstIndex(where: { accepts($0.connection) }) else { return nil }
        let taken = self.idle.remove(at: index)
        self.forget(taken.id)
        return taken
    }

    /// One idle entry with `id` left the pool.
    @inlinable
    mutating func forget(_ id: PoolID) {
        guard let count = self.idleIDs[id] else { return }
        self.idleIDs[id] = count > 1 ? count - 1 : nil
    }

    /// A user connected; `ticket` identifies it for a later timeout. `retry` puts it first in line.
    @inlinable
    public mutating func userArrived(ticket: UInt64, user: User, retry: Bool = false) -> Action {
        if let first = self.idle.popFirst() {
            self.forget(first.id)
            return .relay(id: first.id, connection: first.connection, user: user)
        }
        if retry {
            self.waiting.prepend((ticket, user))
        } else {
            self.waiting.append((ticket, user))
        }
        return .wait
    }

    /// A waiting user's time is up or it went away; returns the user if it was still waiting.
    @inlinable
    public mutating func userLeft(ticket: UInt64) -> User? {
        guard let index = self.waiting.firstIndex(where: { $0.ticket == ticket }) else { return nil }
        return self.waiting.remove(at: index).user
    }

    /// The control channel is gone: every idle connection is returned to be closed. Waiting users stay.
    @inlinable
    public mutating func controlLost() -> [Connection] {
        let connections = self.idle.map(\.connection)
        self.idle.removeAll()
        self.idleIDs.removeAll()
        return connections
    }

    /// One client's control channel is gone: its idle connections are returned to be closed. Waiting
    /// users stay: they go to the next idle connection of any client.
    @inlinable
    public mutating func controlLost(where belongs: (Connection) -> Bool) -> [Connection] {
        var lost: [Connection] = []
        var lostIDs: [PoolID] = []
        self.idle.removeAll { entry in
            guard belongs(entry.connection) else { return false }
            lost.append(entry.connection)
            lostIDs.append(entry.id)
            return true
        }
        for id in lostIDs { self.forget(id) }
        return lost
    }

    /// Shutting down: everything is returned to be closed.
    @inlinable
    public mutating func drain() -> (connections: [Connection], users: [User]) {
        let result = (self.idle.map(\.connection), self.waiting.map(\.user))
        self.idle.removeAll()
        self.idleIDs.removeAll()
        self.waiting.removeAll()
        return result
    }
}

extension LaunchQueueStateMachine: Sendable where Connection: Sendable, User: Sendable {}
