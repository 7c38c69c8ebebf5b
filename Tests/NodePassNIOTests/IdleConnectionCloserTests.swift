import Logging
import NIOCore
import NIOEmbedded
import Testing

@testable import NodePassNIO

/// `IdleStateHandler` measures idleness with the real clock, so the timeout itself is tested end to end
/// (`test_hostile.py`); here, what the closer does with its events.
@Suite struct IdleConnectionCloserTests {
    private func makeChannel() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(
            handler: IdleConnectionCloser(logger: Logger(label: "test"), message: "idle test connection closed")
        )
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    @Test func idleBothWaysClosesTheConnection() throws {
        let channel = try self.makeChannel()
        channel.pipeline.fireUserInboundEventTriggered(IdleStateHandler.IdleStateEvent.all)
        #expect(!channel.isActive)
    }

    @Test func otherEventsPassThroughAndKeepItOpen() throws {
        let channel = try self.makeChannel()
        channel.pipeline.fireUserInboundEventTriggered(IdleStateHandler.IdleStateEvent.read)
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(channel.isActive)
        _ = try channel.finish(acceptAlreadyClosed: false)
    }
}
