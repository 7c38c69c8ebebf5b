import DequeModule
import NIOCore

/// The control connections whose TLS handshake has not finished, bounded in number.
///
/// When the bound is reached, a new connection evicts the oldest pending one instead of being refused:
/// idle sockets left on the tunnel port then cannot lock the real client out, since a real handshake
/// finishes in a few round trips while an idle socket only ages.
final class PendingHandshakes: Sendable {
    private let pending = Locked(Deque<any Channel>())
    /// The most handshakes in progress at once.
    let limit: Int

    init(limit: Int) {
        self.limit = max(1, limit)
    }

    /// Adds `channel`; returns the oldest pending channel to close when the bound is exceeded.
    func admit(_ channel: any Channel) -> (any Channel)? {
        self.pending.withLock { pending in
            pending.append(channel)
            return pending.count > self.limit ? pending.popFirst() : nil
        }
    }

    /// The handshake of `channel` ended (completed, failed or closed).
    func finish(_ channel: any Channel) {
        self.pending.withLock { pending in
            if let index = pending.firstIndex(where: { $0 === channel }) {
                pending.remove(at: index)
            }
        }
    }

    /// Shutting down: closes every connection still in its handshake.
    func closeAll() {
        let channels = self.pending.withLock { pending in
            defer { pending.removeAll() }
            return Array(pending)
        }
        for channel in channels { channel.close(promise: nil) }
    }

    /// The number of handshakes in progress.
    var count: Int {
        self.pending.withLock { $0.count }
    }
}
