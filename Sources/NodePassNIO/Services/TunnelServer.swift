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

/// The server: TLS control channel on TUNNEL, pool port, users on TARGET (reverse mode).
///
/// Without a key it speaks v1 to one client; with a key it speaks v2: clients authenticate, pool
/// connections are authenticated (and TLS with `tls=1`/`tls=2`), and several clients share the users.
public final class TunnelServer: Service, Sendable {
    private let url: TunnelURL
    private let configuration: Configuration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let onListening: (@Sendable (ServerPorts) -> Void)?
    private let pool: ServerPool
    private let sessions: SessionTracker
    private let pendingHandshakes: PendingHandshakes
    /// v2 pool connections whose opening has not been authenticated yet.
    private let pendingPoolOpenings: PendingHandshakes
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
        self.pool = ServerPool(configuration: configuration, isV2: url.key != nil, metrics: metrics, logger: logger)
        self.sessions = SessionTracker(limit: configuration.semaphoreLimit)
        self.pendingHandshakes = PendingHandshakes(limit: configuration.maxPendingHandshakes)
        self.pendingPoolOpenings = PendingHandshakes(limit: configuration.maxPendingHandshakes * 4)
    }

    /// What v2 needs at run time: the stretched key and the data connections' TLS.
    private struct V2Setup: Sendable {
        var key: V2Key
        var dataTLS: NIOSSLContext?
        var dataFingerprint: [UInt8]
        var tls: DataTLSMode
        var mode: TunnelMode
    }

    private func makeV2Setup(keyText: String, certificate: InMemoryCertificate) throws -> V2Setup {
        guard self.url.mode != .forward else {
            throw NodePassError(.invalidURL, "mode=2 (forward) is not available in this version; use mode=1 or leave it out")
        }
        let key = try V2Key(keyText)
        switch self.url.effectiveDataTLS {
        case .plain:
            return V2Setup(key: key, dataTLS: nil, dataFingerprint: [], tls: .plain, mode: .reverse)
        case .inMemory:
            return V2Setup(
                key: key,
                dataTLS: try certificate.makeServerContext(),
                dataFingerprint: certificate.fingerprint,
                tls: .inMemory,
                mode: .reverse
            )
        case .files:
            let loaded = try FileCertificate.load(
                certificateFile: self.url.certificateFile ?? "",
                privateKeyFile: self.url.privateKeyFile ?? ""
            )
            return V2Setup(key: key, dataTLS: loaded.context, dataFingerprint: loaded.fingerprint, tls: .files, mode: .reverse)
        }
    }

    /// The number of live user sessions (relaying or waiting).
    public var sessionCount: Int { self.sessions.count }

    /// Runs until graceful shutdown: binds, serves, then drains within SHUTDOWN_TIMEOUT.
    public func run() async throws {
        let certificate = try InMemoryCertificate.generate()
        let tls = try certificate.makeServerContext(applicationProtocols: [ServerControlV2Handler.alpn])
        let v2 = try self.url.key.map { try self.makeV2Setup(keyText: $0, certificate: certificate) }

        let poolListener = try await Listener.bind(
            self.poolBootstrap(v2: v2),
            host: self.url.tunnel.host,
            port: 0,
            what: "pool port at"
        )
        let poolPort = poolListener.localAddress?.port ?? 0
        var listeners: [any Channel] = [poolListener]
        do {
            listeners.append(
                try await Listener.bind(
                    self.controlBootstrap(tls: tls, poolPort: poolPort, v2: v2, fingerprint: certificate.fingerprint),
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
        if let v2 {
            self.logger.info(
                "protocol v2: clients and pool connections must prove the key",
                metadata: ["np.mode": "\(v2.mode)", "np.tls": "\(self.url.effectiveDataTLS.rawValue)"]
            )
            if self.url.effectiveDataTLS == .plain {
                self.logger.warning("tls=0: data connections are authenticated but not encrypted")
            }
            if let keyText = self.url.key, keyText.count < V2Key.recommendedLength {
                self.logger.warning("the key is short; use at least \(V2Key.recommendedLength) random characters")
            }
        } else {
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

    private func controlBootstrap(tls: NIOSSLContext, poolPort: Int, v2: V2Setup?, fingerprint: [UInt8]) -> ServerBootstrap {
        let configuration = self.configuration
        return self.baseBootstrap()
            .childChannelInitializer { [pool, logger, pendingHandshakes, metrics] channel in
                if let evicted = pendingHandshakes.admit(channel) {
                    logger.debug(
                        "too many TLS handshakes in progress; the oldest was closed",
                        metadata: ["np.peer": "\(evicted.peerDescription)"]
                    )
                    evicted.close(promise: nil)
                }
                SocketTuning.apply(to: channel)
                SocketTuning.setUserTimeout(configuration.reportInterval * 3, on: channel)
                if let v2 {
                    return channel.eventLoop.makeCompletedFuture {
                        let parameters: @Sendable ([UInt8]) -> V2SessionParameters = { sessionID in
                            V2SessionParameters(
                                mode: v2.mode,
                                tls: v2.tls,
                                poolPort: poolPort,
                                heartbeatMilliseconds: UInt32(clamping: configuration.reportInterval.nanoseconds / 1_000_000),
                                sessionID: sessionID,
                                dataFingerprint: v2.dataFingerprint
                            )
                        }
                        do {
                            try channel.pipeline.syncOperations.addHandlers([
                                NIOSSLServerHandler(context: tls),
                                ByteToMessageHandler(V2FrameDecoder()),
                                ServerControlV2Handler(
                                    key: v2.key,
                                    fingerprint: fingerprint,
                                    reportInterval: configuration.reportInterval,
                                    handshakeTimeout: configuration.handshakeTimeout,
                                    registry: pool,
                                    metrics: metrics,
                                    logger: logger,
                                    makeParameters: parameters,
                                    onHandshakeEnded: { pendingHandshakes.finish($0) }
                                ),
                            ])
                        } catch {
                            pendingHandshakes.finish(channel)
                            throw error
                        }
                    }
                }
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
                                    metadata: ["np.peer": "\(channel.peerDescription)"]
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

    private func poolBootstrap(v2: V2Setup?) -> ServerBootstrap {
        let configuration = self.configuration
        return self.baseBootstrap(on: self.dataLoop)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { [pool, metrics, logger, pendingPoolOpenings] channel in
                SocketTuning.apply(to: channel)
                return channel.eventLoop.makeCompletedFuture {
                    if let v2 {
                        if let evicted = pendingPoolOpenings.admit(channel) {
                            evicted.close(promise: nil)
                        }
                        try channel.pipeline.syncOperations.addHandler(
                            ServerPoolAuthenticationHandler(
                                tls: v2.dataTLS,
                                timeout: configuration.idReadTimeout,
                                metrics: metrics,
                                logger: logger,
                                secretForSession: { pool.secret(forSession: $0) },
                                onEnded: { pendingPoolOpenings.finish($0) }
                            )
                        )
                    }
                    try channel.pipeline.syncOperations.addHandlers([
                        ServerPoolConnectionHandler(delegate: pool, waitsForAuthentication: v2 != nil),
                        GlueHandler(bytes: metrics.bytesDownstream),
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
