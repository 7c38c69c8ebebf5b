import Logging
import NIOCore
import NodePassCore

/// Sends a v2 heartbeat every period and closes the channel when the peer has been silent for three.
/// Lives on the channel's event loop; `stop()` on close.
final class V2Heartbeat {
    private var monitor: HeartbeatMonitor
    private var task: RepeatedTask?

    init(interval: TimeAmount, now: NIODeadline) {
        self.monitor = HeartbeatMonitor(interval: interval, now: now)
    }

    /// Starts the periodic send-and-check on `context`'s channel.
    func start(context: ChannelHandlerContext, interval: TimeAmount, logger: Logger) {
        let channel = context.channel
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        self.task = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            let heartbeat = loopBound.value
            if heartbeat.monitor.isDead(now: .now()) {
                logger.error(
                    "no heartbeat from the peer; control channel considered dead",
                    metadata: [
                        "np.peer": "\(channel.peerDescription)",
                        "np.silence": "\(DurationParser.format(heartbeat.monitor.deadAfter))",
                    ]
                )
                channel.close(promise: nil)
                return
            }
            var buffer = channel.allocator.buffer(capacity: V2Frame.headerLength)
            V2Message.heartbeat.write(to: &buffer)
            channel.writeAndFlush(buffer, promise: nil)
        }
    }

    /// A message came from the peer after the handshake: it counts as a sign of life; a launch goes to
    /// `launch`; a failure or a handshake message ends the session.
    func received(_ message: V2Message, context: ChannelHandlerContext, logger: Logger, launch: (PoolID) -> Void) {
        self.monitor.messageReceived(now: .now())
        switch message {
        case .heartbeat, .unknown:
            break
        case .launch(let id):
            launch(id)
        case .failure(let reason, let text):
            logger.error("the peer closed the session", metadata: ["np.reason": "\(reason)", "np.text": "\(text)"])
            context.close(promise: nil)
        case .hello, .challenge, .authenticate, .welcome:
            logger.error("handshake message after the handshake; control channel closed")
            context.close(promise: nil)
        }
    }

    func stop() {
        self.task?.cancel()
        self.task = nil
    }
}

@available(*, unavailable)
extension V2Heartbeat: Sendable {}

extension ChannelHandlerContext {
    /// Writes one v2 message and flushes; closes the channel when the write fails, or after it when
    /// `thenClose` is set.
    func writeV2(_ message: V2Message, thenClose: Bool = false) {
        var buffer = self.channel.allocator.buffer(capacity: 64)
        message.write(to: &buffer)
        let channel = self.channel
        self.writeAndFlush(NIOAny(buffer)).whenComplete { result in
            if thenClose || (try? result.get()) == nil {
                channel.close(promise: nil)
            }
        }
    }
}
