/// The server's client sessions, and the admission of each pool connection to one of them.
///
/// v1 has one client at a time: a newer one replaces it, and a pool connection is admitted only from the
/// current client's address. v2 has up to `maximumClients` authenticated sessions, and a pool connection is
/// admitted for the session it proved. Pure bookkeeping, generic over what a control channel is.
public struct ServerSessionsStateMachine<Control> {
    /// One connected client.
    public struct Session {
        /// Its control channel.
        public var control: Control
        /// The address its control channel came from (v1 checks pool connections against it).
        public var peerIP: String?
        /// v2: the session ID and secret its pool connections prove.
        public var v2: (id: [UInt8], secret: V2SessionSecret)?

        @inlinable
        init(control: Control, peerIP: String?, v2: (id: [UInt8], secret: V2SessionSecret)? = nil) {
            self.control = control
            self.peerIP = peerIP
            self.v2 = v2
        }
    }

    /// What a new pool connection shows.
    public enum Credential: Sendable {
        /// v1: only its address.
        case v1(peerIP: String?)
        /// v2: the session it proved (the proof is checked before).
        case v2(sessionID: [UInt8])
    }

    /// Why a pool connection was refused.
    public enum Refusal: Hashable, Sendable {
        /// No client is connected.
        case noClient
        /// The idle pool is full and nobody waits.
        case poolFull
        /// The session it proved has ended.
        case sessionEnded
        /// Its client has as many idle connections as it may (forward mode).
        case clientPoolFull
        /// v1: it does not come from the client's address.
        case notFromClientAddress
        /// No unused ID was drawn.
        case noFreeID
    }

    /// The decision on a new pool connection.
    public enum Admission {
        /// Admit it as `id`, for the client session `owner` (v2: with that session's secret).
        case admit(id: PoolID, owner: UInt64, secret: V2SessionSecret?)
        /// Refuse it (close it).
        case refuse(Refusal)
    }

    /// What the admission needs to know of the idle pool.
    public struct PoolOccupancy {
        /// The idle pool is full and nobody waits.
        public var isFull: Bool
        /// Each client may keep at most this many idle connections (forward mode), nil: no such bound.
        public var perClientLimit: Int?
        /// The number of idle connections of a client.
        public var idleCount: (UInt64) -> Int
        /// Whether an idle connection has this ID.
        public var isInUse: (PoolID) -> Bool

        /// Makes a view of the idle pool.
        public init(
            isFull: Bool,
            perClientLimit: Int?,
            idleCount: @escaping (UInt64) -> Int,
            isInUse: @escaping (PoolID) -> Bool
        ) {
            self.isFull = isFull
            self.perClientLimit = perClientLimit
            self.idleCount = idleCount
            self.isInUse = isInUse
        }
    }

    /// How many ID draws an admission makes before it gives up.
    public static var idDraws: Int { 8 }

    @usableFromInline var sessions: [UInt64: Session] = [:]
    @usableFromInline var v2Owners: [[UInt8]: UInt64] = [:]
    @usableFromInline var lastOwner: UInt64 = 0
    @usableFromInline var controlsSeen = 0
    /// Set by `closeAll()`: the server is shutting down and no session starts any more.
    @usableFromInline var closed = false

    /// Whether the server is shutting down (`closeAll()` was called): no session starts any more.
    @inlinable public var isClosed: Bool { self.closed }
    /// The most v2 clients at once.
    public let maximumClients: Int

    /// Makes an empty table serving at most `maximumClients` v2 clients.
    @inlinable
    public init(maximumClients: Int) {
        self.maximumClients = maximumClients
    }

    /// The number of connected clients.
    @inlinable
    public var count: Int { self.sessions.count }

    /// The connected clients whose control channel `matches`.
    @inlinable
    public func owners(where matches: (Control) -> Bool) -> Set<UInt64> {
        Set(self.sessions.filter { matches($0.value.control) }.keys)
    }

    /// The session `owner`, if it is connected.
    @inlinable
    public func session(_ owner: UInt64) -> Session? { self.sessions[owner] }

    /// The owner of the first session whose control channel `matches`.
    @inlinable
    public func owner(where matches: (Control) -> Bool) -> UInt64? {
        self.sessions.first { matches($0.value.control) }?.key
    }

