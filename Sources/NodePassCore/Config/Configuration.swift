import NIOCore

/// The tuning of a NodePass process, read from its environment variables.
public struct Configuration: Hashable, Sendable {
    /// Concurrent user connections on the server; concurrent launched connections on the client.
    public var semaphoreLimit: Int = 1024
    /// Idle pool connections kept at least.
    public var minPoolCapacity: Int = 16
    /// Idle pool connections at most.
    public var maxPoolCapacity: Int = 1024
    /// Period of the `remote://` heartbeat; three missed periods mean the control channel is dead.
    public var reportInterval: TimeAmount = .seconds(5)
    /// Pause before reconnecting or restarting after an error.
    public var serviceCooldown: TimeAmount = .seconds(5)
    /// How long a graceful shutdown may take.
    public var shutdownTimeout: TimeAmount = .seconds(5)
    /// A user connection on which no byte moved either way for this long is closed; nil: never.
    public var idleTimeout: TimeAmount? = .hours(1)
    /// Whether plain relays may move to the kernel (splice(2) on Linux); `NODEPASS_SPLICE=0` keeps every
    /// relay in SwiftNIO.
    public var splice: Bool = true
    /// A UDP flow that carried nothing either way for this long is forgotten (v2).
    public var udpIdleTimeout: TimeAmount = .seconds(60)
    /// UDP flows at once, on each side (v2); a new flow past the bound is dropped.
    public var udpMaxFlows: Int = 8192
    /// Bytes one direction of a relay may hold in user space (read, not yet written to the other end).
    public var relayBuffer: Int = 64 * 1024
    /// Bytes every relay of the process together may hold in user space.
    public var bufferBudget: Int = 64 * 1024 * 1024
    /// How long a resumable relay (the server's `resume=1`) waits for a new pool connection after a break.
    public var resumeGrace: TimeAmount = .seconds(30)

    /// Bound on the TLS handshake of the control channel.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// Bound on reading a pool connection's ID.
    public var idReadTimeout: TimeAmount = .seconds(5)
    /// Bound on dialling a target or the server.
    public var dialTimeout: TimeAmount = .seconds(10)
    /// How long a user connection may wait for a pool connection.
    public var poolWaitTimeout: TimeAmount = .seconds(5)
    /// How many TLS handshakes the server runs at once; more connections are closed at once.
    public var maxPendingHandshakes: Int = 64

    /// The defaults.
    public init() {}

    /// The names of the variables read, in the order of the documentation.
    public static let variableNames = [
        "SEMAPHORE_LIMIT", "MIN_POOL_CAPACITY", "MAX_POOL_CAPACITY",
        "REPORT_INTERVAL", "SERVICE_COOLDOWN", "SHUTDOWN_TIMEOUT", "IDLE_TIMEOUT", "UDP_IDLE_TIMEOUT",
        "UDP_MAX_FLOWS", "RELAY_BUFFER", "BUFFER_BUDGET", "RESUME_GRACE", "NODEPASS_SPLICE",
    ]

