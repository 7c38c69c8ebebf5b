import CoreMetrics
import Crypto
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import NodePassCore

/// What a client control channel asks of the client's pool (`ClientPool`).
protocol ClientControlDelegate: AnyObject, Sendable {
    /// The server named its pool port: (re)start the pool towards it (see `ClientPool.start`).
    func start(
        port: Int,
        host: String?,
        v2: V2PoolSettings?,
        forwardControl: (any Channel)?,
        transports: TunnelTransports
    )
    /// The server launched the pool connection `id` (`.datagrams`: as a datagram carrier).
    func launch(_ id: PoolID, _ launch: PoolLaunch)
    /// The control channel closed: stop the pool at once (see `ClientPool.stop`), before a pool dial that the
    /// departing server refuses is reported as a failure.
    func stop()
}

/// The client end of a control channel (v1 and v2), after `NIOSSLClientHandler` and the decoder of its
/// protocol: performs what its `ClientControlStateMachine` decides. It bounds the handshake, starts the pool
/// when the server names its pool port (v1) or accepts the client (v2), passes launches to the pool, and
/// closes the channel when the server falls silent.
final class ClientControlHandler: ChannelInboundHandler {
    typealias InboundIn = ControlInput

    private var machine: ClientControlStateMachine
    private var timers = ControlTimers()
    private let tunnelProtocol: ClientProtocol
    private let pool: any ClientControlDelegate
    private let handshakeTimeout: TimeAmount
    /// v1: the period of the server's `remote://`, and of the check that it still comes.
    private let reportInterval: TimeAmount
    private let connected: EventLoopPromise<Void>
    private let handshakeDuration: Timer
    private let logger: Logger
    /// The SHA-256 fingerprint of the server's certificate (from the TLS handler; tests pass their own).
    private let peerFingerprint: (ChannelHandlerContext) -> [UInt8]?
    private var serverIP: String?
    /// Whether `connected` succeeded: v1 once the pool port came, v2 once the server accepted this client.
    private var sessionUp = false
    private let started = NIODeadline.now()