    /// The secret of the v2 session `sessionID`, if it is connected.
    @inlinable
    public func secret(forSession sessionID: [UInt8]) -> V2SessionSecret? {
        self.v2Owners[sessionID].flatMap { self.sessions[$0]?.v2?.secret }
    }

    @inlinable
    mutating func add(_ session: Session) -> (owner: UInt64, isReconnect: Bool) {
        self.lastOwner += 1
        self.sessions[self.lastOwner] = session
        self.controlsSeen += 1
        return (self.lastOwner, self.controlsSeen > 1)
    }

    /// A v1 client finished its TLS handshake: it becomes the client, and the previous ones are returned to be
    /// closed (their idle pool connections go too). Nil once the server is shutting down: a handshake that
    /// finishes then must not leave a session behind (its control channel is to be closed).
    @inlinable
    public mutating func v1ClientConnected(
        _ control: Control,
        peerIP: String?
    ) -> (owner: UInt64, replaced: [(owner: UInt64, control: Control)], isReconnect: Bool)? {
        guard !self.closed else { return nil }
        let replaced = self.sessions.map { (owner: $0.key, control: $0.value.control) }
        self.sessions.removeAll()
        self.v2Owners.removeAll()
        let (owner, isReconnect) = self.add(Session(control: control, peerIP: peerIP))
        return (owner, replaced, isReconnect)
    }

    /// A v2 client proved the key; nil when it is refused (too many clients, its session ID is taken, or the
    /// server is shutting down).
    @inlinable
    public mutating func v2ClientAuthenticated(
        _ control: Control,
        peerIP: String?,
        sessionID: [UInt8],
        secret: V2SessionSecret
    ) -> (owner: UInt64, isReconnect: Bool)? {
        guard !self.closed, self.sessions.count < self.maximumClients, self.v2Owners[sessionID] == nil else {
            return nil
        }
        let added = self.add(Session(control: control, peerIP: peerIP, v2: (sessionID, secret)))
        self.v2Owners[sessionID] = added.owner
        return added
    }

    /// The control channel of `owner` closed: its session ends.
    @inlinable
    public mutating func controlClosed(_ owner: UInt64) -> Session? {
        guard let session = self.sessions.removeValue(forKey: owner) else { return nil }
        if let v2 = session.v2 { self.v2Owners[v2.id] = nil }
        return session
    }

    /// Shutting down: every session ends, and no other starts; their control channels are returned to be
    /// closed.
    @inlinable
    public mutating func closeAll() -> [Control] {
        self.closed = true
        defer {
            self.sessions.removeAll()
            self.v2Owners.removeAll()
        }
        return self.sessions.values.map(\.control)
    }

    /// A pool connection was accepted (v1) or proved its session (v2): admit it with a fresh ID, or refuse it.
    @inlinable
    public func admitPoolConnection(
        _ credential: Credential,
        pool: PoolOccupancy,
        drawID: () -> PoolID
    ) -> Admission {
        guard !self.sessions.isEmpty else { return .refuse(.noClient) }
        guard !pool.isFull else { return .refuse(.poolFull) }
        let owner: UInt64
        var secret: V2SessionSecret?
        switch credential {
        case .v2(let sessionID):
            guard let number = self.v2Owners[sessionID], let session = self.sessions[number] else {
                return .refuse(.sessionEnded)
            }
            owner = number
            secret = session.v2?.secret
            // No client may take the others' share of the pool.
            if let limit = pool.perClientLimit, pool.idleCount(number) >= limit {
                return .refuse(.clientPoolFull)
            }
        case .v1(let peerIP):
            guard let (number, session) = self.sessions.first, session.v2 == nil, peerIP != nil,
                peerIP == session.peerIP
            else { return .refuse(.notFromClientAddress) }
            owner = number
        }
        for _ in 0..<Self.idDraws {
            let id = drawID()
            if !pool.isInUse(id) { return .admit(id: id, owner: owner, secret: secret) }
        }
        return .refuse(.noFreeID)
    }
}

extension ServerSessionsStateMachine: Sendable where Control: Sendable {}
extension ServerSessionsStateMachine.Session: Sendable where Control: Sendable {}
