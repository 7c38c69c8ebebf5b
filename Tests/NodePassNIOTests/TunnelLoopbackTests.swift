import Logging
import NIOCore
import NIOPosix
import NodePassCore
import ServiceLifecycle
import Testing

@testable import NodePassNIO

@Suite(.timeLimit(.minutes(1))) struct TunnelLoopbackTests {
    @Test func serverAndClientRelayBothWaysWithHalfClose() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let echo = try await EchoHandler.listen(group: group)
        let echoPort = try #require(echo.localAddress?.port)

        var configuration = Configuration()
        configuration.minPoolCapacity = 2
        configuration.maxPoolCapacity = 8
        configuration.serviceCooldown = .milliseconds(100)
        let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

        let (portsStream, portsContinuation) = AsyncStream.makeStream(of: ServerPorts.self)
        let server = TunnelServer(
            url: TunnelURL(
                role: .server,
                tunnel: HostPort(host: "127.0.0.1", port: 0),
                target: HostPort(host: "127.0.0.1", port: 0)
            ),
            configuration: configuration,
            group: group,
            logger: logger,
            onListening: { portsContinuation.yield($0) }
        )
        let serverGroup = ServiceGroup(services: [server], logger: logger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await serverGroup.run() }
            var iterator = portsStream.makeAsyncIterator()
            let ports = try #require(await iterator.next())

            let client = TunnelClient(
                url: TunnelURL(
                    role: .client,
                    tunnel: HostPort(host: "127.0.0.1", port: ports.tunnel),
                    target: HostPort(host: "127.0.0.1", port: echoPort)
                ),
                configuration: configuration,
                group: group,
                logger: logger
            )
            let clientGroup = ServiceGroup(services: [client], logger: logger)
            tasks.addTask { try await clientGroup.run() }

            let payload = ByteBuffer(repeating: 0x5A, count: 300_000)
            let user = try await ClientBootstrap(group: group)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .connect(host: "127.0.0.1", port: ports.target) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(isOutboundHalfClosureEnabled: true)
                        )
                    }
                }
            var received = ByteBuffer()
            try await user.executeThenClose { inbound, outbound in
                try await withThrowingTaskGroup(of: Void.self) { io in
                    io.addTask {
                        try await outbound.write(payload)
                        outbound.finish()
                    }
                    for try await chunk in inbound {
                        received.writeImmutableBuffer(chunk)
                    }
                    try await io.waitForAll()
                }
            }
            #expect(received == payload)

            await clientGroup.triggerGracefulShutdown()
            await serverGroup.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(server.sessionCount == 0)
        try await echo.close()
    }
}
