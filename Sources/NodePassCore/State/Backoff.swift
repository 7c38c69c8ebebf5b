import NIOCore

/// Retry delays: the first retry after SERVICE_COOLDOWN, then doubling with jitter up to a ceiling (one
/// minute, or the cooldown itself if that is longer); back to the start after a success (`reset()`: the
/// client's completed handshake) or, for a master's instance, a run that stayed up long enough to count as
/// healthy.
public struct Backoff: Sendable {
    /// The first delay (SERVICE_COOLDOWN).
    public let base: TimeAmount
    /// The longest delay.
    public let ceiling: TimeAmount
    /// How long a session must last for the next failure to start again from `base`.
    public let healthyAfter: TimeAmount
    private var failures = 0

    /// The default ceiling of the delays.
    public static let defaultCeiling = TimeAmount.minutes(1)

    /// Makes a backoff starting at `base`; `healthyAfter` (none by default) is the uptime that starts the
    /// delays over.
    public init(
        base: TimeAmount,
        ceiling: TimeAmount = Backoff.defaultCeiling,
        healthyAfter: TimeAmount = .nanoseconds(.max)
    ) {
        self.base = base
        self.ceiling = max(base, ceiling)
        self.healthyAfter = healthyAfter
    }

    /// The delay before the next attempt. `jitter` is a random number in 0..<1; the delay after the first
    /// failure is exactly `base`, later ones lie between half and all of the doubled delay, never below `base`.
    public mutating func nextDelay(jitter: Double) -> TimeAmount {
        defer { self.failures += 1 }
        guard self.failures > 0 else { return self.base }
        let exponent = min(self.failures, 30)
        let doubled = Double(self.base.nanoseconds) * Double(1 << exponent)
        let capped = min(doubled, Double(self.ceiling.nanoseconds))
        let spread = capped * (0.5 + 0.5 * min(max(jitter, 0), 1))
        return .nanoseconds(Int64(max(spread, Double(self.base.nanoseconds))))
    }

    /// An attempt succeeded: the next delay is `base` again, and only failures after it double it.
    public mutating func reset() {
        self.failures = 0
    }

    /// A session ended after `uptime`: a healthy one resets the delays.
    public mutating func sessionEnded(uptime: TimeAmount) {
        if uptime >= self.healthyAfter {
            self.failures = 0
        }
    }
}
