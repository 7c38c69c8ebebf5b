import Logging
import NIOCore
import NIOPosix
import NodePassCore
import ServiceLifecycle
import Testing

@testable import NodePassNIO

/// The metrics port on loopback: what it does with connections that never scrape.
@Suite(.timeLimit(.minutes(1))) struct MetricsServerTests {
    /// Runs a metrics server for `body`, which gets its port. The server has one event loop, so that it
    /// admits connections in the order they were opened.
    private func withServer(idleTimeout: TimeAmount, _ body: (Int) async throws -> Void) async throws {
        let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        let (ports, listening) = AsyncStream.makeStream(of: Int.self)
        let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { loop.shutdownGracefully { _ in } }
        let server = MetricsServer(
            address: HostPort(host: "127.0.0.1", port: 0),
            group: loop,
            logger: logger,
            idleTimeout: idleTimeout,
            onListening: { listening.yield($0) },
            render: { Array("up 1\n".utf8) }
        )
        let services = ServiceGroup(services: [server], logger: logger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await services.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            do {
                try await body(port)
            } catch {
                await services.triggerGracefulShutdown()
                throw error
            }
            await services.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }

    private func connect(_ port: Int) async throws -> any Channel {
        try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port).get()
    }

    @Test func anIdleConnectionIsClosedAfterTheIdleTimeout() async throws {
        try await self.withServer(idleTimeout: .milliseconds(200)) { port in
            let opened = ContinuousClock.now
            let idle = try await self.connect(port)
            try await idle.closeFuture.get()
            // Not at once: after the idle timeout (which the server starts a little after the connect began).
            #expect(ContinuousClock.now - opened >= .milliseconds(150))
        }
    }

    @Test func oneConnectionMoreThanTheLimitClosesTheOldest() async throws {
        try await self.withServer(idleTimeout: .seconds(60)) { port in
            var open: [any Channel] = []
            for _ in 0...MetricsServer.connectionLimit {
                open.append(try await self.connect(port))
            }
            // The server closes the oldest once it has accepted the one over the limit.
            try await open[0].closeFuture.get()
            let newest = try await self.connect(port)
            try await open[1].closeFuture.get()
            #expect(open.dropFirst(2).allSatisfy { $0.isActive } && newest.isActive)
            for channel in open.dropFirst(2) + [newest] {
                try await channel.close()
            }
        }
    }
}
