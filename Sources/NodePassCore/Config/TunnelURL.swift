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
    public var logLevel: LogLevel = .info
    /// The `metrics=HOST:PORT` query parameter: where to serve Prometheus metrics (off when nil).
    public var metrics: HostPort?
    /// The `tls=` query parameter (server, v2): nil means the default, TLS with the in-memory certificate.
    public var dataTLS: DataTLSMode?
    /// The `crt=` query parameter (server, v2, `tls=2`): a PEM certificate chain file.
    public var certificateFile: String?
    /// The `key=` query parameter (server, v2, `tls=2`): a PEM private key file.
    public var privateKeyFile: String?
    /// The `mode=` query parameter (server, v2): which side has the users.
    public var mode: TunnelMode = .auto
    /// What the tunnel carries (server, v2): `notcp=1` and `noudp=1` remove TCP and UDP. v1 carries TCP only.
    public var transports: TunnelTransports = [.tcp, .udp]
    /// The `pool=PORT` query parameter (server, v1 and v2): the port of the pool listener, fixed so that a
    /// firewall can open it; nil: a free port, chosen at each start.
    public var poolPort: Int?
    /// The `resume=1` query parameter (server, v2): relays whose pool connection breaks resume on a new one
    /// (`V2Resume`), with clients that speak `nodepass/2.3`.
    public var resume = false

    /// The protocol this URL selects: 2 with a key, 1 without.
    public var protocolVersion: Int { self.key == nil ? 1 : 2 }

    /// How v2 data connections are protected: `tls=` when given, else TLS with the in-memory certificate.
    public var effectiveDataTLS: DataTLSMode {
        guard self.key != nil else { return .plain }
        return self.dataTLS ?? .inMemory
    }

    /// Makes a URL value from its parts; the query parameters keep their defaults until set.
    public init(role: Role, key: String? = nil, tunnel: HostPort, target: HostPort) {
        self.role = role
        self.key = key
        self.tunnel = tunnel
        self.target = target
    }

    /// The environment variable that may hold the key instead of the URL (out of the process list).
    public static let keyVariable = "NODEPASS_KEY"

    /// Parses a tunnel URL, throwing an `.invalidURL` error with a message that says what is wrong.
    ///
    /// `environmentKey` (the value of `NODEPASS_KEY`) is the key when the URL has none; giving both is an
    /// error. When the URL holds an `@`, the message quotes none of its text, so that no part of a key
    /// (which may contain `/`, `?` or `#` and be cut in the wrong place) reaches a terminal or a log.
    public static func parse(_ text: String, environmentKey: String? = nil) throws(NodePassError) -> TunnelURL {
        do {
            return try Self.parseText(text, environmentKey: environmentKey)
        } catch  where text.contains("@") {
            throw NodePassError(.invalidURL, Self.unquoted(error.message))
        }
    }

    /// `message` with every 'quoted' part replaced by '…'.
    private static func unquoted(_ message: String) -> String {
        var result = ""
        var inQuote = false
        for character in message {
            if character == "'" {
                result += inQuote ? "…'" : "'"
                inQuote.toggle()
            } else if !inQuote {
                result.append(character)
            }
        }
        return result
    }

    private static func parseText(_ text: String, environmentKey: String?) throws(NodePassError) -> TunnelURL {
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
            throw NodePassError(.invalidURL, "the URL has no scheme: expected server://... or client://...")
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
            throw NodePassError(
                .invalidURL,
                "missing target: expected \(role.rawValue)://TUNNEL_HOST:PORT/TARGET_HOST:PORT"
            )
        }
        var authority = rest[..<slash]
        let targetText = rest[rest.index(after: slash)...]

        var key: String?
        if let at = authority.lastIndex(of: "@") {
            let keyText = authority[..<at]
            guard !keyText.isEmpty else {
                throw NodePassError(.invalidURL, "the key (before @) is empty")
            }
            guard environmentKey?.isEmpty ?? true else {
                throw NodePassError(
                    .invalidURL,
                    "the key is given both in the URL and in \(Self.keyVariable): give it once"
                )
            }
            key = String(keyText)
            authority = authority[authority.index(after: at)...]
        }
        if key == nil, let environmentKey, !environmentKey.isEmpty {
            key = environmentKey
        }
        let tunnel = try HostPort.parse(authority, what: "tunnel address")
        guard !targetText.isEmpty else {
            throw NodePassError(
                .invalidURL,
                "missing target: expected \(role.rawValue)://TUNNEL_HOST:PORT/TARGET_HOST:PORT"
            )
        }
        let target = try HostPort.parse(targetText, what: "target address")

        var url = TunnelURL(role: role, key: key, tunnel: tunnel, target: target)
        try url.applyQuery(query)
        return url
    }

    private mutating func applyQuery(_ query: Substring) throws(NodePassError) {
        var v2Only: [String] = []
        for (name, value) in URLQuery.items(query) {
            switch name {
            case "log":
                self.logLevel = try URLQuery.logLevel(value)
            case "metrics":
                self.metrics = try HostPort.parse(value, what: "metrics address")
            case "tls":
                self.dataTLS = try URLQuery.tlsMode(
                    value,
                    meanings: "0 (plain), 1 (TLS, in-memory certificate) or 2 (TLS, crt= and key= files)"
                )
                v2Only.append("tls")
            case "mode":
                guard value.count == 1, let number = UInt8(value), let mode = TunnelMode(rawValue: number) else {
                    throw NodePassError(
                        .invalidURL,
                        "mode='\(value.prefix(16))' is not 0 (automatic), 1 (reverse) or 2 (forward)"
                    )
                }
                self.mode = mode
                v2Only.append("mode")
            case "notcp", "noudp":
                guard value == "0" || value == "1" else {
                    throw NodePassError(.invalidURL, "\(name)='\(value.prefix(16))' is not 0 or 1")
                }
                let transport: TunnelTransports = name == "notcp" ? .tcp : .udp
                if value == "1" { self.transports.remove(transport) } else { self.transports.insert(transport) }
                v2Only.append(String(name))
            case "resume":
                guard value == "0" || value == "1" else {
                    throw NodePassError(.invalidURL, "resume='\(value.prefix(16))' is not 0 or 1")
                }
                self.resume = value == "1"
                v2Only.append("resume")
            case "pool":
                guard let port = HostPort.port(value) else {
                    throw NodePassError(.invalidURL, "pool='\(value.prefix(16))' is not a port number from 1 to 65535")
                }
                self.poolPort = port
            case "crt", "key":
                let path = try URLQuery.filePath(name, value)
                if name == "crt" { self.certificateFile = path } else { self.privateKeyFile = path }
                v2Only.append(String(name))
            default:
                throw NodePassError(
                    .invalidURL,
                    "unknown query parameter '\(name.prefix(32))' "
                        + "(known: log, metrics, pool, tls, crt, key, mode, notcp, noudp, resume)"
                )
            }
        }
        try self.checkPoolPort()
        try self.checkV2Options(v2Only)
    }

    private func checkPoolPort() throws(NodePassError) {
        guard let port = self.poolPort else { return }
        guard self.role == .server else {
            throw NodePassError(
                .invalidURL,
                "pool= is set on the server; the client uses the port the server announces"
            )
        }
        guard port != self.tunnel.port else {
            throw NodePassError(.invalidURL, "pool=\(port) is also the tunnel port: give the pool a port of its own")
        }
        let sameHost = self.tunnel.host.isEmpty || self.target.host.isEmpty || self.tunnel.host == self.target.host
        guard port != self.target.port || !sameHost else {
            throw NodePassError(.invalidURL, "pool=\(port) is also the target port: give the pool a port of its own")
        }
    }

    private func checkV2Options(_ given: [String]) throws(NodePassError) {
        guard let first = given.first else { return }
        guard self.key != nil else {
            throw NodePassError(
                .invalidURL,
                "\(first)= needs protocol v2: put a KEY in the URL (\(self.role.rawValue)://KEY@HOST:PORT/...)"
            )
        }
        guard self.role == .server else {
            throw NodePassError(
                .invalidURL,
                "\(first)= is set on the server; the client follows what the server announces"
            )
        }
        guard !self.transports.isEmpty else {
            throw NodePassError(.invalidURL, "notcp=1 and noudp=1 together leave nothing to carry")
        }
        try URLQuery.checkFiles(tls: self.dataTLS, certificate: self.certificateFile, key: self.privateKeyFile)
    }

    /// The URL as it may be logged: the key, if any, is masked.
    public var redacted: String {
        self.rendered(keyPart: self.key == nil ? "" : "***@", everyDefault: false)
    }

    /// The URL with the key and every parameter that applies to it spelled out, defaults included (what a
    /// master shows as an instance's `config`).
    public var canonical: String {
        self.rendered(keyPart: self.key.map { "\($0)@" } ?? "", everyDefault: true)
    }

    private func rendered(keyPart: String, everyDefault: Bool) -> String {
        var query = "log=\(self.logLevel.rawValue)"
        if let metrics = self.metrics { query += "&metrics=\(metrics)" }
        if let pool = self.poolPort { query += "&pool=\(pool)" }
        let serverV2 = everyDefault && self.key != nil && self.role == .server
        if let tls = serverV2 ? self.effectiveDataTLS : self.dataTLS { query += "&tls=\(tls.rawValue)" }
        if let file = self.certificateFile { query += "&crt=\(file)" }
        if let file = self.privateKeyFile { query += "&key=\(file)" }
        if serverV2 || self.mode != .auto { query += "&mode=\(self.mode.rawValue)" }
        if serverV2 || !self.transports.contains(.tcp) { query += "&notcp=\(self.transports.contains(.tcp) ? 0 : 1)" }
        if serverV2 || !self.transports.contains(.udp) { query += "&noudp=\(self.transports.contains(.udp) ? 0 : 1)" }
        if self.resume { query += "&resume=1" }
        return "\(self.role.rawValue)://\(keyPart)\(self.tunnel)/\(self.target)?\(query)"
    }
}
