/// A parsed tunnel URL: `server://[KEY@]TUNNEL/TARGET?log=LEVEL` or `client://[KEY@]TUNNEL/TARGET?...`.
public struct TunnelURL: Hashable, Sendable {
    /// Which side of the tunnel this process is.
    public enum Role: String, Hashable, Sendable {
        /// Listens for the client's control connection and serves users (v1: on TARGET).
        case server
        /// Connects to a server and dials its TARGET for each launched connection (v1).
        case client
    }

    /// The longest URL accepted; anything longer is refused before parsing.
    public static let maximumLength = 4096

    /// The role named by the scheme.
    public var role: Role
    /// The shared key before `@`, if any (selects protocol v2).
    public var key: String?
    /// The tunnel address: where the server listens and the client connects.
    public var tunnel: HostPort
    /// The target address: the server's listen address for users, the client's service to dial (v1).
    public var target: HostPort
    /// The `log=` query parameter.
    public var logLevel: LogLevel
    /// The `metrics=HOST:PORT` query parameter: where to serve Prometheus metrics (off when nil).
    public var metrics: HostPort?

    /// Makes a URL value from its parts.
    public init(
        role: Role,
        key: String? = nil,
        tunnel: HostPort,
        target: HostPort,
        logLevel: LogLevel = .info,
        metrics: HostPort? = nil
    ) {
        self.role = role
        self.key = key
        self.tunnel = tunnel
        self.target = target
        self.logLevel = logLevel
        self.metrics = metrics
    }

    /// Parses a tunnel URL, throwing an `.invalidURL` error with a message that says what is wrong.
    public static func parse(_ text: String) throws(NodePassError) -> TunnelURL {
        guard !text.isEmpty else {
            throw NodePassError(.invalidURL, "empty URL: expected server://HOST:PORT/HOST:PORT or client://...")
        }
        guard text.utf8.count <= Self.maximumLength else {
            throw NodePassError(.invalidURL, "URL is longer than \(Self.maximumLength) bytes")
        }
        guard text.unicodeScalars.allSatisfy({ $0.isASCII && $0.value > 0x20 && $0.value < 0x7F }) else {
            throw NodePassError(.invalidURL, "URL contains spaces, control characters or non-ASCII characters")
        }
        guard let (schemePart, afterScheme) = splitScheme(text) else {
            throw NodePassError(.invalidURL, "'\(text)' has no scheme: expected server://... or client://...")
        }
        let schemeText = schemePart.lowercased()
        guard let role = Role(rawValue: schemeText) else {
            throw NodePassError(.invalidURL, "unknown scheme '\(schemeText)': expected 'server' or 'client'")
        }
        var rest = afterScheme

        var query: Substring = ""
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        if let fragment = rest.firstIndex(of: "#") {
            rest = rest[..<fragment]
        }
        guard let slash = rest.firstIndex(of: "/") else {
            throw NodePassError(.invalidURL, "missing target: expected \(role.rawValue)://TUNNEL_HOST:PORT/TARGET_HOST:PORT")
        }
        var authority = rest[..<slash]
        let targetText = rest[rest.index(after: slash)...]

        var key: String?
        if let at = authority.lastIndex(of: "@") {
            let keyText = authority[..<at]
            guard !keyText.isEmpty else {
                throw NodePassError(.invalidURL, "the key before '@' is empty")
            }
            key = String(keyText)
            authority = authority[authority.index(after: at)...]
        }
        let tunnel = try HostPort.parse(authority, what: "tunnel address")
        guard !targetText.isEmpty else {
            throw NodePassError(.invalidURL, "missing target: expected \(role.rawValue)://TUNNEL_HOST:PORT/TARGET_HOST:PORT")
        }
        let target = try HostPort.parse(targetText, what: "target address")

        var logLevel = LogLevel.info
        var metrics: HostPort?
        for item in query.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let name = parts[0]
            let value = parts.count > 1 ? parts[1] : ""
            switch name {
            case "log":
                guard let level = LogLevel(rawValue: value.lowercased()) else {
                    throw NodePassError(
                        .invalidURL,
                        "log level '\(value)' is not one of "
                            + LogLevel.allCases.map(\.rawValue).joined(separator: ", ")
                    )
                }
                logLevel = level
            case "metrics":
                metrics = try HostPort.parse(value, what: "metrics address")
            default:
                throw NodePassError(.invalidURL, "unknown query parameter '\(name)' (known: log, metrics)")
            }
        }
        return TunnelURL(role: role, key: key, tunnel: tunnel, target: target, logLevel: logLevel, metrics: metrics)
    }

    /// The URL as it may be logged: the key, if any, is masked.
    public var redacted: String {
        let keyPart = self.key == nil ? "" : "***@"
        let metricsPart = self.metrics.map { "&metrics=\($0)" } ?? ""
        return "\(self.role.rawValue)://\(keyPart)\(self.tunnel)/\(self.target)?log=\(self.logLevel.rawValue)\(metricsPart)"
    }
}
