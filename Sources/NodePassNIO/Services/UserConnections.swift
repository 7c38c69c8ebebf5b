import CoreMetrics
import Logging
import NIOCore

/// Accepted user connections on the side with the users (the server in reverse mode, the client in forward
/// mode): counted against SEMAPHORE_LIMIT, then handed to the pool once active.
struct UserConnections: Sendable {
    let relays: Relays
    private var sessions: SessionTracker { self.relays.sessions }
    private var metrics: TunnelMetrics { self.relays.metrics }
    private var logger: Logger { self.relays.logger }
    private let lastLimitLog = LimitLogClock()

    init(relays: Relays) {
        self.relays = relays
    }

    /// The child channel initializer of a user listener (it sets the relay options of `SocketTuning`).
    func initialize(_ channel: any Channel, arrived: @escaping @Sendable (RelayEnd) -> Void) -> EventLoopFuture<Void> {
        let metrics = self.metrics
        // Counted before the session exists: its end may be reported at once (a channel already closed).
        metrics.active.increment()
        guard self.sessions.add(channel, onEnd: { metrics.active.decrement() }) else {
            metrics.active.decrement()
            self.metrics.failed(.limit)
            if self.lastLimitLog.isDue() {
                self.logger.warning(
                    "SEMAPHORE_LIMIT reached; new user connections are closed",
                    metadata: ["np.limit": "\(self.sessions.limit)"]
                )
            }
            return channel.close()
        }
        metrics.accepted.increment()
        let idleTimeout = self.relays.idleTimeout
        let logger = self.logger
        return channel.eventLoop.makeCompletedFuture {
            try SocketTuning.prepareRelay(channel)
            if let idleTimeout {
                // Reads from the user and writes to the user both count as activity.
                try channel.pipeline.syncOperations.addHandlers([
                    IdleStateHandler(allTimeout: idleTimeout), IdleConnectionCloser(logger: logger),
                ])
            }
            let glue = self.relays.glue(.user)
            try channel.pipeline.syncOperations.addHandlers([
                ChannelActiveHandler { arrived(RelayEnd(channel: $0, glue: glue)) },
                glue,
            ])
        }
    }
}

/// At most one limit log line a second.
private final class LimitLogClock: Sendable {
    private let last = Locked<NIODeadline>(.distantPast)

    func isDue() -> Bool {
        let now = NIODeadline.now()
        return self.last.withLock { last in
            guard now - last >= .seconds(1) else { return false }
            last = now
            return true
        }
    }
}
