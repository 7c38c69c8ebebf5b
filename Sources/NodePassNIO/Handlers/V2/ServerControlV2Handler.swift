import CoreMetrics
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import NodePassCore

/// What a v2 server control channel asks of the server.
protocol ServerV2SessionRegistry: AnyObject, Sendable {
    /// A client proved the key: register its session; false when no more clients are accepted.
    func v2SessionStarted(_ channel: any Channel, sessionID: [UInt8], secret: V2SessionSecret) -> Bool
    /// A registered session's control channel closed.
    func controlClosed(_ channel: any Channel)
    /// The client launched a user over one of its pool connections (forward mode).
    func launchReceived(_ id: PoolID, from channel: any Channel)
}

/// The server end of a v2 control channel, after `NIOSSLServerHandler` and a `V2FrameDecoder`:
/// refuses clients that did not negotiate `nodepass/2`, runs the handshake under the handshake timeout,
/// then exchanges heartbeats and launches.
final class ServerControlV2Handler: ChannelInboundHandler {
    typealias InboundIn = V2Frame

    /// The ALPN protocol name of v2.
    static let alpn = "nodepass/2"

    private enum State {
        case tls
        case handshaking(V2ServerHandshakeStateMachine)
        case established
        case closed
    }

    private var state: State = .tls
    private let key: V2Key
    private let fingerprint: [UInt8]
    private let makeParameters: @Sendable (_ sessionID: [UInt8]) -> V2SessionParameters
    private let registry: any ServerV2SessionRegistry
    private let reportInterval: TimeAmount
    private let handshakeTimeout: TimeAmount
    private let metrics: TunnelMetrics
    private let onHandshakeEnded: @Sendable (_ channel: any Channel) -> Void
    private var logger: Logger
    private var timer: Scheduled<Void>?
    private var heartbeat: V2Heartbeat?
    private let started = NIODeadline.now()

    init(
        key: V2Key,
        fingerprint: [UInt8],
        reportInterval: TimeAmount,
        handshakeTimeout: TimeAmount,
        registry: any ServerV2SessionRegistry,
        metrics: TunnelMetrics,
        logger: Logger,
        makeParameters: @escaping @Sendable (_ sessionID: [UInt8]) -> V2SessionParameters,
        onHandshakeEnded: @escaping @Sendable (_ channel: any Channel) -> Void
    ) {
        self.key = key
        self.fingerprint = fingerprint
        self.reportInterval = reportInterval
        self.handshakeTimeout = handshakeTimeout
        self.registry = registry
        self.metrics = metrics
        self.logger = logger
        self.makeParameters = makeParameters
        self.onHandshakeEnded = onHandshakeEnded
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.logger[metadataKey: "np.peer"] = "\(context.channel.peerDescription)"
        let channel = context.channel
        let logger = self.logger
        self.timer = context.eventLoop.scheduleTask(in: self.handshakeTimeout) {
            logger.debug("handshake timed out")
            channel.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let negotiated) = event, case .tls = self.state {
            guard negotiated == Self.alpn else {
                self.refuse(
                    context: context,
                    message: nil,
                    error: NodePassError(.versionMismatch, "the client has no key (protocol v1); this server requires one")
                )
                return
            }
            self.state = .handshaking(V2ServerHandshakeStateMachine(
                key: self.key,
                serverNonce: Self.randomBytes(V2Message.nonceLength),
                fingerprint: self.fingerprint
            ))
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let message: V2Message
        do {
            message = try V2Message(frame: self.unwrapInboundIn(data))
        } catch {
            self.refuse(context: context, message: .failure(.protocolViolation, text: "malformed message"), error: error)
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
                self.refuse(context: context, message: reply, error: error)
            case .authenticated:
                self.accept(context: context, machine: machine)
            }
        case .established:
            self.heartbeat?.received(message, context: context, logger: self.logger) { id in
                self.registry.launchReceived(id, from: context.channel)
            }
        }
    }

    private func accept(context: ChannelHandlerContext, machine: V2ServerHandshakeStateMachine) {
        let sessionID = Self.randomBytes(V2SessionParameters.sessionIDLength)
        guard let (welcome, secret) = machine.welcome(parameters: self.makeParameters(sessionID)) else { return }
        guard self.registry.v2SessionStarted(context.channel, sessionID: sessionID, secret: secret) else {
            self.refuse(
                context: context,
                message: .failure(.tooManyClients, text: "the server serves as many clients as it accepts"),
                error: NodePassError(.poolUnavailable, "too many clients; this one was refused")
            )
            return
        }
        self.state = .established
        self.timer?.cancel()
        self.timer = nil
        TunnelMetrics.record(self.metrics.handshakeDuration, since: self.started)
        self.onHandshakeEnded(context.channel)
        self.logger.info("client authenticated")
        context.writeV2(welcome)
        let heartbeat = V2Heartbeat(interval: self.reportInterval, now: .now())
        heartbeat.start(context: context, interval: self.reportInterval, logger: self.logger)
        self.heartbeat = heartbeat
    }

    /// Logs a refused client with its address (for fail2ban), sends `message` if any, and closes.
    private func refuse(context: ChannelHandlerContext, message: V2Message?, error: any Error) {
        if case .closed = self.state { return }
        self.state = .closed
        self.metrics.authenticationFailures.increment()
        self.logger.warning("client refused", metadata: ["np.error": "\(error)"])
        self.onHandshakeEnded(context.channel)
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
        switch self.state {
        case .established:
            self.registry.controlClosed(context.channel)
        case .tls, .handshaking:
            self.onHandshakeEnded(context.channel)
        case .closed:
            break
        }
        self.state = .closed
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .established = self.state {
            self.logger.debug("control connection error", metadata: ["np.error": "\(error)"])
            context.close(promise: nil)
        } else {
            self.refuse(context: context, message: nil, error: error)
        }
    }

    static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in generator.next() }
    }
}

@available(*, unavailable)
extension ServerControlV2Handler: Sendable {}
