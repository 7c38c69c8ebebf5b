import CoreMetrics
import Logging
import NIOCore

/// The bytes that every relay of the process holds in user space (read from one end, not yet written to
/// the other), bounded by `limit` (BUFFER_BUDGET).
///
/// A relay takes from the budget what it reads and gives it back once written. Past the limit, relays read
/// `RelayReadWindow.minimumRead` at a time until written bytes bring the total under the limit again: the
/// total stays within the limit plus one read per relay direction, no relay waits for bytes that others
/// hold, and no byte is dropped. One budget serves every tunnel of a process (`shared(limit:logger:)`).
/// The bytes held are the gauge `nodepass_relay_buffered_bytes`; reaching the limit is logged (a warning,
/// rate-limited with every repeated line).
final class RelayBudget: Sendable {
    private struct State {
        var used = 0
    }

    /// The most bytes held at once (plus one read per relay direction).
    let limit: Int
    private let state = Locked(State())
    private let gauge: Meter
    private let logger: Logger?

    /// Makes a budget of `limit` bytes.
    init(limit: Int, logger: Logger? = nil, factory: any MetricsFactory = MetricsSystem.factory) {
        self.limit = limit
        self.logger = logger
        self.gauge = Meter(label: "nodepass_relay_buffered_bytes", dimensions: [], factory: factory)
    }

    private static let process = Locked<RelayBudget?>(nil)

    /// The process' budget, made on first use with `limit` (every tunnel of a process reads the same
    /// environment).
    static func shared(limit: Int, logger: Logger) -> RelayBudget {
        Self.process.withLock { budget in
            if let budget { return budget }
            let made = RelayBudget(limit: limit, logger: logger)
            budget = made
            return made
        }
    }

    /// The bytes held now.
    var used: Int {
        self.state.withLock { $0.used }
    }

    /// Whether relays may read.
    var hasRoom: Bool {
        self.state.withLock { $0.used < self.limit }
    }

    /// A relay read `count` bytes.
    func take(_ count: Int) {
        let reached = self.state.withLock { state in
            state.used += count
            self.gauge.set(state.used)
            return state.used >= self.limit && state.used - count < self.limit
        }
        if reached {
            self.logger?.warning(
                "BUFFER_BUDGET reached: relays read 1 KiB at a time until the bytes they hold are written",
                metadata: ["np.budget": "\(self.limit)"]
            )
        }
    }

    /// `count` bytes a relay read were written (or dropped with their connection).
    func give(_ count: Int) {
        self.state.withLock { state in
            state.used -= count
            self.gauge.set(state.used)
        }
    }
}
