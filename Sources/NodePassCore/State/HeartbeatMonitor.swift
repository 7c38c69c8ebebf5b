import NIOCore

/// Decides when a v2 control channel is dead: no message from the peer for three heartbeat periods.
///
/// Time comes in as `NIODeadline` values so that tests can drive it with a mock clock.
public struct HeartbeatMonitor: Sendable {
    /// Silence longer than this means the peer is gone.
    public let deadAfter: TimeAmount
    private var lastHeard: NIODeadline

    /// Starts watching at `now`, with the peer's heartbeat period `interval`.
    public init(interval: TimeAmount, now: NIODeadline) {
        self.deadAfter = interval * 3
        self.lastHeard = now
    }

    /// Any message came from the peer.
    public mutating func messageReceived(now: NIODeadline) {
        self.lastHeard = max(self.lastHeard, now)
    }

    /// What a message from the peer means once the session runs (it is also a sign of life).
    public enum SessionMessage: Hashable, Sendable {
        /// Nothing to do (a heartbeat, or a message type this version does not know).
        case nothing
        /// The peer launched one of its pool connections.
        case launch(PoolID)
        /// The peer launched one of its pool connections as a datagram carrier (`nodepass/2.1`).
        case launchDatagrams(PoolID)
        /// The session must end.
        case close(ControlClosure)
    }

    /// A message came from the peer at `now`, after the handshake.
    public mutating func sessionMessageReceived(_ message: V2Message, now: NIODeadline) -> SessionMessage {
        self.messageReceived(now: now)
        switch message {
        case .heartbeat, .unknown: return .nothing
        case .launch(let id): return .launch(id)
        case .launchDatagrams(let id): return .launchDatagrams(id)
        case .failure(let reason, let text): return .close(.peerGaveUp(reason, text: text))
        case .hello, .challenge, .authenticate, .welcome: return .close(.handshakeMessageAfterHandshake)
        }
    }

    /// The periodic check ran: true when the channel must be closed as dead.
    public func isDead(now: NIODeadline) -> Bool {
        now - self.lastHeard > self.deadAfter
    }
}

/// Why a control channel whose session had started is closed.
public enum ControlClosure: Hashable, Sendable {
    /// The peer sent a `failure`.
    case peerGaveUp(V2FailureReason, text: String)
    /// The peer sent a handshake message after the handshake.
    case handshakeMessageAfterHandshake
    /// The peer was silent for this long (three heartbeat periods).
    case silent(TimeAmount)
    /// The peer sent a frame that is not a valid message (why, in words).
    case malformedMessage(String)
}
