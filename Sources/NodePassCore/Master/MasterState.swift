/// What a master keeps on disk: its identity and every instance with what the API shows of it. Encoded as
/// JSON by the master; every value read back is checked (`validated()`), since the file may be damaged or
/// edited by hand.
public struct MasterState: Codable, Hashable, Sendable {
    /// The format of this value; a file of another version is refused rather than misread.
    public static let currentVersion = 1
    /// The longest alias, peer field, tag key or tag value (as NodePass's master).
    public static let maximumFieldLength = 256
    /// The most tags an instance carries.
    public static let maximumTags = 64
    /// The most instances one master runs.
    public static let maximumInstances = 1024

    public var version: Int
    public var master: MasterIdentity
    /// In the order they were created.
    public var instances: [InstanceRecord]

    /// A new master's state: a fresh identity, no instances.
    public init(master: MasterIdentity) {
        self.version = Self.currentVersion
        self.master = master
        self.instances = []
    }

    /// This state if it keeps every rule; else an `.invalidState` error that says which rule it breaks.
    public func validated() throws(NodePassError) -> MasterState {
        guard self.version == Self.currentVersion else {
            throw NodePassError(.invalidState, "state format \(self.version) is not \(Self.currentVersion)")
        }
        guard Self.isHex(self.master.apiKey, count: 32), Self.isHex(self.master.masterID, count: 16) else {
            throw NodePassError(.invalidState, "the API key or the master ID is not lowercase hex of its length")
        }
        try Self.checkLength(self.master.alias, "the master's alias")
        guard self.instances.count <= Self.maximumInstances else {
            throw NodePassError(.invalidState, "more than \(Self.maximumInstances) instances")
        }
        var seen = Set<String>()
        for instance in self.instances {
            guard Self.isHex(instance.id, count: 8), seen.insert(instance.id).inserted else {
                throw NodePassError(.invalidState, "instance ID '\(instance.id.prefix(16))' is malformed or repeated")
            }
            try instance.validate()
        }
        return self
    }

    static func isHex(_ text: String, count: Int) -> Bool {
        text.utf8.count == count && text.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
    }

    static func checkLength(_ text: String, _ what: String) throws(NodePassError) {
        guard text.utf8.count <= Self.maximumFieldLength else {
            throw NodePassError(.invalidState, "\(what) is longer than \(Self.maximumFieldLength) bytes")
        }
    }
}

/// A master's identity: the API key that every request must carry, the master ID that dashboards show, and
/// the master's alias.
public struct MasterIdentity: Codable, Hashable, Sendable {
    /// 32 lowercase hex digits.
    public var apiKey: String
    /// 16 lowercase hex digits, made once.
    public var masterID: String
    public var alias: String

    public init(apiKey: String, masterID: String, alias: String = "") {
        self.apiKey = apiKey
        self.masterID = masterID
        self.alias = alias
    }

    /// A new identity from the system's secure generator.
    public static func generate() -> MasterIdentity {
        MasterIdentity(apiKey: randomHex(bytes: 16), masterID: randomHex(bytes: 8))
    }

    /// A new identity from `random` (a seeded generator in tests).
    public static func generate(using random: inout some RandomNumberGenerator) -> MasterIdentity {
        MasterIdentity(apiKey: randomHex(bytes: 16, using: &random), masterID: randomHex(bytes: 8, using: &random))
    }
}

/// `bytes` random bytes from the system's secure generator, as lowercase hex.
///
/// The system generator is used here directly rather than passed `inout` to the generic variant below: it
/// is an empty struct, and an `inout` access to an empty value has no storage of its own, which
/// ThreadSanitizer's access checks cannot follow (the test process crashed in them).
public func randomHex(bytes: Int) -> String {
    lowercaseHex(SecureRandom.bytes(bytes))
}

/// `bytes` random bytes from `random` (a seeded generator in tests), as lowercase hex.
public func randomHex(bytes: Int, using random: inout some RandomNumberGenerator) -> String {
    lowercaseHex((0..<bytes).map { _ in UInt8.random(in: .min ... .max, using: &random) })
}

/// `bytes` as lowercase hex, two digits each.
public func lowercaseHex(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef")
    var text = ""
    text.reserveCapacity(bytes.count * 2)
    for byte in bytes {
        text.append(digits[Int(byte >> 4)])
        text.append(digits[Int(byte & 0x0F)])
    }
    return text
}

/// One tunnel of a master, as saved.
public struct InstanceRecord: Codable, Hashable, Sendable {
    /// 8 lowercase hex digits.
    public var id: String
    public var alias: String
    /// The tunnel URL as the API received it (`server://…` or `client://…`).
    public var url: String
    /// Whether the instance runs again by itself after it fails.
    public var restart: Bool
    /// Whether it was running when the state was saved: it runs again when the master starts.
    public var running: Bool
    public var meta: InstanceMeta
    public var traffic: TrafficCounters

    public init(id: String, url: String, alias: String = "", restart: Bool = true, running: Bool = true) {
        self.id = id
        self.alias = alias
        self.url = url
        self.restart = restart
        self.running = running
        self.meta = InstanceMeta()
        self.traffic = TrafficCounters()
    }

    func validate() throws(NodePassError) {
        try MasterState.checkLength(self.alias, "the alias of instance \(self.id)")
        do {
            _ = try TunnelURL.parse(self.url)
        } catch {
            throw NodePassError(.invalidState, "instance \(self.id): \(error.message)")
        }
        try self.meta.validate(instance: self.id)
    }
}

/// What a dashboard attaches to an instance: its peer, and free tags.
public struct InstanceMeta: Codable, Hashable, Sendable {
    public struct Peer: Codable, Hashable, Sendable {
        public var sid: String = ""
        public var type: String = ""
        public var alias: String = ""

        public init(sid: String = "", type: String = "", alias: String = "") {
            self.sid = sid
            self.type = type
            self.alias = alias
        }

        /// A field left out is empty (a dashboard may send `"peer": {}`).
        public init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            self.sid = try container.decodeIfPresent(String.self, forKey: .sid) ?? ""
            self.type = try container.decodeIfPresent(String.self, forKey: .type) ?? ""
            self.alias = try container.decodeIfPresent(String.self, forKey: .alias) ?? ""
        }
    }

    public var peer = Peer()
    public var tags: [String: String] = [:]

    public init(peer: Peer = Peer(), tags: [String: String] = [:]) {
        self.peer = peer
        self.tags = tags
    }

    /// An `.invalidState` error when a field is too long or there are too many tags.
    public func validate(instance: String) throws(NodePassError) {
        for field in [self.peer.sid, self.peer.type, self.peer.alias] {
            try MasterState.checkLength(field, "a peer field of instance \(instance)")
        }
        guard self.tags.count <= MasterState.maximumTags else {
            throw NodePassError(.invalidState, "instance \(instance) has more than \(MasterState.maximumTags) tags")
        }
        for (key, value) in self.tags {
            try MasterState.checkLength(key, "a tag of instance \(instance)")
            try MasterState.checkLength(value, "a tag of instance \(instance)")
        }
    }
}

/// Bytes an instance moved, by protocol and direction, since it was made or last reset.
public struct TrafficCounters: Codable, Hashable, Sendable {
    public var tcpReceived: UInt64 = 0
    public var tcpSent: UInt64 = 0
    public var udpReceived: UInt64 = 0
    public var udpSent: UInt64 = 0

    public init() {}
}