    /// Makes the handler for the client's protocol.
    init(
        protocol tunnelProtocol: ClientProtocol,
        pool: any ClientControlDelegate,
        configuration: Configuration,
        connected: EventLoopPromise<Void>,
        handshakeDuration: Timer,
        logger: Logger,
        peerFingerprint: @escaping (ChannelHandlerContext) -> [UInt8]? = ClientControlHandler.tlsPeerFingerprint(
            context:
        )
    ) {
        self.peerFingerprint = peerFingerprint
        switch tunnelProtocol {
        case .v1: self.machine = ClientControlStateMachine(version: .v1(reportInterval: configuration.reportInterval))
        case .v2(let key, _): self.machine = ClientControlStateMachine(version: .v2(key: key))
        }
        self.tunnelProtocol = tunnelProtocol
        self.pool = pool
        self.reportInterval = configuration.reportInterval
        self.handshakeTimeout = configuration.handshakeTimeout
        self.connected = connected
        self.handshakeDuration = handshakeDuration
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.timers.startHandshakeDeadline(context: context, timeout: self.handshakeTimeout) { context in
            self.perform(self.machine.handshakeTimedOut(), context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let negotiated) = event {
            self.serverIP = context.channel.remoteAddress?.ipAddress
            let action = self.machine.tlsHandshakeCompleted(
                alpn: negotiated,
                fingerprint: self.peerFingerprint(context),
                nonce: SecureRandom.bytes(V2Message.nonceLength),
                now: context.eventLoop.now
            )
            self.perform(action, context: context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// The SHA-256 fingerprint of the certificate the server presented, nil when there is none.
    static func tlsPeerFingerprint(context: ChannelHandlerContext) -> [UInt8]? {
        let certificate = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate
        guard let der = try? certificate?.toDERBytes() else { return nil }
        return Array(SHA256.hash(data: der))
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .frame(let frame):
            let action: ClientControlStateMachine.Action
            do {
                action = self.machine.messageReceived(try V2Message(frame: frame), now: context.eventLoop.now)
            } catch {
                action = self.machine.malformedMessageReceived(error)
            }
            self.perform(action, context: context)
        case .line(.overlong):
            self.logger.warning("malformed signal skipped", metadata: ["np.error": "line too long"])
        case .line(.line(let line)):
            do {
                switch try Signal.parse(line) {
                case .empty:
                    break
                case .unknown(let scheme):
                    self.logger.debug("unknown signal ignored", metadata: ["np.scheme": "\(scheme)"])
                case .signal(let signal):
                    self.perform(self.machine.signalReceived(signal, now: context.eventLoop.now), context: context)
                }
            } catch {
                self.logger.warning(
                    "malformed signal skipped",
                    metadata: ["np.error": "\(UserFacingError.describe(error))"]
                )
            }
        }
    }

    private func perform(_ action: ClientControlStateMachine.Action, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .connected:
            // v1: the session counts as connected once the server announces its pool port (`startPool`).
            self.handshakeSucceeded()
            self.startHeartbeat(interval: self.reportInterval, context: context)
        case .send(let message):
            context.writeV2(message)
        case .established(let parameters, let secret):
            self.handshakeSucceeded()
            self.logger.info(
                "connected to the server; authenticated",
                metadata: [
                    "np.pool.port": "\(parameters.poolPort)", "np.mode": "\(parameters.mode)",
                    "np.tls": "\(parameters.tls == .sealed ? DataTLSMode.inMemory.rawValue : parameters.tls.rawValue)",
                    "np.pool.protection": "\(Self.protection(parameters.tls))",
                    "np.udp": "\(parameters.transports?.contains(.udp) == true ? "on" : "off")",
                ]
            )
            self.pool.start(
                port: parameters.poolPort,
                host: self.serverIP,
                v2: V2PoolSettings(
                    sessionID: parameters.sessionID,
                    secret: secret,
                    tls: parameters.tls.hasCertificate ? self.tunnelProtocol.dataTLS : nil,
                    fingerprint: parameters.dataFingerprint
                ),
                forwardControl: parameters.mode == .forward ? context.channel : nil,
                transports: parameters.transports ?? [.tcp]
            )
            // After the pool's start: the client opens its user listener if the pool is in forward mode.
            self.sessionUp = true
            self.connected.succeed()
            self.startHeartbeat(interval: .milliseconds(Int64(parameters.heartbeatMilliseconds)), context: context)
        case .fail(let message, let error):
            self.timers.handshakeEnded()
            self.connected.fail(error)
            if let message {
                context.writeV2(message, thenClose: true)
            } else {
                context.close(promise: nil)
            }
        case .startPool(let port, let restart):
            let message: Logger.Message =
                restart
                ? "server announced a new pool port" : "connected to the server; pool port announced"
            self.logger.info(message, metadata: ["np.pool.port": "\(port)"])
            self.pool.start(port: port, host: self.serverIP, v2: nil, forwardControl: nil, transports: [.tcp])
            self.sessionUp = true
            self.connected.succeed()
        case .launch(let id):
            self.logger.debug("launch received", metadata: ["np.pool.id": "\(id)"])
            self.pool.launch(id, .stream)
        case .launchDatagrams(let id):
            self.logger.debug("datagram carrier launch received", metadata: ["np.pool.id": "\(id)"])
            self.pool.launch(id, .datagrams)
        case .ignoreLaunch(let id, .beforePoolPort):
            self.logger.warning("launch before the pool port was announced; ignored", metadata: ["np.pool.id": "\(id)"])
        case .ignoreLaunch(let id, .forwardMode):
            self.logger.warning(
                "launch from the server ignored: this side has the users (forward mode)",
                metadata: ["np.pool.id": "\(id)"]
            )
        case .sendHeartbeat:
            context.writeV2(.heartbeat)
        case .close(.silent(let silence)) where !self.sessionUp:
            // v1: TLS worked but no `remote://` came; the client's one line for this attempt says so.
            self.connected.fail(
                NodePassError(
                    .timeout,
                    "the server sent no pool port within \(DurationParser.format(silence)) of the TLS handshake"
                )
            )
            context.close(promise: nil)
        case .close(let closure):
            // v1's message predates v2's (operators may match on either).
            closure.log(to: self.logger, peer: self.tunnelProtocol.isV2 ? "peer" : "server")
            context.close(promise: nil)
        case .handshakeTimedOut:
            self.connected.fail(
                NodePassError(
                    .timeout,
                    "the server did not complete the handshake within \(DurationParser.format(self.handshakeTimeout))"
                )
            )
            context.close(promise: nil)
        case .closeQuietly:
            context.close(promise: nil)
        }
    }

    private func handshakeSucceeded() {
        self.timers.handshakeEnded()
        TunnelMetrics.record(self.handshakeDuration, since: self.started)
    }

    private func startHeartbeat(interval: TimeAmount, context: ChannelHandlerContext) {
        self.timers.startHeartbeat(context: context, interval: interval) { context in
            self.perform(self.machine.heartbeatDue(now: context.eventLoop.now), context: context)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        let closed: NodePassError
        if self.machine.isAwaitingPoolPort {
            closed = NodePassError(.versionMismatch, Self.closedBeforePoolPort)
        } else if self.tunnelProtocol.isV2 {
            closed = NodePassError(.controlChannelLost, "the server closed the connection during the handshake")
        } else {
            closed = NodePassError(.controlChannelLost, "the server closed the connection during the TLS handshake")
        }
        self.timers.cancelAll()
        self.machine.channelClosed()
        self.pool.stop()
        // Nothing when the session was up: a promise completes once.
        self.connected.fail(closed)
        context.fireChannelInactive()
    }

    /// v1: what a server that closes before `remote://` most likely means.
    private static let closedBeforePoolPort = """
        the server closed the connection before announcing its pool port: if it has a key (protocol v2), give \
        this client the same key
        """

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("control channel error", metadata: ["np.error": "\(error)"])
        self.perform(self.machine.errorCaught(error), context: context)
    }
}

extension ClientControlHandler {
    /// How the session's pool connections are protected, for the log.
    static func protection(_ tls: DataTLSMode) -> String {
        switch tls {
        case .plain: "none"
        case .inMemory, .files: "tls"
        case .sealed: "sealed"
        }
    }
}

@available(*, unavailable)
extension ClientControlHandler: Sendable {}
