#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import NodePassNIO

@Suite struct SocketTuningTests {
    private static func value(_ level: Int32, _ name: Int32, of channel: any Channel) async throws -> Int {
        try await channel.eventLoop.submit {
            let option = ChannelOptions.Types.SocketOption(level: SocketOptionLevel(level), name: SocketOptionName(name))
            return try channel.syncOptions?.getOption(option) ?? -1
        }.get()
    }

    /// An accepted connection has keepalive, its timings and TCP_NODELAY without a system call of its own:
    /// it inherits them from the listener.
    @Test func acceptedConnectionsInheritTheListenersOptions() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let arrived = group.next().makePromise(of: (any Channel).self)
        let listener = try await Listener.bootstrap(group: group, logger: Logger(label: "test"), what: "test")
            .childChannelInitializer { channel in
                arrived.succeed(channel)
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try #require(listener.localAddress?.port)
        let client = try await ClientBootstrap(group: group).connect(host: "127.0.0.1", port: port).get()
        let child = try await arrived.futureResult.get()

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
        try await child.close()
        try await listener.close()
    }
}
