/// The client's pool sizing: how many pool connections to open or close, between MIN and MAX capacity.
///
/// The pool starts at the minimum capacity and refills as soon as a connection is taken. When a take leaves
/// a quarter of the capacity or less idle, the capacity doubles (up to the maximum), at most once per
/// `growthInterval`: during a burst every take finds the pool low, and doubling on each would open up to the
/// maximum at once, costing both sides the CPU the burst itself needs. Once per adaptation
/// period, a pool that served fewer than a fifth of its capacity shrinks by a quarter (down to the minimum).
/// Shrinking never closes an idle connection (the server may be launching it at that very moment): the
/// surplus is simply not replaced as it is used.
///
/// Failed dials are retried at the end of the period. A period in which dials failed and none gave a
/// connection starts (or lengthens) a failing streak: while it lasts, one dial at a time probes the pool
/// port, after 0, 1, 3, 7, 15 and then 31 quiet periods, so that a pool port that refuses or fails every
/// connection (a firewall, someone on the path with the wrong certificate) costs one attempt every half
/// minute instead of the whole capacity every second. The first connection that gets its ID ends the streak.
public struct ClientPoolStateMachine: Sendable {
    /// What the caller must do after an event.
    public struct Adjustment: Hashable, Sendable {
        /// New pool connections to open.
        public var open: Int
        /// Makes an adjustment.
        public init(open: Int = 0) {
            self.open = open
        }

        /// Nothing to do.
        public static let none = Adjustment()
    }

    /// The least capacity.
    public let minimum: Int
    /// The most capacity.
    public let maximum: Int
    /// The current target of idle plus opening connections.
    public private(set) var capacity: Int
    /// Connections with an ID, waiting for a launch.
    public private(set) var idle = 0
    /// Connections being dialled.
    public private(set) var opening = 0
    private var takenThisPeriod = 0
    /// The least time between two doublings, in nanoseconds.
    public let growthInterval: UInt64
    /// When the capacity last doubled (nanoseconds on the caller's monotonic clock).
    private var lastGrowth: UInt64?
    /// Periods in a row in which dials failed and none gave a connection.
    public private(set) var failingPeriods = 0
    private var failedThisPeriod = 0
    private var establishedThisPeriod = 0
    /// Periods left before the next probe of a failing streak.
    private var quietPeriods = 0

    /// Makes a pool machine between `minimum` and `maximum` (swapped if given the wrong way round) that
    /// doubles at most once per `growthInterval` nanoseconds (100 ms by default).
    public init(minimum: Int, maximum: Int, growthInterval: UInt64 = 100_000_000) {
        self.minimum = max(1, min(minimum, maximum))
        self.maximum = max(self.minimum, maximum)
        self.capacity = self.minimum
        self.growthInterval = growthInterval
    }

    private mutating func refill() -> Adjustment {
        var missing = self.capacity - self.idle - self.opening
        if self.failingPeriods > 0 {
            // A failing streak probes with one dial at a time.
            missing = min(missing, 1 - self.opening)
        }
        guard missing > 0 else { return .none }
        self.opening += missing
        return Adjustment(open: missing)
    }

    /// The pool starts (after the server named its pool port): open up to capacity.
    public mutating func started() -> Adjustment {
        self.refill()
    }

    /// A dialled connection received its ID and is idle.
    public mutating func connectionEstablished() {
        self.opening = max(0, self.opening - 1)
        self.idle += 1
        self.establishedThisPeriod += 1
        self.failingPeriods = 0
        self.quietPeriods = 0
    }

    /// A connection that had received its ID was closed at once (its ID was taken, or there was no room); the
    /// next period refills.
    public mutating func connectionRefused() {
        self.idle = max(0, self.idle - 1)
    }

    /// A dial, the pool connection's authentication or its ID read failed; a later period retries.
    public mutating func connectionFailed() {
        self.opening = max(0, self.opening - 1)
        self.failedThisPeriod += 1
    }

    /// An idle connection was launched at `now` (nanoseconds, monotonic): refill, growing the capacity when
    /// the pool ran low and the last growth is at least `growthInterval` old.
    public mutating func connectionTaken(now: UInt64) -> Adjustment {
        self.idle = max(0, self.idle - 1)
        self.takenThisPeriod += 1
        let mayGrow = self.lastGrowth.map { now &- $0 >= self.growthInterval } ?? true
        if self.idle <= self.capacity / 4, self.capacity < self.maximum, mayGrow {
            self.capacity = min(self.maximum, self.capacity * 2)
            self.lastGrowth = now
        }
        return self.refill()
    }

    /// An idle connection died before being launched: replace it.
    public mutating func connectionLost() -> Adjustment {
        self.idle = max(0, self.idle - 1)
        return self.refill()
    }

    /// One adaptation period passed: shrink an underused pool, retry what failed (in a failing streak, after
    /// its quiet periods).
    public mutating func periodElapsed() -> Adjustment {
        defer { (self.takenThisPeriod, self.failedThisPeriod, self.establishedThisPeriod) = (0, 0, 0) }
        if self.failedThisPeriod > 0 && self.establishedThisPeriod == 0 {
            self.failingPeriods += 1
            self.quietPeriods = (1 << min(self.failingPeriods - 1, 5)) - 1
        }
        if self.quietPeriods > 0 {
            self.quietPeriods -= 1
            return .none
        }
        if self.takenThisPeriod * 5 < self.capacity && self.capacity > self.minimum {
            self.capacity = max(self.minimum, self.capacity - max(1, self.capacity / 4))
            return .none
        }
        return self.refill()
    }

    /// The control channel is gone: everything is forgotten and the capacity returns to the minimum.
    public mutating func reset() {
        self.capacity = self.minimum
        self.lastGrowth = nil
        self.idle = 0
        self.opening = 0
        self.takenThisPeriod = 0
        self.failedThisPeriod = 0
        self.establishedThisPeriod = 0
        self.failingPeriods = 0
        self.quietPeriods = 0
    }
}
