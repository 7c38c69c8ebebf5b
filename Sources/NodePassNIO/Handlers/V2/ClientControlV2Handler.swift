import CoreMetrics
import Crypto
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import NodePassCore

/// The client end of a v2 control channel, after `NIOSSLClientHandler` (offering `nodepass/2`) and a
/// `V2FrameDecoder`: fails at once against a v1 server, runs the handshake bound to the certificate the
/// server presented, then starts the pool with the session's parameters, relays launches and exchanges
/// heartbeats.
final class ClientControlV2Handler: ChannelInboundHandler {
    typealias InboundIn = V2Frame

    private enum State {
        case tls
        case handshaking(V2ClientHandshakeStateMachine)
        case established
        case closed
    }

    private var state: State = .tls
    private let key: V2Key
    private let pool: ClientPool
    private let handshakeTimeout: TimeAmount
    private let connected: EventLoopPromise<Void>
    private let handshakeDuration: Timer
    private let dataTLS: NIOSSLContext
    private let logger: Logger
    private var timer: Scheduled<Void>?
    private var heartbeat: V2Heartbeat?
    private let started = NIODeadline.now()

    init(
        key: V2Key,
        pool: ClientPool,
        handshakeTimeout: TimeAmount,
        connected: EventLoopPromise<Void>,
        handshakeDuration: Timer,
        logger: Logger,
        dataTLS: NIOSSLContext
    ) {
        self.key = key
        self.pool = pool
        self.handshakeTimeout = handshakeTimeout
        self.connected = connected
        self.handshakeDuration = handshakeDuration
        self.logger = logger
        self.dataTLS = dataTLS
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: self.handshakeTimeout) {
            channel.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let negotiated) = event, case .tls = self.state {
            guard negotiated == ServerControlV2Handler.alpn else {
                self.fail(
                    context: context,
                    message: nil,
                    error: NodePassError(
                        .versionMismatch,
                        "the server speaks protocol v1 (it has no key): give the server the same key"
                    )
                )
                return
            }
            let certificate = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate
            guard let der = try? certificate?.toDERBytes() else {
                self.fail(context: context, message: nil, error: NodePassError(.tls, "the server presented no certificate"))
                return
            }
            var machine = V2ClientHandshakeStateMachine(
                key: self.key,
                clientNonce: ServerControlV2Handler.randomBytes(V2Message.nonceLength),
                fingerprint: Array(SHA256.hash(data: der))
            )
            let hello = machine.started()
            self.state = .handshaking(machine)
            context.writeV2(hello)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let message: V2Message
        do {
            message = try V2Message(frame: self.unwrapInboundIn(data))
        } catch {
            self.fail(context: context, message: .failure(.protocolViolation, text: "malformed message"), error: error)
            return
        }
        switch self.state {
        case .tls, .closed:
            break
        case .handshaking(var machine):
            let action = machine.messageReceived(message)
            self.state = .handshaking(machine)
            switch action {
            case .send(let reply):
                context.writeV2(reply)
            case .fail(let reply, let error):
                self.fail(context: context, message: reply, error: error)
            case .established(let parameters, let secret):
                self.establish(context: context, parameters: parameters, secret: secret)
            }
        case .established:
            self.heartbeat?.received(message, context: context, logger: self.logger) { id in
                guard !self.pool.isForward else {
                    self.logger.warning("launch from the server ignored: this side has the users (forward mode)")
                    return
                }
                self.logger.debug("launch received", metadata: ["np.pool.id": "\(id)"])
                self.pool.launch(id)
            }
        }
    }

    private func establish(context: ChannelHandlerContext, parameters: V2SessionParameters, secret: V2SessionSecret) {
        let tls = parameters.tls == .plain ? nil : self.dataTLS
        self.state = .established
        self.timer?.cancel()
        self.timer = nil
        TunnelMetrics.record(self.handshakeDuration, since: self.started)
        self.logger.info(
            "connected to the server; authenticated",
            metadata: [
                "np.pool.port": "\(parameters.poolPort)", "np.mode": "\(parameters.mode)", "np.tls": "\(parameters.tls.rawValue)",
            ]
        )
        self.pool.start(
            port: parameters.poolPort,
            host: context.channel.remoteAddress?.ipAddress,
            v2: V2PoolSettings(sessionID: parameters.sessionID, secret: secret, tls: tls, fingerprint: parameters.dataFingerprint),
            forwardControl: parameters.mode == .forward ? context.channel : nil
        )
        self.connected.succeed()
        let interval = TimeAmount.milliseconds(Int64(parameters.heartbeatMilliseconds))
        let heartbeat = V2Heartbeat(interval: interval, now: .now())
        heartbeat.start(context: context, interval: interval, logger: self.logger)
        self.heartbeat = heartbeat
    }

    private func fail(context: ChannelHandlerContext, message: V2Message?, error: NodePassError) {
        if case .closed = self.state { return }
        self.state = .closed
        self.connected.fail(error)
        if let message {
            context.writeV2(message, thenClose: true)
        } else {
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        self.heartbeat?.stop()
        self.heartbeat = nil
        self.state = .closed
        self.connected.fail(NodePassError(.controlChannelLost, "the server closed the connection during the handshake"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("control channel error", metadata: ["np.error": "\(error)"])
        self.fail(context: context, message: nil, error: NodePassError(.tls, "control channel failed: \(error)"))
    }
}

@available(*, unavailable)
extension ClientControlV2Handler: Sendable {}
