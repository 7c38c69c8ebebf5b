import NIOCore

/// At most one log line a second for a warning that a flood could repeat (a limit reached, datagrams
/// dropped): `isDue()` is true once a second at the most.
public final class LimitLogClock: Sendable {
    private let last = Locked<NIODeadline>(.distantPast)

    public init() {}

    public func isDue() -> Bool {
        let now = NIODeadline.now()
        return self.last.withLock { last in
            guard now - last >= .seconds(1) else { return false }
            last = now
            return true
        }
    }
}
