import Logging
import NIOCore

/// After an `IdleStateHandler`: closes the connection when nothing moved for the idle timeout (IDLE_TIMEOUT),
/// so that forgotten or stalled user connections do not hold SEMAPHORE_LIMIT slots for ever.
final class IdleConnectionCloser: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    private let logger: Logger

    init(logger: Logger) {
        self.logger = logger
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case IdleStateHandler.IdleStateEvent.all = event {
            self.logger.debug(
                "idle user connection closed",
                metadata: ["np.peer": "\(context.channel.peerDescription)"]
            )
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

@available(*, unavailable)
extension IdleConnectionCloser: Sendable {}
