import NIOCore
import NodePassCore

/// What a server pool connection reports to its pool. Called on the connection's event loop.
public protocol ServerPoolConnectionDelegate: AnyObject, Sendable {
    /// A pool connection was accepted: returns the ID to give it, or nil to refuse it.
    func poolConnectionAccepted(_ channel: any Channel) -> PoolID?
    /// The ID was written: the connection is idle.
    func poolConnectionReady(_ channel: any Channel, id: PoolID)
    /// An idle connection closed or broke the protocol (sent bytes before its launch).
    func poolConnectionClosed(id: PoolID, protocolViolation: Bool)
}

/// The server side of a pool connection before its launch: writes the 8-character ID in a single write,
/// then watches the idle connection (any byte or end of input means it is dead) until it is handed off;
/// after that it passes every event on to the `GlueHandler` behind it.
///
/// The channel must have `autoRead` off.
public final class ServerPoolConnectionHandler: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer

    private enum State {
        case opening
        case idle(PoolID)
        case done
    }

    private var state: State = .opening
    private let delegate: any ServerPoolConnectionDelegate

    /// Makes the handler.
    public init(delegate: any ServerPoolConnectionDelegate) {
        self.delegate = delegate
    }

    public func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        let delegate = self.delegate
        guard let id = delegate.poolConnectionAccepted(context.channel) else {
            self.state = .done
            context.close(promise: nil)
            return
        }
        var buffer = context.channel.allocator.buffer(capacity: PoolID.wireLength)
        id.write(to: &buffer)
        context.writeAndFlush(NIOAny(buffer), promise: nil)
        self.state = .idle(id)
        delegate.poolConnectionReady(context.channel, id: id)
        context.read()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.state {
        case .idle(let id):
            self.state = .done
            self.delegate.poolConnectionClosed(id: id, protocolViolation: true)
            context.close(promise: nil)
        case .opening, .done:
            context.fireChannelRead(data)
        }
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event, case .idle = self.state {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if case .idle(let id) = self.state {
            self.state = .done
            self.delegate.poolConnectionClosed(id: id, protocolViolation: false)
        }
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// Ends the idle phase: from now on every event passes through to the `GlueHandler` after this one.
    /// Must run on the channel's event loop. Returns false when the connection is no longer usable.
    public func handOff(context: ChannelHandlerContext) -> Bool {
        guard case .idle = self.state, context.channel.isActive else { return false }
        self.state = .done
        return true
    }
}

@available(*, unavailable)
extension ServerPoolConnectionHandler: Sendable {}
