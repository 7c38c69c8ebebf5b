import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Hands a connected TCP socket from its channel to another owner, without a byte sent or lost: the socket
/// is duplicated, the channel closed (which closes only its own descriptor), and the duplicate carries the
/// connection on. What the kernel received and nobody read stays in the socket for the new owner.
enum SocketMove {
    /// A duplicate of the channel's socket descriptor, or nil. Must run on the channel's event loop.
    static func duplicate(_ channel: any Channel) -> Int32? {
        let duplicate = try? channel.pipeline.syncOperations.withUnsafeTransportIfAvailable(
            of: NIOBSDSocket.Handle.self
        ) {
            fcntl($0, F_DUPFD_CLOEXEC, 0)
        }
        guard let duplicate, duplicate >= 0 else { return nil }
        return duplicate
    }

    /// Moves `channel`'s connection to a new channel on `loop`, set up by `initialize` before it becomes
    /// active; the future gives the new channel (on `loop`). Must run on `channel`'s event loop, at a moment
    /// when it has no read in progress and nothing left to write. `channel` is closed either way. (Should
    /// SwiftNIO fail to make the new channel before it owns the duplicate, which happens only if `loop` has
    /// shut down or the descriptor cannot be made non-blocking, the duplicate stays open.)
    static func move(
        _ channel: any Channel,
        to loop: any EventLoop,
        initialize: @escaping @Sendable (any Channel) throws -> Void
    ) -> EventLoopFuture<any Channel> {
        guard let socket = Self.duplicate(channel) else {
            channel.close(promise: nil)
            return loop.makeFailedFuture(ChannelError.ioOnClosedChannel)
        }
        channel.close(promise: nil)
        return ClientBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try initialize(channel) }
            }
            .withConnectedSocket(socket)
    }
}
