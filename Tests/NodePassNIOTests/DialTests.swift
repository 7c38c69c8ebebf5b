import NIOCore
import NIOPosix
import Testing

@testable import NodePassNIO

@Suite struct DialTests {
    /// An IP address and a name both reach the service; a port nobody listens on fails.
    @Test(arguments: ["127.0.0.1", "localhost"])
    func dialReachesTheService(host: String) async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let service = try await EchoHandler.listen(group: group)
        let port = try #require(service.localAddress?.port)
        let channel = try await ClientBootstrap(group: group).dial(host: host, port: port).get()
        #expect(channel.remoteAddress?.port == port)
        #expect(channel.remoteAddress?.ipAddress == "127.0.0.1")
        try await channel.close()
        try await service.close()
    }

    @Test func dialToAClosedPortFails() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let service = try await EchoHandler.listen(group: group)
        let port = try #require(service.localAddress?.port)
        try await service.close()
        await #expect(throws: (any Error).self) {
            try await ClientBootstrap(group: group).dial(host: "127.0.0.1", port: port).get()
        }
    }
}
