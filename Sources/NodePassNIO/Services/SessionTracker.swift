import NIOCore
import Synchronization

/// Counts live relayed sessions, bounds them, and lets a shutdown wait for them to end.
public final class SessionTracker: Sendable {
    private struct State {
        var channels: [ObjectIdentifier: any Channel] = [:]
        var drained: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())
    /// The most sessions at once.
    public let limit: Int

    /// Makes a tracker allowing `limit` sessions at once.
    public init(limit: Int) {
        self.limit = limit
    }

    /// The number of live sessions.
    public var count: Int {
        self.state.withLock { $0.channels.count }
    }

    /// Adds a session keyed by `channel`; false when the limit is reached. The session ends when the channel closes.
    public func add(_ channel: any Channel) -> Bool {
        let key = ObjectIdentifier(channel)
        let added = self.state.withLock { state -> Bool in
            guard state.channels.count < self.limit else { return false }
            state.channels[key] = channel
            return true
        }
        guard added else { return false }
        channel.closeFuture.whenComplete { _ in
            let waiters = self.state.withLock { state -> [CheckedContinuation<Void, Never>] in
                state.channels[key] = nil
                guard state.channels.isEmpty else { return [] }
                defer { state.drained = [] }
                return state.drained
            }
            for waiter in waiters { waiter.resume() }
        }
        return true
    }

    /// Waits until no session is live.
    public func waitUntilEmpty() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = self.state.withLock { state -> Bool in
                if state.channels.isEmpty { return true }
                state.drained.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    /// Closes every live session.
    public func closeAll() {
        let channels = self.state.withLock { Array($0.channels.values) }
        for channel in channels { channel.close(promise: nil) }
    }

    /// Waits up to `timeout` for the sessions to end, then closes the rest. Returns how many were cut.
    public func drain(timeout: TimeAmount) async -> Int {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await self.waitUntilEmpty()
                return true
            }
            group.addTask {
                try? await Task.sleep(nanoseconds: UInt64(max(0, timeout.nanoseconds)))
                return false
            }
            let finished = await group.next() ?? true
            group.cancelAll()
            guard !finished else { return 0 }
            let cut = self.count
            self.closeAll()
            await self.waitUntilEmpty()
            return cut
        }
    }
}
