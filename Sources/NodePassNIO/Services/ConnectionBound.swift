import DequeModule
import Logging
import NIOCore

/// Connections in one phase that strangers can hold open (a control channel's TLS handshake, a v2 pool
/// opening, a connection to the metrics port), bounded in number.
///
/// When the bound is reached, a new connection evicts the oldest one instead of being refused: idle
/// sockets then cannot lock the real peer out, since a real handshake or scrape finishes in a few round
/// trips while an idle socket only ages.
final class ConnectionBound: Sendable {
    private let pending = Locked(Deque<any Channel>())
    /// The most connections in the phase at once.
    let limit: Int

    init(limit: Int) {
        self.limit = max(1, limit)
    }

    /// Adds `channel`; returns the oldest channel, for the caller to close, when the bound is exceeded.
    func admit(_ channel: any Channel) -> (any Channel)? {
        self.pending.withLock { pending in
            pending.append(channel)
            return pending.count > self.limit ? pending.popFirst() : nil
        }
    }

    /// Adds `channel`; when the bound is exceeded, closes the oldest and logs `evicted` at debug.
    func admit(_ channel: any Channel, logger: Logger, evicted: @autoclosure () -> Logger.Message) {
        guard let oldest = self.admit(channel) else { return }
        logger.debug(evicted(), metadata: ["np.peer": "\(oldest.peerDescription)"])
        oldest.close(promise: nil)
    }

    /// `channel` left the phase (completed, failed or closed).
    func finish(_ channel: any Channel) {
        self.pending.withLock { pending in
            if let index = pending.firstIndex(where: { $0 === channel }) {
                pending.remove(at: index)
            }
        }
    }

    /// Shutting down: closes every connection still in the phase.
    func closeAll() {
        let channels = self.pending.withLock { pending in
            defer { pending.removeAll() }
            return Array(pending)
        }
        for channel in channels { channel.close(promise: nil) }
    }

    /// The number of connections in the phase.
    var count: Int {
        self.pending.withLock { $0.count }
    }
}
