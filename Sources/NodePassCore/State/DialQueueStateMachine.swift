/// What a launch asks of a pool connection.
public enum PoolLaunch: Hashable, Sendable {
    /// Relay one TCP connection (`launch`).
    case stream
    /// Carry datagrams (`launch datagrams`, `nodepass/2.1`).
    case datagrams
}

/// The side that dials the target (the client in reverse mode, the server in forward mode): idle pool
/// connections kept by ID until the other side launches them, and launches that came before their
/// connection was ready.
///
/// A launch and the connection it names travel on different TCP connections, so either may come first: a
/// launch for an ID not yet ready waits (a bounded number of them, each until `launchExpired`). Every
/// connection and launch has an owner (a client session on the server, a pool generation on the client):
/// a launch takes only a connection of its own owner. Pure bookkeeping, generic over what a connection is.
public struct DialQueueStateMachine<Connection> {
    /// What the caller must do with a connection that became ready.
    public enum ReadyAction {
        /// Keep it idle until its launch.
        case keep
        /// Its launch came first: serve it now, as that launch said (dial the target, or carry datagrams).
        case dial(Connection, PoolLaunch)
        /// Close it: its ID is taken by another idle connection, or the pool is full.
        case close(Connection)
    }

    /// What the caller must do when bytes came on an idle connection before its launch.
    public enum ClaimAction {
        /// It counts as used from now on (the first time); keep it for its launch.
        case counted
        /// Nothing: it was counted before, or is not idle.
        case none
        /// Too many connections were used without a launch: close this one (it counts as used).
        case close(Connection)
    }

    /// What the caller must do after a launch.
    public enum LaunchAction {
        /// Dial the target for this connection. `wasClaimed`: it had already been counted as used.
        case dial(Connection, wasClaimed: Bool)
        /// Not ready yet: wait for it until the launch expires.
        case awaitConnection
        /// No such connection and no room to wait: ignore the launch (and log).
        case unknown
    }

    @usableFromInline
    struct Entry {
        @usableFromInline var connection: Connection
        @usableFromInline var owner: UInt64
        /// The other side already used it (bytes came before the launch).
        @usableFromInline var claimed = false

        @inlinable
        init(connection: Connection, owner: UInt64) {
            self.connection = connection
            self.owner = owner
        }
    }

    @usableFromInline var idle: [PoolID: Entry] = [:]
    @usableFromInline var awaited: [PoolID: (owner: UInt64, launch: PoolLaunch)] = [:]
    /// The most idle connections kept.
    public let maximumIdle: Int
    /// The most launches waiting for their connection.
    public let maximumAwaited: Int
    /// The most idle connections that the other side used without launching them (each holds the bytes
    /// that came, up to a bound): a peer that uses connections and never launches them cannot make this
    /// side hold more.
    public let maximumClaimed: Int
    @usableFromInline var claimedEntries = 0
    /// The idle connections that are claimed.
    @inlinable
    public var claimedCount: Int { self.claimedEntries }

    /// Makes an empty queue keeping at most `maximumIdle` idle connections (`maximumClaimed` of them
    /// claimed) and `maximumAwaited` early launches.
    @inlinable
    public init(maximumIdle: Int, maximumAwaited: Int, maximumClaimed: Int = .max) {
        self.maximumIdle = max(1, maximumIdle)
        self.maximumAwaited = max(0, maximumAwaited)
        self.maximumClaimed = max(1, maximumClaimed)
    }

    /// The number of idle connections (claimed ones included).
    @inlinable
    public var idleCount: Int { self.idle.count }
    /// The number of idle connections of `owner`.
    @inlinable
    public func idleCount(owner: UInt64) -> Int {
        self.idle.values.reduce(0) { $0 + ($1.owner == owner ? 1 : 0) }
    }
    /// The number of launches waiting for their connection.
    @inlinable
    public var awaitedCount: Int { self.awaited.count }
    /// True when a new connection would be closed at once.
    @inlinable
    public var isFull: Bool { self.idle.count >= self.maximumIdle }
    /// True when an idle connection already has this ID.
    @inlinable
    public func isInUse(_ id: PoolID) -> Bool { self.idle[id] != nil }

    /// The connection `id` of `owner` is ready (it has its ID and, in v2, its confirmation).
    @inlinable
    public mutating func connectionReady(id: PoolID, owner: UInt64, connection: Connection) -> ReadyAction {
        if let awaited = self.awaited[id], awaited.owner == owner {
            self.awaited[id] = nil
            return .dial(connection, awaited.launch)
        }
        guard self.idle[id] == nil, self.idle.count < self.maximumIdle else { return .close(connection) }
        self.idle[id] = Entry(connection: connection, owner: owner)
        return .keep
    }

    /// `owner` launched `id`, for a TCP connection (`.stream`) or as a datagram carrier.
    @inlinable
    public mutating func launchReceived(id: PoolID, owner: UInt64, launch: PoolLaunch = .stream) -> LaunchAction {
        if let entry = self.idle[id], entry.owner == owner {
            self.idle[id] = nil
            if entry.claimed { self.claimedEntries -= 1 }
            return .dial(entry.connection, wasClaimed: entry.claimed)
        }
        guard self.idle[id] == nil, self.awaited[id] == nil, self.awaited.count < self.maximumAwaited else {
            return .unknown
        }
        self.awaited[id] = (owner, launch)
        return .awaitConnection
    }

    /// The wait of `owner`'s launch of `id` is over; true when it was still waiting (it is dropped).
    @inlinable
    public mutating func launchExpired(id: PoolID, owner: UInt64) -> Bool {
        guard self.awaited[id]?.owner == owner else { return false }
        self.awaited[id] = nil
        return true
    }

    /// Bytes came on the idle connection `id` before its launch: counted as used the first time, or
    /// closed when `maximumClaimed` connections already wait for their launch.
    @inlinable
    public mutating func connectionClaimed(id: PoolID) -> ClaimAction {
        guard let entry = self.idle[id], !entry.claimed else { return .none }
        guard self.claimedEntries < self.maximumClaimed else {
            self.idle[id] = nil
            return .close(entry.connection)
        }
        self.idle[id]?.claimed = true
        self.claimedEntries += 1
        return .counted
    }

    /// The idle connection `id` closed, if `matches` it (another connection may have drawn the same ID and
    /// been refused). Returns nil when it was not idle, else whether it had been claimed.
    @inlinable
    public mutating func connectionClosed(id: PoolID, where matches: (Connection) -> Bool) -> Bool? {
        guard let entry = self.idle[id], matches(entry.connection) else { return nil }
        self.idle[id] = nil
        if entry.claimed { self.claimedEntries -= 1 }
        return entry.claimed
    }

    /// `owner` is gone: its idle connections are returned to be closed and its launches forgotten.
    @inlinable
    public mutating func ownerLost(_ owner: UInt64) -> [Connection] {
        self.awaited = self.awaited.filter { $0.value.owner != owner }
        let lost = self.idle.filter { $0.value.owner == owner }
        for (id, entry) in lost {
            self.idle[id] = nil
            if entry.claimed { self.claimedEntries -= 1 }
        }
        return lost.values.map(\.connection)
    }

    /// Shutting down or restarting: every idle connection is returned to be closed.
    @inlinable
    public mutating func drain() -> [Connection] {
        defer {
            self.idle.removeAll()
            self.awaited.removeAll()
            self.claimedEntries = 0
        }
        return self.idle.values.map(\.connection)
    }
}

extension DialQueueStateMachine: Sendable where Connection: Sendable {}
extension DialQueueStateMachine.Entry: Sendable where Connection: Sendable {}
