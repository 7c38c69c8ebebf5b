import Logging
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// On a listening channel: when accepting fails (above all for want of file descriptors), says why and
/// stops accepting for a second.
///
/// NIO's own `AcceptBackoffHandler` delays the next `read`, but after a failed `accept` the channel still
/// counts its read as pending and stays registered for readability, so a connection waiting in the backlog
/// wakes the event loop again at once: a busy loop. Turning `autoRead` off unregisters the listener; turning it
/// back on a second later accepts again.
final class AcceptPauseHandler: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    /// How long accepting pauses after a failure.
    static let pause = TimeAmount.seconds(1)

    private let logger: Logger
    private let what: String
    private var paused = false

    init(logger: Logger, what: String) {
        self.logger = logger
        self.what = what
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard error is IOError, !self.paused, let options = context.channel.syncOptions else {
            context.fireErrorCaught(error)
            return
        }
        var metadata: Logger.Metadata = [
            "np.listener": "\(self.what)", "np.error": "\(UserFacingError.describe(error))",
        ]
        if let ioError = error as? IOError, ioError.errnoCode == EMFILE || ioError.errnoCode == ENFILE {
            metadata["np.hint"] =
                "out of file descriptors: raise the limit (ulimit -n, LimitNOFILE) or lower SEMAPHORE_LIMIT"
        }
        self.logger.warning("cannot accept connections; pausing for 1 s", metadata: metadata)
        do {
            try options.setOption(.autoRead, value: false)
        } catch {
            context.fireErrorCaught(error)
            return
        }
        self.paused = true
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: Self.pause) {
            let (handler, context) = loopBound.value
            handler.paused = false
            try? context.channel.syncOptions?.setOption(.autoRead, value: true)
        }
        context.fireErrorCaught(error)
    }
}

@available(*, unavailable)
extension AcceptPauseHandler: Sendable {}
