import CoreMetrics
import Logging
import NIOCore
import NIOTLS
import NodePassCore

/// What became of a client that finished its handshake.
enum SessionAdmission: Sendable {
    /// Its session runs.
    case admitted
    /// v2: the server serves as many clients as it accepts (or the session ID is taken).
    case full
    /// The server is shutting down: the control channel is closed without a word.
    case closing
}

/// What a server control channel asks of the server.
protocol ServerControlDelegate: AnyObject, Sendable {
    /// v1: a client is connected (it replaces any other); `.closing` when the server is shutting down.
    func controlConnected(_ channel: any Channel) -> SessionAdmission
    /// v2: a client proved the key: register its session.
    func v2SessionStarted(
        _ channel: any Channel,
        sessionID: [UInt8],
        secret: V2SessionSecret,
        datagrams: Bool
    ) -> SessionAdmission
    /// A connected client's control channel closed.
    func controlClosed(_ channel: any Channel)
    /// The client launched one of its pool connections (forward mode; `.datagrams`: as a datagram carrier).
    func launchReceived(_ id: PoolID, launch: PoolLaunch, from channel: any Channel)
}

/// The server end of a control channel (v1 and v2), after `NIOSSLServerHandler` and the decoder of its
/// protocol: performs what its `ServerControlStateMachine` decides. It bounds the handshake, announces the
/// pool port (v1) or runs the v2 handshake, keeps the heartbeat, and passes launches on.
final class ServerControlHandler: ChannelInboundHandler {
    typealias InboundIn = ControlInput

    private var machine: ServerControlStateMachine
    private var timers = ControlTimers()
    private let delegate: any ServerControlDelegate
    private let handshakeTimeout: TimeAmount
    private let metrics: TunnelMetrics
    /// v2: the parameters of every session this server starts, each with a session ID of its own.
    private let parameters: V2SessionParameters
    private let onHandshakeEnded: @Sendable (_ channel: any Channel) -> Void
    private var logger: Logger
    private let started = NIODeadline.now()

