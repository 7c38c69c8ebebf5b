import Synchronization

/// A counter with a ceiling: how many of something may be in progress at once.
final class ConcurrencyGate: Sendable {
    private let count = Atomic<Int>(0)
    /// The most at once.
    let limit: Int

    init(limit: Int) {
        self.limit = limit
    }

    /// Takes a place; false (and nothing taken) when all places are taken.
    func enter() -> Bool {
        let now = self.count.wrappingAdd(1, ordering: .relaxed).newValue
        if now > self.limit {
            self.count.subtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    /// Gives a place back.
    func leave() {
        self.count.subtract(1, ordering: .relaxed)
    }
}
