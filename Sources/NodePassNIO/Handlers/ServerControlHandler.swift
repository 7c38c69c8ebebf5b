import Logging
import CoreMetrics
import NIOCore
import NIOSSL
import NIOTLS
import NodePassCore

/// The server end of a control channel, after `NIOSSLServerHandler`: bounds the TLS handshake, then
/// announces the pool port at once and every report interval (the heartbeat). v1 clients send nothing;
/// anything they send is dropped.
final class ServerControlHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let poolPort: Int
    private let reportInterval: TimeAmount
    private let handshakeTimeout: TimeAmount
    private let onHandshakeEnded: @Sendable (_ succeeded: Bool, _ channel: any Channel) -> Void
    private let onClosed: @Sendable (_ channel: any Channel) -> Void
    private let logger: Logger
    private var handshakeTimer: Scheduled<Void>?
    private var heartbeat: RepeatedTask?
    private var handshakeDone = false
    private var refused = false
    private let started = NIODeadline.now()
    private let handshakeDuration: Timer

    init(
        poolPort: Int,
        reportInterval: TimeAmount,
        handshakeTimeout: TimeAmount,
        handshakeDuration: Timer,
        logger: Logger,
        onHandshakeEnded: @escaping @Sendable (_ succeeded: Bool, _ channel: any Channel) -> Void,
        onClosed: @escaping @Sendable (_ channel: any Channel) -> Void
    ) {
        self.poolPort = poolPort
        self.reportInterval = reportInterval
        self.handshakeTimeout = handshakeTimeout
        self.handshakeDuration = handshakeDuration
        self.logger = logger
        self.onHandshakeEnded = onHandshakeEnded
        self.onClosed = onClosed
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        let logger = self.logger
        self.handshakeTimer = context.eventLoop.scheduleTask(in: self.handshakeTimeout) {
            logger.debug("TLS handshake timed out", metadata: ["np.peer": "\(channel.peerDescription)"])
            channel.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let negotiated) = event, !self.handshakeDone {
            self.handshakeDone = true
            if negotiated == ServerControlV2Handler.alpn {
                self.refuseV2Client(context: context)
                return
            }
            self.handshakeTimer?.cancel()
            self.handshakeTimer = nil
            TunnelMetrics.record(self.handshakeDuration, since: self.started)
            self.onHandshakeEnded(true, context.channel)
            self.sendRemote(context: context)
            let channel = context.channel
            let port = self.poolPort
            self.heartbeat = context.eventLoop.scheduleRepeatedTask(
                initialDelay: self.reportInterval,
                delay: self.reportInterval
            ) { _ in
                var line = channel.allocator.buffer(capacity: 16)
                Signal.remote(port: port).write(to: &line)
                channel.writeAndFlush(line, promise: nil)
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// A client with a key offered v2: tell it in v2's own terms that this server has none, and close.
    private func refuseV2Client(context: ChannelHandlerContext) {
        self.handshakeTimer?.cancel()
        self.handshakeTimer = nil
        self.logger.warning(
            "client refused: it has a key (protocol v2) and this server has none",
            metadata: ["np.peer": "\(context.channel.peerDescription)"]
        )
        self.onHandshakeEnded(false, context.channel)
        self.refused = true
        context.writeV2(.failure(.noKey, text: "this server has no key (protocol v1): give it the same key"), thenClose: true)
    }

    private func sendRemote(context: ChannelHandlerContext) {
        var line = context.channel.allocator.buffer(capacity: 16)
        Signal.remote(port: self.poolPort).write(to: &line)
        context.writeAndFlush(NIOAny(line), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // v1 clients send nothing after the handshake: drop whatever comes.
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.handshakeTimer?.cancel()
        self.handshakeTimer = nil
        self.heartbeat?.cancel()
        self.heartbeat = nil
        if self.refused {
            // Already reported as a failed handshake.
        } else if self.handshakeDone {
            self.onClosed(context.channel)
        } else {
            self.handshakeDone = true
            self.onHandshakeEnded(false, context.channel)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug(
            "control connection error",
            metadata: ["np.peer": "\(context.channel.peerDescription)", "np.error": "\(error)"]
        )
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension ServerControlHandler: Sendable {}
