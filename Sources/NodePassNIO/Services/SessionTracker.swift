import NIOCore

/// Counts live relayed sessions, bounds them, and lets a shutdown wait for them to end.
///
/// A session starts keyed by a channel. When its relay moves out of its channels (to the kernel, with
/// splice) the channel is closed and the session lives on, closed through the closure it was moved with,
/// until the relay reports its end.
final class SessionTracker: Sendable {
    private enum Owner {
        case channel(any Channel)
        case detached(close: @Sendable () -> Void)
    }

    private struct Session {
        var owner: Owner
        let onEnd: (@Sendable () -> Void)?
    }

    private struct State {
        var sessions: [UInt64: Session] = [:]
        /// The sessions still owned by their channel. A channel is only here while it is alive (the session
        /// holds it), so its identifier cannot be reused meanwhile.
        var byChannel: [ObjectIdentifier: UInt64] = [:]
        var nextID: UInt64 = 0
        /// Set by `closeAll`: a relay moving to the engine afterwards is closed at once.
        var closing = false
        var drained: [CheckedContinuation<Void, Never>] = []
        /// Those waiting for a number of spliced sessions.
        var splicedWaiters: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []

        var splicedCount: Int { self.sessions.count - self.byChannel.count }

        /// Takes out the waiters whose number of spliced sessions is reached.
        mutating func reachedSplicedWaiters() -> [CheckedContinuation<Void, Never>] {
            guard !self.splicedWaiters.isEmpty else { return [] }
            let spliced = self.splicedCount
            let reached = self.splicedWaiters.filter { $0.count <= spliced }.map(\.continuation)
            self.splicedWaiters.removeAll { $0.count <= spliced }
            return reached
        }
    }

    private let state = Locked(State())
    /// The most sessions at once.
    let limit: Int

    /// Makes a tracker allowing `limit` sessions at once.
    init(limit: Int) {
        self.limit = limit
    }

    /// The number of live sessions.
    var count: Int {
        self.state.withLock { $0.sessions.count }
    }

    /// The number of live sessions whose relay runs outside their channels (spliced).
    var splicedCount: Int {
        self.state.withLock { $0.splicedCount }
    }

    /// Waits until at least `count` live sessions are spliced (moved out of their channels).
    func waitUntilSpliced(_ count: Int) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = self.state.withLock { state -> Bool in
                if state.splicedCount >= count { return true }
                state.splicedWaiters.append((count, continuation))
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    /// Adds a session keyed by `channel`; false when the limit is reached. The session ends when the channel
    /// closes (unless its relay was spliced), and then `onEnd` runs.
    func add(_ channel: any Channel, onEnd: (@Sendable () -> Void)? = nil) -> Bool {
        let key = ObjectIdentifier(channel)
        let id = self.state.withLock { state -> UInt64? in
            guard state.sessions.count < self.limit else { return nil }
            state.nextID += 1
            state.sessions[state.nextID] = Session(owner: .channel(channel), onEnd: onEnd)
            state.byChannel[key] = state.nextID
            return state.nextID
        }
        guard let id else { return false }
        channel.closeFuture.whenComplete { _ in
            self.end([id], channel: key)
        }
        return true
    }

    /// The session keyed by `old` is keyed by `new` from now on (a resumable relay: its pool connection may be
    /// replaced, its target connection stays); it ends when `new` closes. False when `old` has no session
    /// (it closed meanwhile).
    func rekey(from old: any Channel, to new: any Channel) -> Bool {
        let id = self.state.withLock { state -> UInt64? in
            guard let id = state.byChannel.removeValue(forKey: ObjectIdentifier(old)) else { return nil }
            state.byChannel[ObjectIdentifier(new)] = id
            state.sessions[id]?.owner = .channel(new)
            return id
        }
        guard let id else { return false }
        let key = ObjectIdentifier(new)
        new.closeFuture.whenComplete { _ in
            self.end([id], channel: key)
        }
        return true
    }

    /// Moves the sessions of any of `channels` out of them, before the channels are closed: from now on
    /// `close` ends the relay. Returns the sessions moved, to pass to `end(_:)` when the relay ends.
    func transfer(_ channels: [any Channel], close: @escaping @Sendable () -> Void) -> [UInt64] {
        let (moved, waiters) = self.state.withLock { state in
            let moved = channels.compactMap { channel -> UInt64? in
                guard let id = state.byChannel.removeValue(forKey: ObjectIdentifier(channel)) else { return nil }
                state.sessions[id]?.owner = .detached(close: close)
                return id
            }
            return (moved, state.reachedSplicedWaiters())
        }
        for waiter in waiters { waiter.resume() }
        return moved
    }

    /// Whether `closeAll` was called: a relay just handed to the engine must then be closed (its session may
    /// have been seen still owned by its channel, or its close may have reached the engine before it).
    var isClosing: Bool {
        self.state.withLock { $0.closing }
    }

    /// Ends the sessions `ids`.
    func end(_ ids: [UInt64]) {
        self.end(ids, channel: nil)
    }

    /// Ends the sessions `ids`; with `channel`, only if that channel still owns them.
    private func end(_ ids: [UInt64], channel: ObjectIdentifier?) {
        let (ended, waiters) = self.state.withLock { state -> ([Session], [CheckedContinuation<Void, Never>]) in
            var ended: [Session] = []
            for id in ids {
                guard let session = state.sessions[id] else { continue }
                if let channel {
                    // Only the channel that owns it now ends it (not one it was moved from).
                    guard case .channel(let owner) = session.owner, ObjectIdentifier(owner) == channel else {
                        continue
                    }
                    state.byChannel[channel] = nil
                }
                state.sessions[id] = nil
                ended.append(session)
            }
            guard !ended.isEmpty, state.sessions.isEmpty else { return (ended, []) }
            defer { state.drained = [] }
            return (ended, state.drained)
        }
        for session in ended { session.onEnd?() }
        for waiter in waiters { waiter.resume() }
    }

    /// Waits until no session is live.
    func waitUntilEmpty() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = self.state.withLock { state -> Bool in
                if state.sessions.isEmpty { return true }
                state.drained.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    /// Closes every live session.
    func closeAll() {
        let owners = self.state.withLock { state in
            state.closing = true
            return state.sessions.values.map(\.owner)
        }
        for owner in owners {
            switch owner {
            case .channel(let channel): channel.close(promise: nil)
            case .detached(let close): close()
            }
        }
    }

    /// Waits up to `timeout` for the sessions to end, then closes the rest. Returns how many were cut.
    func drain(timeout: TimeAmount) async -> Int {
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
