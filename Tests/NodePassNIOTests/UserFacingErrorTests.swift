import NIOCore
import NIOPosix
import NodePassCore
import Testing

@testable import NodePassNIO

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Errors said as the person running the tunnel says them, without SwiftNIO's type names.
@Suite struct UserFacingErrorTests {
    @Test(arguments: [
        (ECONNREFUSED, "connection refused"),
        (EADDRINUSE, "address already in use"),
        (ENETUNREACH, "network is unreachable"),
        (EHOSTUNREACH, "no route to host"),
        (ETIMEDOUT, "timed out"),
        (EACCES, "permission denied"),
    ])
    func systemErrorsAreSaidInLowerCaseWords(code: Int32, words: String) {
        #expect(UserFacingError.describe(IOError(errnoCode: code, reason: "connect")) == words)
    }

    @Test func aNodePassErrorSaysItsMessageThenItsCause() {
        let cause = IOError(errnoCode: EADDRINUSE, reason: "bind(descriptor:ptr:bytes:)")
        let error = NodePassError(.bindFailed, "cannot listen on 127.0.0.1:10101", underlying: cause)
        #expect(UserFacingError.describe(error) == "cannot listen on 127.0.0.1:10101: address already in use")
        #expect(UserFacingError.describe(NodePassError(.timeout, "no answer")) == "no answer")
    }

    @Test func timeoutsAndNameLookupsAreSaidInWords() {
        #expect(UserFacingError.describe(ChannelError.connectTimeout(.seconds(10))) == "timed out after 10s")
        #expect(
            UserFacingError.describe(lookupCode: Int(EAI_NONAME), text: "Name or service not known") == "name not found"
        )
        #expect(
            UserFacingError.describe(lookupCode: Int(EAI_AGAIN), text: "Temporary failure")
                == "the name could not be looked up now (is a DNS server reachable?)"
        )
        #expect(UserFacingError.describe(ChannelError.eof) == "the connection closed")
    }

    /// A real failed connection, as SwiftNIO reports it (`NIOConnectionError` wrapping the refusal).
    @Test func aRefusedConnectionIsSaidAsRefused() async throws {
        let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try #require(listener.localAddress?.port)
        try await listener.close()
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port).get()
            try await channel.close()
            Issue.record("the closed port accepted a connection")
        } catch {
            #expect(UserFacingError.describe(error) == "connection refused")
        }
    }
}
