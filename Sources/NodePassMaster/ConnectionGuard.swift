import NIOCore
import NIOHTTPTypes
import Synchronization

/// Keeps strangers from holding the API's connections: a request must arrive whole within `deadline` of the
/// connection's start or of the previous answer (a client that trickles bytes cannot keep a connection for
/// ever), and one address holds at most `PeerConnections.maximumPerPeer` connections at once.
final class ConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    /// The time a whole request may take to arrive.
    static let deadline = TimeAmount.seconds(10)

    private let peers: PeerConnections
    private var timer: Scheduled<Void>?
    private var peer: String?

    init(peers: PeerConnections) {
        self.peers = peers
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { self.started(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        self.started(context: context)
        context.fireChannelActive()
    }

    private func started(context: ChannelHandlerContext) {
        guard self.peer == nil else { return }
        let address = context.channel.remoteAddress?.ipAddress ?? "unknown"
        self.peer = address
        guard self.peers.admit(address) else {
            self.peer = ""
            context.close(promise: nil)
            return
        }
        self.arm(context: context)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        if let peer = self.peer, !peer.isEmpty { self.peers.leave(peer) }
        self.peer = nil
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .end = self.unwrapInboundIn(data) {
            self.timer?.cancel()
            self.timer = nil
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = self.unwrapOutboundIn(data) { self.arm(context: context) }
        context.write(data, promise: promise)
    }

    private func arm(context: ChannelHandlerContext) {
        self.timer?.cancel()
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: Self.deadline) { channel.close(promise: nil) }
    }
}

/// The API's connections by peer address.
final class PeerConnections: Sendable {
    /// The most connections one address holds at once.
    static let maximumPerPeer = 32
    private let counts = Mutex<[String: Int]>([:])

    /// Counts a new connection from `peer`; false (and not counted) when that address holds the most.
    func admit(_ peer: String) -> Bool {
        self.counts.withLock { counts in
            guard counts[peer, default: 0] < Self.maximumPerPeer else { return false }
            counts[peer, default: 0] += 1
            return true
        }
    }

    func leave(_ peer: String) {
        self.counts.withLock { counts in
            let left = counts[peer, default: 0] - 1
            counts[peer] = left > 0 ? left : nil
        }
    }
}
