import NIOCore

/// How many log lines of one kind (one message) are written: up to `burst` in each `window`, then none until
/// the window ends; the next line written says how many were left out (a flood of refused peers or unknown
/// launches must not fill the disk). Time comes in from outside, so that tests drive it with fixed values.
public struct RepeatedLineBudget: Sendable {
    private struct Kind: Sendable {
        var windowStart: NIODeadline
        var written: Int
        var unwritten: Int
    }

    /// Lines of one kind written in a window at most.
    public let burst: Int
    /// The length of a window.
    public let window: TimeAmount
    /// Kinds remembered at most; past it, lines of new kinds are written without a budget.
    public let maximumKinds: Int
    private var kinds: [String: Kind] = [:]

    /// Makes a budget of `burst` lines per kind and `window`.
    public init(burst: Int = 10, window: TimeAmount = .seconds(10), maximumKinds: Int = 512) {
        self.burst = max(1, burst)
        self.window = window
        self.maximumKinds = maximumKinds
    }

    /// A line of `kind` at `now`: nil to leave it out, else the number of lines of that kind left out since
    /// the last one written (0 mostly).
    public mutating func lineArrived(_ kind: String, now: NIODeadline) -> Int? {
        guard var state = self.kinds[kind] else {
            if self.kinds.count >= self.maximumKinds {
                self.kinds = self.kinds.filter { now - $0.value.windowStart < self.window || $0.value.unwritten > 0 }
                guard self.kinds.count < self.maximumKinds else { return 0 }
            }
            self.kinds[kind] = Kind(windowStart: now, written: 1, unwritten: 0)
            return 0
        }
        if now - state.windowStart >= self.window {
            state.windowStart = now
            state.written = 0
        }
        guard state.written < self.burst else {
            state.unwritten += 1
            self.kinds[kind] = state
            return nil
        }
        let unwritten = state.unwritten
        state.written += 1
        state.unwritten = 0
        self.kinds[kind] = state
        return unwritten
    }
}
