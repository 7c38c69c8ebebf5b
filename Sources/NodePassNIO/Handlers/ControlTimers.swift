import NIOCore
import NodePassCore

/// The two timers of a control channel, on its event loop: the deadline of the handshake and the heartbeat.
struct ControlTimers {
    private var handshake: Scheduled<Void>?
    private var heartbeat: RepeatedTask?

    /// Runs `expired` on `context`'s event loop if the handshake has not ended within `timeout`.
    mutating func startHandshakeDeadline(
        context: ChannelHandlerContext,
        timeout: TimeAmount,
        expired: @escaping (ChannelHandlerContext) -> Void
    ) {
        let bound = NIOLoopBound((expired, context), eventLoop: context.eventLoop)
        self.handshake = context.eventLoop.scheduleTask(in: timeout) { bound.value.0(bound.value.1) }
    }

    /// The handshake ended.
    mutating func handshakeEnded() {
        self.handshake?.cancel()
        self.handshake = nil
    }

    /// Runs `due` on `context`'s event loop every `interval`, first after one interval.
    mutating func startHeartbeat(
        context: ChannelHandlerContext,
        interval: TimeAmount,
        due: @escaping (ChannelHandlerContext) -> Void
    ) {
        let bound = NIOLoopBound((due, context), eventLoop: context.eventLoop)
        self.heartbeat = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            bound.value.0(bound.value.1)
        }
    }

    /// The channel closed: both timers stop.
    mutating func cancelAll() {
        self.handshakeEnded()
        self.heartbeat?.cancel()
        self.heartbeat = nil
    }
}

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
