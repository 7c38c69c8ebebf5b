import Logging
import NIOCore

/// After an `IdleStateHandler`: closes the connection when nothing moved for the idle timeout (users' and
/// targets' connections: IDLE_TIMEOUT, so that forgotten or stalled relays do not hold SEMAPHORE_LIMIT
/// slots for ever; the metrics port: `MetricsServer.idleTimeout`).
final class IdleConnectionCloser: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    private let logger: Logger
    private let message: Logger.Message

    init(logger: Logger, message: Logger.Message) {
        self.logger = logger
        self.message = message
    }

    /// Adds an `IdleStateHandler` and a closer to `channel`'s pipeline: the channel closes once nothing moved
    /// either way for `timeout` (reads and completed writes both count), logging `message` at debug. Must
    /// run on the channel's event loop.
    static func install(
        on channel: any Channel,
        after timeout: TimeAmount,
        logger: Logger,
        message: Logger.Message
    ) throws {
        try channel.pipeline.syncOperations.addHandlers([
            IdleStateHandler(allTimeout: timeout), IdleConnectionCloser(logger: logger, message: message),
        ])
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case IdleStateHandler.IdleStateEvent.all = event {
            self.logger.debug(self.message, metadata: ["np.peer": "\(context.channel.peerDescription)"])
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

@available(*, unavailable)
extension IdleConnectionCloser: Sendable {}