    init(
        version: ServerControlStateMachine.Version,
        configuration: Configuration,
        delegate: any ServerControlDelegate,
        metrics: TunnelMetrics,
        logger: Logger,
        parameters: V2SessionParameters,
        onHandshakeEnded: @escaping @Sendable (_ channel: any Channel) -> Void
    ) {
        self.machine = ServerControlStateMachine(version: version, heartbeatInterval: configuration.reportInterval)
        self.handshakeTimeout = configuration.handshakeTimeout
        self.delegate = delegate
        self.metrics = metrics
        self.logger = logger
        self.parameters = parameters
        self.onHandshakeEnded = onHandshakeEnded
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.logger[metadataKey: "np.peer"] = "\(context.channel.peerDescription)"
        self.timers.startHandshakeDeadline(context: context, timeout: self.handshakeTimeout) { context in
            self.perform(self.machine.handshakeTimedOut(), context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let negotiated) = event {
            let nonce = SecureRandom.bytes(V2Message.nonceLength)
            self.perform(self.machine.tlsHandshakeCompleted(alpn: negotiated, nonce: nonce), context: context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // v1 clients send nothing after the handshake: their lines are dropped.
        guard case .frame(let frame) = self.unwrapInboundIn(data) else { return }
        let action: ServerControlStateMachine.Action
        do {
            action = self.machine.messageReceived(try V2Message(frame: frame), now: context.eventLoop.now)
        } catch {
            action = self.machine.malformedMessageReceived(error)
        }
        self.perform(action, context: context)
    }

    private func perform(_ action: ServerControlStateMachine.Action, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .startV1(let poolPort):
            guard self.delegate.controlConnected(context.channel) == .admitted else {
                self.closeAtShutdown(context: context)
                return
            }
            self.handshakeSucceeded(context: context)
            self.logger.info("client connected")
            self.sendRemote(poolPort, context: context)
            self.startHeartbeat(context: context)
        case .refuseV2Client(let message):
            self.timers.handshakeEnded()
            self.logger.warning("client refused: it has a key (protocol v2) and this server has none")
            self.onHandshakeEnded(context.channel)
            context.writeV2(message, thenClose: true)
        case .send(let message):
            context.writeV2(message)
        case .registerSession:
            self.registerSession(context: context)
        case .refuse(let message, let error):
            self.timers.handshakeEnded()
            self.metrics.authenticationFailures.increment()
            self.logger.warning("client refused", metadata: ["np.error": "\(UserFacingError.describe(error))"])
            self.onHandshakeEnded(context.channel)
            if let message {
                context.writeV2(message, thenClose: true)
            } else {
                context.close(promise: nil)
            }
        case .refuseAtCapacity(let message):
            self.timers.handshakeEnded()
            self.metrics.clientsTurnedAway.increment()
            // Not "client refused": that line is for fail2ban, and this client holds the key.
            self.logger.warning("client turned away: the server serves as many clients as it accepts")
            self.onHandshakeEnded(context.channel)
            context.writeV2(message, thenClose: true)
        case .sendRemote(let poolPort):
            self.sendRemote(poolPort, context: context)
        case .sendHeartbeat:
            context.writeV2(.heartbeat)
        case .launch(let id):
            self.delegate.launchReceived(id, launch: .stream, from: context.channel)
        case .launchDatagrams(let id):
            self.delegate.launchReceived(id, launch: .datagrams, from: context.channel)
        case .close(let closure):
            self.delegate.controlClosed(context.channel)
            closure.log(to: self.logger, peer: "peer")
            if case .malformedMessage = closure {
                context.writeV2(.failure(.protocolViolation, text: "malformed message"), thenClose: true)
            } else {
                context.close(promise: nil)
            }
        case .handshakeTimedOut:
            self.logger.debug("handshake timed out")
            context.close(promise: nil)
        case .closeQuietly:
            context.close(promise: nil)
        }
    }

    private func handshakeSucceeded(context: ChannelHandlerContext) {
        self.timers.handshakeEnded()
        TunnelMetrics.record(self.metrics.handshakeDuration, since: self.started)
        self.onHandshakeEnded(context.channel)
    }

    /// A handshake that ended while the server shuts down: no session, no refusal logged or counted.
    private func closeAtShutdown(context: ChannelHandlerContext) {
        self.timers.handshakeEnded()
        self.onHandshakeEnded(context.channel)
        context.close(promise: nil)
    }

    private func registerSession(context: ChannelHandlerContext) {
        var parameters = self.parameters
        parameters.sessionID = SecureRandom.bytes(V2SessionParameters.sessionIDLength)
        let sessionID = parameters.sessionID
        guard let (welcome, secret) = self.machine.welcome(parameters: parameters) else { return }
        let datagrams = self.machine.transports?.contains(.udp) ?? false
        switch self.delegate.v2SessionStarted(
            context.channel,
            sessionID: sessionID,
            secret: secret,
            datagrams: datagrams
        )
        {
        case .admitted:
            break
        case .full:
            self.perform(self.machine.sessionRefused(), context: context)
            return
        case .closing:
            self.closeAtShutdown(context: context)
            return
        }
        self.machine.sessionRegistered(now: context.eventLoop.now)
        self.handshakeSucceeded(context: context)
        self.logger.info(
            "client authenticated",
            metadata: ["np.udp": "\(datagrams ? "on" : self.machine.transports == nil ? "off (older client)" : "off")"]
        )
        context.writeV2(welcome)
        self.startHeartbeat(context: context)
    }

    private func startHeartbeat(context: ChannelHandlerContext) {
        self.timers.startHeartbeat(context: context, interval: self.machine.heartbeatInterval) { context in
            self.perform(self.machine.heartbeatDue(now: context.eventLoop.now), context: context)
        }
    }

    private func sendRemote(_ poolPort: Int, context: ChannelHandlerContext) {
        var line = context.channel.allocator.buffer(capacity: 16)
        Signal.remote(port: poolPort).write(to: &line)
        context.writeAndFlush(NIOAny(line), promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timers.cancelAll()
        switch self.machine.channelClosed() {
        case .sessionEnded: self.delegate.controlClosed(context.channel)
        case .handshakeEnded: self.onHandshakeEnded(context.channel)
        case .none: break
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("control connection error", metadata: ["np.error": "\(error)"])
        self.perform(self.machine.errorCaught(error), context: context)
    }
}

@available(*, unavailable)
extension ServerControlHandler: Sendable {}

extension ControlClosure {
    /// Logs why the control channel to `peer` (how the log names the other side) closes.
    func log(to logger: Logger, peer: String) {
        switch self {
        case .peerGaveUp(let reason, let text):
            logger.error("the peer closed the session", metadata: ["np.reason": "\(reason)", "np.text": "\(text)"])
        case .handshakeMessageAfterHandshake:
            logger.error("handshake message after the handshake; control channel closed")
        case .silent(let silence):
            logger.error(
                "no heartbeat from the \(peer); control channel considered dead",
                metadata: ["np.silence": "\(DurationParser.format(silence))"]
            )
        case .malformedMessage(let why):
            logger.error("malformed message from the \(peer); control channel closed", metadata: ["np.error": "\(why)"])
        }
    }
}
