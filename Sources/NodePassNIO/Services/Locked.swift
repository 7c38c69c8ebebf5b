import NIOConcurrencyHelpers

/// A value behind a lock, for state that several event loops share.
///
/// Not Synchronization's `Mutex`: on Linux a contended `Mutex` hands its ownership from thread to thread
/// inside the kernel (a priority-inheritance futex), where ThreadSanitizer cannot see it, so the test run
/// under ThreadSanitizer reports the state it protects as raced whenever two threads meet at the lock.
/// This is a pthread mutex (SwiftNIO's `NIOLock`), which ThreadSanitizer knows.
struct Locked<Value: Sendable>: Sendable {
    private let box: NIOLockedValueBox<Value>

    init(_ value: Value) {
        self.box = NIOLockedValueBox(value)
    }

    /// Runs `body` with the value, under the lock.
    func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        try self.box.withLockedValue(body)
    }
}
