/// A parsed master URL: `master://[HOST]:PORT[/PREFIX]?log=LEVEL&tls=0|1|2&crt=FILE&key=FILE&metrics=HOST:PORT`.
///
/// A master is one process that runs many tunnels and serves the HTTP API that manages them under
/// `PREFIX/v1` (`PREFIX` is `/api` unless the URL has a path).
public struct MasterURL: Hashable, Sendable {
    /// The prefix of the API's paths when the URL has none.
    public static let defaultPrefix = "/api"
    /// The longest prefix accepted.
    public static let maximumPrefixLength = 128

    /// Where the API listens.
    public var listen: HostPort
    /// The prefix of the API's paths: starts with `/`, no `/` at the end.
    public var prefix: String = Self.defaultPrefix
    /// The `log=` query parameter: the master's level, and the level of instances that set none.
    public var logLevel: LogLevel = .info
    /// The `tls=` query parameter: plain HTTP (0, the default, as NodePass's master), HTTPS with an in-memory
    /// certificate (1) or with the `crt=` and `key=` files (2).
    public var tls: DataTLSMode = .plain
    /// The `crt=` query parameter (`tls=2`): a PEM certificate chain file.
    public var certificateFile: String?
    /// The `key=` query parameter (`tls=2`): a PEM private key file.
    public var privateKeyFile: String?
    /// The `metrics=HOST:PORT` query parameter: where to serve Prometheus metrics (off when nil).
    public var metrics: HostPort?

    /// The base path of every API endpoint: `PREFIX/v1`.
    public var apiBase: String { self.prefix + "/v1" }

    /// Makes a URL value that listens on `listen`; the rest keeps its defaults until set.
    public init(listen: HostPort) {
        self.listen = listen
    }

    /// Parses a master URL, throwing an `.invalidURL` error with a message that says what is wrong.
    public static func parse(_ text: String) throws(NodePassError) -> MasterURL {
        guard text.utf8.count <= TunnelURL.maximumLength else {
            throw NodePassError(.invalidURL, "URL is longer than \(TunnelURL.maximumLength) bytes")
        }
        guard text.unicodeScalars.allSatisfy({ $0.isASCII && $0.value > 0x20 && $0.value < 0x7F }) else {
            throw NodePassError(.invalidURL, "URL contains spaces, control characters or non-ASCII characters")
        }
        guard let (scheme, afterScheme) = splitScheme(text), scheme.lowercased() == "master" else {
            throw NodePassError(.invalidURL, "expected master://HOST:PORT[/PREFIX]?...")
        }
        var rest = afterScheme
        var query: Substring = ""
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        if let fragment = rest.firstIndex(of: "#") {
            rest = rest[..<fragment]
        }
        var path: Substring = ""
        if let slash = rest.firstIndex(of: "/") {
            path = rest[slash...]
            rest = rest[..<slash]
        }
        var url = MasterURL(listen: try HostPort.parse(rest, what: "API address"))
        url.prefix = try Self.prefix(from: path)
        try url.applyQuery(query)
        return url
    }

    /// The prefix that a URL's path names: `/api` for none or `/`; else the path without its last `/`, made of
    /// segments of letters, digits, `-`, `.`, `_` and `~` (no empty segment, no `.` or `..`).
    private static func prefix(from path: Substring) throws(NodePassError) -> String {
        var trimmed = path
        while trimmed.last == "/" { trimmed = trimmed.dropLast() }
        guard !trimmed.isEmpty else { return Self.defaultPrefix }
        guard trimmed.utf8.count <= Self.maximumPrefixLength else {
            throw NodePassError(.invalidURL, "API prefix is longer than \(Self.maximumPrefixLength) bytes")
        }
        for segment in trimmed.dropFirst().split(separator: "/", omittingEmptySubsequences: false) {
            let allowed = segment.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-._~".contains($0)) }
            guard !segment.isEmpty, segment != ".", segment != "..", allowed else {
                throw NodePassError(
                    .invalidURL,
                    "API prefix '\(trimmed.prefix(64))' is not a path of letters, digits, '-', '.', '_' and '~'"
                )
            }
        }
        return String(trimmed)
    }

    private mutating func applyQuery(_ query: Substring) throws(NodePassError) {
        for (name, value) in URLQuery.items(query) {
            switch name {
            case "log":
                self.logLevel = try URLQuery.logLevel(value)
            case "tls":
                self.tls = try URLQuery.tlsMode(
                    value,
                    meanings: "0 (HTTP), 1 (HTTPS, in-memory certificate) or 2 (HTTPS, crt= and key= files)"
                )
            case "crt", "key":
                let path = try URLQuery.filePath(name, value)
                if name == "crt" { self.certificateFile = path } else { self.privateKeyFile = path }
            case "metrics":
                self.metrics = try HostPort.parse(value, what: "metrics address")
            default:
                throw NodePassError(
                    .invalidURL,
                    "unknown query parameter '\(name.prefix(32))' of a master (known: log, tls, crt, key, metrics)"
                )
            }
        }
        try URLQuery.checkFiles(tls: self.tls, certificate: self.certificateFile, key: self.privateKeyFile)
    }

    /// The URL as written back: the prefix, `log=` and `tls=` always, the other parameters when set.
    public var description: String {
        var query = "log=\(self.logLevel.rawValue)&tls=\(self.tls.rawValue)"
        if let file = self.certificateFile { query += "&crt=\(file)" }
        if let file = self.privateKeyFile { query += "&key=\(file)" }
        if let metrics = self.metrics { query += "&metrics=\(metrics)" }
        return "master://\(self.listen)\(self.prefix)?\(query)"
    }
}
