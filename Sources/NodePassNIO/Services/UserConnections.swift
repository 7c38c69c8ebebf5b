import CoreMetrics
import Logging
import NIOCore

/// Accepted user connections on the side with the users (the server in reverse mode, the client in forward
/// mode): counted against SEMAPHORE_LIMIT, then handed to the pool once active.
struct UserConnections: Sendable {
    let pipelines: Pipelines
    private var sessions: SessionTracker { self.pipelines.sessions }
    private var metrics: TunnelMetrics { self.pipelines.metrics }
    private var logger: Logger { self.pipelines.logger }
    private let lastLimitLog = LimitLogClock()

    init(pipelines: Pipelines) {
        self.pipelines = pipelines
    }

    /// The child channel initializer of a user listener: admits the user, then makes its pipeline.
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
        return channel.eventLoop.makeCompletedFuture { [pipelines] in
            try pipelines.user(channel, arrived: arrived)
        }
    }
}
