import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NodePassCore
import ServiceLifecycle
import Synchronization

/// The ports a running server listens on.
public struct ServerPorts: Sendable, Hashable {
    /// The TLS control port (TUNNEL).
    public var tunnel: Int
    /// The plain-TCP pool port, announced with `remote://`.
    public var pool: Int
    /// The port users connect to (TARGET).
    public var target: Int
}

/// The v1 server: TLS control channel on TUNNEL, pool port, users on TARGET.
public final class TunnelServer: Service, Sendable {
    private let url: TunnelURL
    private let configuration: Configuration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let onListening: (@Sendable (ServerPorts) -> Void)?
    private let pool: ServerPool
    private let sessions: SessionTracker
    private let pendingHandshakes: PendingHandshakes
    private let lastLimitLog = Mutex<NIODeadline>(.distantPast)
    private let metrics: TunnelMetrics
    /// The event loop of every pool and user connection: both halves of a relay on one thread, so that
    /// relaying a buffer is a direct call instead of a task handed to another thread.
    private let dataLoop: any EventLoop

    /// Makes a server for `url` (role server); `onListening` is told the bound ports.
    public init(
        url: TunnelURL,
        configuration: Configuration,
        group: any EventLoopGroup,
        logger: Logger,
        metrics: TunnelMetrics = TunnelMetrics(role: "server"),
        onListening: (@Sendable (ServerPorts) -> Void)? = nil
    ) {
        self.metrics = metrics
        self.dataLoop = group.next()
        self.url = url
        self.configuration = configuration
        self.group = group
        self.logger = logger
        self.onListening = onListening
        self.pool = ServerPool(configuration: configuration, metrics: metrics, logger: logger)
        self.sessions = SessionTracker(limit: configuration.semaphoreLimit)
        self.pendingHandshakes = PendingHandshakes(limit: configuration.maxPendingHandshakes)
    }

    /// The number of live user sessions (relaying or waiting).
    public var sessionCount: Int { self.sessions.count }

    /// Runs until graceful shutdown: binds, serves, then drains within SHUTDOWN_TIMEOUT.
    public func run() async throws {
        let certificate = try InMemoryCertificate.generate()
        let tls = try certificate.makeServerContext()

        let poolListener = try await Listener.bind(
            self.poolBootstrap(),
            host: self.url.tunnel.host,
            port: 0,
            what: "pool port at"
        )
        let poolPort = poolListener.localAddress?.port ?? 0
        var listeners: [any Channel] = [poolListener]
        do {
            listeners.append(
                try await Listener.bind(
                    self.controlBootstrap(tls: tls, poolPort: poolPort),
                    host: self.url.tunnel.host,
                    port: self.url.tunnel.port,
                    what: "tunnel address"
                )
            )
            listeners.append(
                try await Listener.bind(
                    self.userBootstrap(),
                    host: self.url.target.host,
                    port: self.url.target.port,
                    what: "target address"
                )
            )
        } catch {
            for listener in listeners { try? await listener.close() }
            throw error
        }
        let ports = ServerPorts(
            tunnel: listeners[1].localAddress?.port ?? 0,
            pool: poolPort,
            target: listeners[2].localAddress?.port ?? 0
        )
        if self.url.key == nil {
            self.logger.warning(
                "protocol v1 has no authentication: anyone who reaches the tunnel and pool ports can act as the client; data connections are not encrypted"
            )
        }
        self.logger.info(
            "server started",
            metadata: [
                "np.url": "\(self.url.redacted)", "np.tunnel": "\(ports.tunnel)", "np.pool": "\(ports.pool)",
                "np.target": "\(ports.target)", "np.version": "\(NodePassVersion.current)", "np.protocols": "\(NodePassVersion.protocols)",
            ]
        )
        self.onListening?(ports)

        try? await gracefulShutdown()

        self.logger.info("shutting down", metadata: ["np.sessions": "\(self.sessions.count)"])
        for listener in listeners { try? await listener.close() }
        self.pool.close()
        let cut = await self.sessions.drain(timeout: self.configuration.shutdownTimeout)
        if cut > 0 {
            self.logger.warning("sessions cut at shutdown timeout", metadata: ["np.sessions": "\(cut)"])
        }
        self.logger.info("server stopped")
    }

    private func baseBootstrap(on group: (any EventLoopGroup)? = nil) -> ServerBootstrap {
        ServerBootstrap(group: group ?? self.group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
    }

    private func controlBootstrap(tls: NIOSSLContext, poolPort: Int) -> ServerBootstrap {
        let configuration = self.configuration
        return self.baseBootstrap()
            .childChannelInitializer { [pool, logger, pendingHandshakes, metrics] channel in
                if let evicted = pendingHandshakes.admit(channel) {
                    logger.debug(
                        "too many TLS handshakes in progress; the oldest was closed",
                        metadata: ["np.peer": "\(evicted.remoteAddress.map { "\($0)" } ?? "?")"]
                    )
                    evicted.close(promise: nil)
                }
                SocketTuning.apply(to: channel)
                SocketTuning.setUserTimeout(configuration.reportInterval * 3, on: channel)
                do {
                    let control = ServerControlHandler(
                        poolPort: poolPort,
                        reportInterval: configuration.reportInterval,
                        handshakeTimeout: configuration.handshakeTimeout,
                        handshakeDuration: metrics.handshakeDuration,
                        logger: logger,
                        onHandshakeEnded: { succeeded, channel in
                            pendingHandshakes.finish(channel)
                            if succeeded {
                                logger.info(
                                    "client connected",
                                    metadata: ["np.peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"]
                                )
                                pool.controlConnected(channel)
                            }
                        },
                        onClosed: { channel in pool.controlClosed(channel) }
                    )
                    try channel.pipeline.syncOperations.addHandlers([NIOSSLServerHandler(context: tls), control])
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    pendingHandshakes.finish(channel)
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
    }

    private func poolBootstrap() -> ServerBootstrap {
        self.baseBootstrap(on: self.dataLoop)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { [pool, metrics] channel in
                SocketTuning.apply(to: channel)
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([
                        ServerPoolConnectionHandler(delegate: pool), GlueHandler(bytes: metrics.bytesDownstream),
                    ])
                }
            }
    }

    private func userBootstrap() -> ServerBootstrap {
        self.baseBootstrap(on: self.dataLoop)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { [pool, sessions, metrics] channel in
                SocketTuning.apply(to: channel)
                guard sessions.add(channel) else {
                    metrics.failed(.limit)
                    self.logLimitReached()
                    return channel.close()
                }
                metrics.accepted.increment()
                metrics.active.increment()
                channel.closeFuture.whenComplete { _ in metrics.active.decrement() }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([
                        ChannelActiveHandler { pool.userArrived($0) }, GlueHandler(bytes: metrics.bytesUpstream),
                    ])
                }
            }
    }

    private func logLimitReached() {
        let now = NIODeadline.now()
        let due = self.lastLimitLog.withLock { last -> Bool in
            guard now - last >= .seconds(1) else { return false }
            last = now
            return true
        }
        if due {
            self.logger.warning(
                "SEMAPHORE_LIMIT reached; new user connections are closed",
                metadata: ["np.limit": "\(self.configuration.semaphoreLimit)"]
            )
        }
    }
}
