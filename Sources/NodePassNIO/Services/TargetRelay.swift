import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NodePassCore

/// The side without the users: for a launched pool connection, dial the TARGET on the pool connection's
/// event loop and relay between the two.
enum TargetRelay {
    /// Starts the relay of `pool` (launched as `id`) to `target`. `handOff` runs on the pool connection's
    /// event loop once the target is connected: it connects the pool connection's relay to the target and
    /// returns false when the pool connection is no longer usable.
    static func start(
        pool: any Channel,
        id: PoolID,
        target: HostPort,
        dialTimeout: TimeAmount,
        sessions: SessionTracker,
        metrics: TunnelMetrics,
        logger: Logger,
        handOff: @escaping @Sendable (_ target: any Channel) -> Bool
    ) {
        // Counted before the session exists: its end may be reported at once (a channel already closed).
        metrics.active.increment()
        guard sessions.add(pool, onEnd: { metrics.active.decrement() }) else {
            metrics.active.decrement()
            metrics.failed(.limit)
            logger.warning(
                "SEMAPHORE_LIMIT reached; launch refused",
                metadata: ["np.limit": "\(sessions.limit)", "np.pool.id": "\(id)"]
            )
            pool.close(promise: nil)
            return
        }
        let launched = NIODeadline.now()
        metrics.accepted.increment()
        ClientBootstrap(group: pool.eventLoop)
            .connectTimeout(dialTimeout)
            .channelInitializer { channel in
                SocketTuning.apply(to: channel)
                return channel.eventLoop.makeCompletedFuture {
                    try SocketTuning.prepareRelay(channel)
                    try channel.pipeline.syncOperations.addHandler(GlueHandler(
                            bytes: metrics.bytesDownstream,
                            splice: SpliceSetup(sessions: sessions, logger: logger)
                        )
                    )
                }
            }
            .dial(host: target.dialHost, port: target.port)
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    metrics.failed(.target)
                    logger.warning(
                        "cannot reach the target",
                        metadata: ["np.target": "\(target)", "np.error": "\(error)", "np.pool.id": "\(id)"]
                    )
                    pool.close(promise: nil)
                case .success(let targetChannel):
                    // Same event loop as the pool connection: both halves are set up before any byte moves.
                    do {
                        guard handOff(targetChannel) else { throw ChannelError.ioOnClosedChannel }
                        let glue = try targetChannel.pipeline.syncOperations.handler(type: GlueHandler.self)
                        glue.connect(to: pool, context: try targetChannel.pipeline.syncOperations.context(handler: glue))
                    } catch {
                        targetChannel.close(promise: nil)
                        pool.close(promise: nil)
                        return
                    }
                    TunnelMetrics.record(metrics.newConnectionDuration, since: launched)
                    logger.debug(
                        "relaying",
                        metadata: [
                            "np.target": "\(target)", "np.pool.id": "\(id)",
                            "np.pool.local": "\(pool.localAddress.map { "\($0)" } ?? "?")",
                        ]
                    )
                }
            }
    }
}
