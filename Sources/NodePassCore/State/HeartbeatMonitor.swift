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

    /// The periodic check ran: true when the channel must be closed as dead.
    public func isDead(now: NIODeadline) -> Bool {
        now - self.lastHeard > self.deadAfter
    }
}
