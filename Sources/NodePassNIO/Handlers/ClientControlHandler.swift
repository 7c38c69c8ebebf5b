import Logging
import CoreMetrics
import NIOCore
import NIOTLS
import NodePassCore

/// The client end of a control channel, after `NIOSSLClientHandler` and the `SignalLineDecoder`:
/// parses each line, skips what it cannot understand, drives the `ControlStateMachine` and the pool,
/// and closes the channel when the heartbeat stops.
final class ClientControlHandler: ChannelInboundHandler {
    typealias InboundIn = SignalLineDecoder.Line

    private var machine: ControlStateMachine
    private let pool: ClientPool
    private let reportInterval: TimeAmount
    private let handshakeTimeout: TimeAmount
    private let logger: Logger
    private let connected: EventLoopPromise<Void>
    private var timer: Scheduled<Void>?
    private var heartbeatCheck: RepeatedTask?
    private var serverIP: String?
    private let started = NIODeadline.now()
    private let handshakeDuration: Timer

    init(
        pool: ClientPool,
        reportInterval: TimeAmount,
        handshakeTimeout: TimeAmount,
        connected: EventLoopPromise<Void>,
        handshakeDuration: Timer,
        logger: Logger
    ) {
        self.handshakeDuration = handshakeDuration
        self.machine = ControlStateMachine(reportInterval: reportInterval)
        self.pool = pool
        self.reportInterval = reportInterval
        self.handshakeTimeout = handshakeTimeout
        self.connected = connected
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: self.handshakeTimeout) {
            channel.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            self.timer?.cancel()
            self.timer = nil
            self.machine.connected(now: .now())
            self.serverIP = context.channel.remoteAddress?.ipAddress
            TunnelMetrics.record(self.handshakeDuration, since: self.started)
            self.connected.succeed()
            let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
            let channel = context.channel
            self.heartbeatCheck = context.eventLoop.scheduleRepeatedTask(
                initialDelay: self.reportInterval,
                delay: self.reportInterval
            ) { _ in
                if loopBound.value.machine.heartbeatCheckFired(now: .now()) == .closeDeadChannel {
                    loopBound.value.logger.error(
                        "no heartbeat from the server; control channel considered dead",
                        metadata: ["np.silence": "\(DurationParser.format(loopBound.value.machine.deadAfter))"]
                    )
                    channel.close(promise: nil)
                }
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .overlong:
            self.logger.warning("malformed signal skipped", metadata: ["np.error": "line too long"])
        case .line(let line):
            do {
                switch try Signal.parse(line) {
                case .empty:
                    break
                case .unknown(let scheme):
                    self.logger.debug("unknown signal ignored", metadata: ["np.scheme": "\(scheme)"])
                case .signal(let signal):
                    self.perform(self.machine.signalReceived(signal, now: .now()))
                }
            } catch {
                self.logger.warning("malformed signal skipped", metadata: ["np.error": "\(error)"])
            }
        }
    }

    private func perform(_ action: ControlStateMachine.Action) {
        switch action {
        case .none, .closeDeadChannel:
            break
        case .startPool(let port):
            self.logger.info("connected to the server; pool port announced", metadata: ["np.pool.port": "\(port)"])
            self.pool.start(port: port, host: self.serverIP)
        case .restartPool(let port):
            self.logger.info("server announced a new pool port", metadata: ["np.pool.port": "\(port)"])
            self.pool.start(port: port, host: self.serverIP)
        case .launch(let id):
            self.logger.debug("launch received", metadata: ["np.pool.id": "\(id)"])
            self.pool.launch(id)
        case .ignoreLaunch(let id):
            self.logger.warning("launch before the pool port was announced; ignored", metadata: ["np.pool.id": "\(id)"])
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if case .awaitingRemote = self.machine.state {
            self.logger.error(
                "the server closed the control channel before announcing its pool port (a server with a key, protocol v2, refuses clients without one)"
            )
        }
        self.timer?.cancel()
        self.timer = nil
        self.heartbeatCheck?.cancel()
        self.heartbeatCheck = nil
        self.machine.disconnected()
        self.connected.fail(NodePassError(.controlChannelLost, "the server closed the connection during the TLS handshake"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("control channel error", metadata: ["np.error": "\(error)"])
        self.connected.fail(NodePassError(.tls, "TLS handshake with the server failed: \(error)"))
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension ClientControlHandler: Sendable {}