    /// Reads the variables from `environment`; an unset or empty variable keeps its default.
    ///
    /// Throws an `.invalidEnvironment` error naming the variable and its value when a value cannot be used.
    public init(environment: [String: String]) throws(NodePassError) {
        self.init()
        self.semaphoreLimit = try Self.integer(
            "SEMAPHORE_LIMIT",
            environment,
            default: self.semaphoreLimit,
            range: 1...1_000_000
        )
        self.minPoolCapacity = try Self.integer(
            "MIN_POOL_CAPACITY",
            environment,
            default: self.minPoolCapacity,
            range: 1...65_536
        )
        self.maxPoolCapacity = try Self.integer(
            "MAX_POOL_CAPACITY",
            environment,
            default: self.maxPoolCapacity,
            range: 1...65_536
        )
        self.reportInterval = try Self.duration("REPORT_INTERVAL", environment, default: self.reportInterval)
        self.serviceCooldown = try Self.duration("SERVICE_COOLDOWN", environment, default: self.serviceCooldown)
        self.shutdownTimeout = try Self.duration("SHUTDOWN_TIMEOUT", environment, default: self.shutdownTimeout)
        if environment["IDLE_TIMEOUT"] == "0" {
            self.idleTimeout = nil
        } else if let idle = self.idleTimeout {
            self.idleTimeout = try Self.duration("IDLE_TIMEOUT", environment, default: idle)
        }
        self.udpIdleTimeout = try Self.duration("UDP_IDLE_TIMEOUT", environment, default: self.udpIdleTimeout)
        self.udpMaxFlows = try Self.integer(
            "UDP_MAX_FLOWS",
            environment,
            default: self.udpMaxFlows,
            range: 1...1_000_000
        )
        self.relayBuffer = try Self.size(
            "RELAY_BUFFER",
            environment,
            default: self.relayBuffer,
            range: 4 * 1024...16 * 1024 * 1024
        )
        self.bufferBudget = try Self.size(
            "BUFFER_BUDGET",
            environment,
            default: self.bufferBudget,
            range: 1024 * 1024...1024 * 1024 * 1024 * 1024
        )
        self.resumeGrace = try Self.duration("RESUME_GRACE", environment, default: self.resumeGrace)
        self.splice = try Self.integer("NODEPASS_SPLICE", environment, default: 1, range: 0...1) == 1
        guard self.minPoolCapacity <= self.maxPoolCapacity else {
            throw NodePassError(
                .invalidEnvironment,
                "MIN_POOL_CAPACITY=\(self.minPoolCapacity) is greater than MAX_POOL_CAPACITY=\(self.maxPoolCapacity)"
            )
        }
    }

    private static func integer(
        _ name: String,
        _ environment: [String: String],
        default value: Int,
        range: ClosedRange<Int>
    ) throws(NodePassError) -> Int {
        try Self.bounded(name, environment, default: value, range: range) { text in
            guard text.utf8.count <= 10, text.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
            return Int(text)
        } expected: {
            "a whole number from \(range.lowerBound) to \(range.upperBound)"
        }
    }

    /// A size in bytes: a whole number, optionally followed by K, M or G (or KiB, MiB, GiB; powers of 1024).
    private static func size(
        _ name: String,
        _ environment: [String: String],
        default value: Int,
        range: ClosedRange<Int>
    ) throws(NodePassError) -> Int {
        try Self.bounded(name, environment, default: value, range: range, parse: Self.parseSize) {
            "a size from \(Self.describeSize(range.lowerBound)) to \(Self.describeSize(range.upperBound)) "
                + "(write it as 65536, 64K or 64KiB, 1M)"
        }
    }

    /// The variable `name` as `parse` reads it, within `range`; `default` when unset or empty; an error
    /// saying what was `expected` otherwise.
    private static func bounded(
        _ name: String,
        _ environment: [String: String],
        default value: Int,
        range: ClosedRange<Int>,
        parse: (String) -> Int?,
        expected: () -> String
    ) throws(NodePassError) -> Int {
        guard let text = environment[name], !text.isEmpty else { return value }
        guard let number = parse(text), range.contains(number) else {
            throw NodePassError(.invalidEnvironment, "\(name)='\(text.prefix(64))' is not \(expected())")
        }
        return number
    }

    /// The bytes `text` names (see `size`), or nil.
    static func parseSize(_ text: String) -> Int? {
        let digits = text.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, digits.count <= 13, let number = Int(digits) else { return nil }
        let multiplier: Int
        switch text.dropFirst(digits.count) {
        case "": multiplier = 1
        case "K", "KiB": multiplier = 1024
        case "M", "MiB": multiplier = 1024 * 1024
        case "G", "GiB": multiplier = 1024 * 1024 * 1024
        default: return nil
        }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : bytes
    }

    private static func describeSize(_ bytes: Int) -> String {
        for (unit, size) in [("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)] where bytes % size == 0 {
            return "\(bytes / size)\(unit)"
        }
        return "\(bytes)"
    }

    private static func duration(
        _ name: String,
        _ environment: [String: String],
        default value: TimeAmount
    ) throws(NodePassError) -> TimeAmount {
        guard let text = environment[name], !text.isEmpty else { return value }
        guard let amount = DurationParser.parse(text), amount >= .milliseconds(10) else {
            throw NodePassError(
                .invalidEnvironment,
                "\(name)='\(text.prefix(64))' is not a duration from 10ms to 24h (write it as 5s, 500ms, 1m)"
            )
        }
        return amount
    }
}
