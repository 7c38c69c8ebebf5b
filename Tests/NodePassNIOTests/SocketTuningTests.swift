import Logging
import NIOCore
import NIOPosix
import Testing

@testable import NodePassNIO

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

@Suite struct SocketTuningTests {
    private static func value(_ level: Int32, _ name: Int32, of channel: any Channel) async throws -> Int {
        try await channel.eventLoop.submit {
            let option = ChannelOptions.Types.SocketOption(
                level: SocketOptionLevel(level),
                name: SocketOptionName(name)
            )
            return try channel.syncOptions?.getOption(option) ?? -1
        }.get()
    }

    /// A listener from `Listener.bootstrap`, a client connected to it and the accepted child (with the relay
    /// options when `relay`), whose end of input `inputEnded` reports.
    private static func acceptOne(
        relay: Bool
    ) async throws -> (
        listener: any Channel, client: any Channel, child: any Channel, inputEnded: EventLoopPromise<Void>
    ) {
        let group = MultiThreadedEventLoopGroup.singleton
        let arrived = group.next().makePromise(of: (any Channel).self)
        let inputEnded = group.next().makePromise(of: Void.self)
        let listener = try await Listener.bootstrap(group: group, logger: Logger(label: "test"), what: "test")
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if relay { try SocketTuning.prepareRelay(channel) }
                    try channel.pipeline.syncOperations.addHandler(InputEndRecorder(ended: inputEnded))
                    arrived.succeed(channel)
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try #require(listener.localAddress?.port)
        let client = try await ClientBootstrap(group: group).connect(host: "127.0.0.1", port: port).get()
        return (listener, client, try await arrived.futureResult.get(), inputEnded)
    }

    /// An accepted connection has keepalive, its timings and TCP_NODELAY without a system call of its own:
    /// it inherits them from the listener.
    @Test func acceptedConnectionsInheritTheListenersOptions() async throws {
        let (listener, client, child, inputEnded) = try await Self.acceptOne(relay: false)

        #expect(try await Self.value(SOL_SOCKET, SO_KEEPALIVE, of: child) != 0)
        #expect(try await Self.value(Int32(IPPROTO_TCP), TCP_NODELAY, of: child) != 0)
        #if os(Linux)
        #expect(try await Self.value(Int32(IPPROTO_TCP), TCP_KEEPIDLE, of: child) == SocketTuning.keepaliveSeconds)
        #expect(try await Self.value(Int32(IPPROTO_TCP), TCP_KEEPINTVL, of: child) == SocketTuning.keepaliveSeconds)
        #expect(try await Self.value(Int32(IPPROTO_TCP), TCP_KEEPCNT, of: child) == SocketTuning.keepaliveProbes)
        #endif
        // A dialled connection gets them from `apply`; the client above did not.
        #expect(try await Self.value(SOL_SOCKET, SO_KEEPALIVE, of: client) == 0)
        try await client.eventLoop.submit { SocketTuning.apply(to: client) }.get()
        #expect(try await Self.value(SOL_SOCKET, SO_KEEPALIVE, of: client) != 0)
        #if os(Linux)
        #expect(try await Self.value(Int32(IPPROTO_TCP), TCP_KEEPCNT, of: client) == SocketTuning.keepaliveProbes)
        #endif

        try await client.close()
        // The listener leaves half-closure off (relays set it themselves): the child closes on the client's
        // end of input instead of passing it on.
        await #expect(throws: ChannelError.self) { try await inputEnded.futureResult.get() }
        try? await child.close()  // closed already, unless the expectation above failed
        try await listener.close()
    }

    /// A relayed connection reads only when asked and passes a half-close on instead of closing.
    @Test func relayOptionsAreSetBeforeRegistration() async throws {
        let (listener, client, child, inputEnded) = try await Self.acceptOne(relay: true)
        let (autoRead, halfClosure) = try await child.eventLoop.submit {
            (
                try child.syncOptions?.getOption(.autoRead),
                try child.syncOptions?.getOption(.allowRemoteHalfClosure)
            )
        }.get()
        #expect(autoRead == false)
        #expect(halfClosure == true)
        // The client's end of input reaches the child as an event, and leaves it open: a half-close to pass on.
        try await client.close(mode: .output)
        try await child.eventLoop.submit { child.read() }.get()
        try await inputEnded.futureResult.get()
        #expect(child.isActive)

        try? await client.close()
        try? await child.close()
        try await listener.close()
    }
}

/// Succeeds `ended` on the end of input; fails it if the channel closes without one.
private final class InputEndRecorder: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let ended: EventLoopPromise<Void>

    init(ended: EventLoopPromise<Void>) {
        self.ended = ended
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { self.ended.succeed() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.ended.fail(ChannelError.alreadyClosed)
        context.fireChannelInactive()
    }
}
