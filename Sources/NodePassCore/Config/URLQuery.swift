/// The query parameters that tunnel URLs and master URLs share, read the same way with the same messages.
enum URLQuery {
    /// The `name=value` items of a query, in order (a name without `=` has an empty value).
    static func items(_ query: Substring) -> [(name: Substring, value: Substring)] {
        query.split(separator: "&", omittingEmptySubsequences: true).map { item in
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            return (parts[0], parts.count > 1 ? parts[1] : "")
        }
    }

    /// `log=`.
    static func logLevel(_ value: Substring) throws(NodePassError) -> LogLevel {
        guard let level = LogLevel(rawValue: value.lowercased()) else {
            throw NodePassError(
                .invalidURL,
                "log level '\(value.prefix(16))' is not one of "
                    + LogLevel.allCases.map(\.rawValue).joined(separator: ", ")
            )
        }
        return level
    }

    /// `tls=`; `meanings` says what 0, 1 and 2 are for this kind of URL.
    static func tlsMode(_ value: Substring, meanings: String) throws(NodePassError) -> DataTLSMode {
        guard value.count == 1, let number = UInt8(value), let tls = DataTLSMode(rawValue: number), tls != .sealed
        else {
            throw NodePassError(.invalidURL, "tls='\(value.prefix(16))' is not \(meanings)")
        }
        return tls
    }

    /// `crt=` or `key=`: a file path.
    static func filePath(_ name: Substring, _ value: Substring) throws(NodePassError) -> String {
        guard !value.isEmpty else {
            throw NodePassError(.invalidURL, "\(name)= needs a file path")
        }
        return String(value)
    }

    /// `crt=` and `key=` come both with `tls=2`, and only with it.
    static func checkFiles(tls: DataTLSMode?, certificate: String?, key: String?) throws(NodePassError) {
        if tls == .files {
            guard certificate != nil, key != nil else {
                throw NodePassError(.invalidURL, "tls=2 needs both crt=CERTIFICATE.pem and key=PRIVATE_KEY.pem")
            }
        } else if certificate != nil || key != nil {
            throw NodePassError(.invalidURL, "crt= and key= go with tls=2")
        }
    }
}
