import NIOCore
import Testing

@testable import NodePassNIO

@Suite struct ServerPoolAddressTests {
    @Test func mappedIPv4MatchesPlainIPv4() throws {
        let mapped = try SocketAddress(ipAddress: "::ffff:192.0.2.7", port: 1)
        let plain = try SocketAddress(ipAddress: "192.0.2.7", port: 2)
        #expect(ServerPool.normalizedIP(mapped) == "192.0.2.7")
        #expect(ServerPool.normalizedIP(plain) == "192.0.2.7")
    }

    @Test func otherAddressesStayApart() throws {
        #expect(ServerPool.normalizedIP(try SocketAddress(ipAddress: "::1", port: 1)) == "::1")
        #expect(ServerPool.normalizedIP(try SocketAddress(ipAddress: "192.0.2.8", port: 1)) != "192.0.2.7")
        #expect(ServerPool.normalizedIP(nil) == nil)
    }
}
