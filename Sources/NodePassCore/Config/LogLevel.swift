/// The five NodePass log levels, from the most to the least verbose.
public enum LogLevel: String, CaseIterable, Sendable, Comparable {
    /// Connection lifecycle and protocol details.
    case debug
    /// Start, stop, reconnect (the default).
    case info
    /// Something is wrong or insecure but the tunnel runs.
    case warn
    /// An operation failed.
    case error
    /// The process cannot go on.
    case fatal

    private var rank: Int {
        switch self {
        case .debug: 0
        case .info: 1
        case .warn: 2
        case .error: 3
        case .fatal: 4
        }
    }

    public static func < (lhs: LogLevel, rhs: LogLevel) -> Bool {
        lhs.rank < rhs.rank
    }
}
