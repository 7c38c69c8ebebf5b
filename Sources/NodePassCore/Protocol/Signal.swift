import NIOCore

/// A control-channel signal from the server to the client (v1): one ASCII line ending in `\n`.
public enum Signal: Hashable, Sendable {
    /// `remote://PORT`: the pool port; also the heartbeat.
    case remote(port: Int)
    /// `launch://ID`: relay the pool connection with this ID.
    case launch(PoolID)

    /// The longest line a receiver accepts; longer lines are malformed.
    public static let maximumLineLength = 256

    /// The line with its terminating newline, as written in one write.
    public var line: String {
        switch self {
        case .remote(let port): "remote://\(port)\n"
        case .launch(let id): "launch://\(id)\n"
        }
    }

    /// Writes the line into `buffer`.
    public func write(to buffer: inout ByteBuffer) {
        buffer.writeString(self.line)
    }

    /// What a received line means.
    public enum Parsed: Hashable, Sendable {
        /// A signal this version understands.
        case signal(Signal)
        /// A well-formed line with a scheme this version does not know: to be ignored.
        case unknown(scheme: String)
        /// An empty (or all white space) line: to be ignored.
        case empty
    }

    /// Parses one line without its terminator; surrounding white space is trimmed.
    ///
    /// Throws `.malformedSignal` for a line that cannot be understood (the caller logs it and reads on).
    public static func parse(_ raw: ByteBuffer) throws(NodePassError) -> Parsed {
        guard raw.readableBytes <= Self.maximumLineLength else {
            throw NodePassError(.malformedSignal, "signal line longer than \(Self.maximumLineLength) bytes")
        }
        var bytes = raw.readableBytesView[...]
        while let first = bytes.first, Self.isSpace(first) { bytes = bytes.dropFirst() }
        while let last = bytes.last, Self.isSpace(last) { bytes = bytes.dropLast() }
        if bytes.isEmpty { return .empty }
        guard bytes.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw NodePassError(.malformedSignal, "signal line contains control or non-ASCII bytes")
        }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let (scheme, value) = splitScheme(text) else {
            throw NodePassError(.malformedSignal, "signal line '\(text)' has no scheme")
        }
        switch scheme {
        case "remote":
            guard !value.isEmpty, value.count <= 5, value.allSatisfy({ $0.isNumber }), let port = Int(value),
                (1...65535).contains(port), !(value.first == "0")
            else {
                throw NodePassError(.malformedSignal, "remote signal with invalid port '\(value)'")
            }
            return .signal(.remote(port: port))
        case "launch":
            do {
                return .signal(.launch(try PoolID(parsing: String(value))))
            } catch {
                throw NodePassError(.malformedSignal, "launch signal with invalid ID '\(value)'")
            }
        default:
            guard !scheme.isEmpty, scheme.allSatisfy({ $0.isLetter || $0.isNumber }) else {
                throw NodePassError(.malformedSignal, "signal line '\(text)' has an invalid scheme")
            }
            return .unknown(scheme: String(scheme))
        }
    }

    private static func isSpace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0D || byte == 0x0A || byte == 0x0B || byte == 0x0C
    }
}
