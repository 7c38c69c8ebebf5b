/// The one error type of NodePass: a code to match on, a message for people, and an optional cause.
///
/// Two errors are equal when their codes are equal; the message and the cause are for logs.
public struct NodePassError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong, as a stable, extensible code.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: Hashable, Sendable {
            case invalidURL
            case invalidEnvironment
            case malformedSignal
            case malformedPoolID
            case timeout
            case poolUnavailable
            case controlChannelLost
            case tls
            case bindFailed
            case protocolViolation
            case authenticationFailed
            case versionMismatch
            case fileUnreadable
            case invalidState
            case unreachable
        }

        private let base: Base

        private init(_ base: Base) {
            self.base = base
        }

        /// The tunnel URL given on the command line is not valid.
        public static let invalidURL = Code(.invalidURL)
        /// An environment variable holds a value that cannot be used.
        public static let invalidEnvironment = Code(.invalidEnvironment)
        /// A control-channel line could not be understood.
        public static let malformedSignal = Code(.malformedSignal)
        /// The bytes read as a pool connection ID are not 8 lowercase hex characters.
        public static let malformedPoolID = Code(.malformedPoolID)
        /// Something a peer had to do did not happen in time.
        public static let timeout = Code(.timeout)
        /// No pool connection became available in time.
        public static let poolUnavailable = Code(.poolUnavailable)
        /// The control channel ended or stopped answering.
        public static let controlChannelLost = Code(.controlChannelLost)
        /// The TLS layer could not be set up.
        public static let tls = Code(.tls)
        /// A listening socket could not be opened.
        public static let bindFailed = Code(.bindFailed)
        /// A v2 peer sent bytes that break the protocol (a bad frame, an unexpected message).
        public static let protocolViolation = Code(.protocolViolation)
        /// A v2 peer did not prove that it holds the key.
        public static let authenticationFailed = Code(.authenticationFailed)
        /// The peer speaks another protocol version (v1 against v2).
        public static let versionMismatch = Code(.versionMismatch)
        /// A file named in the URL (`crt=`, `key=`) cannot be read or used.
        public static let fileUnreadable = Code(.fileUnreadable)
        /// A master's saved state breaks its own rules (a damaged or edited file).
        public static let invalidState = Code(.invalidState)
        /// A peer could not be reached (connection refused, no route, no answer, name not found).
        public static let unreachable = Code(.unreachable)

        /// A short name of the code.
        public var description: String {
            String(describing: self.base)
        }
    }

    /// The error's code.
    public let code: Code
    /// A message meant for a person reading the log or the terminal.
    public let message: String
    /// The error that caused this one, if any.
    public let underlying: (any Error & Sendable)?

    /// Makes an error.
    public init(_ code: Code, _ message: String, underlying: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    /// The message, followed by the underlying error when there is one.
    public var description: String {
        if let underlying {
            return "\(self.message): \(underlying)"
        }
        return self.message
    }

    public static func == (lhs: NodePassError, rhs: NodePassError) -> Bool {
        lhs.code == rhs.code
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.code)
    }
}
