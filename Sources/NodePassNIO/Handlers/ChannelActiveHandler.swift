import NIOCore

/// Calls a closure once the channel is active (registered and connected), then passes every event on.
///
/// An accepted channel's initializer runs before the channel is registered with its event loop; work that
/// needs a live channel (reading, relaying) must wait for `channelActive`.
final class ChannelActiveHandler: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    private var onActive: ((any Channel) -> Void)?

    init(onActive: @escaping (any Channel) -> Void) {
        self.onActive = onActive
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        let onActive = self.onActive
        self.onActive = nil
        onActive?(context.channel)
    }
}

@available(*, unavailable)
extension ChannelActiveHandler: Sendable {}
