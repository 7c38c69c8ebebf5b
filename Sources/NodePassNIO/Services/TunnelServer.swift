import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NodePassCore
import ServiceLifecycle

/// The ports a running server listens on.
public struct ServerPorts: Sendable, Hashable {
    /// The TLS control port (TUNNEL).
    public var tunnel: Int
    /// The plain-TCP pool port, announced with `remote://`.
    public var pool: Int
    /// The port users connect to (TARGET); 0 in forward mode, where the server listens for no users.
    public var target: Int
}

/// The server: TLS control channel on TUNNEL, pool port, and users on TARGET (reverse mode) or a dial to
/// TARGET for every user of a client (forward mode, v2 only).
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
    private let relays: Relays
    private let users: UserConnections
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
        self.relays = Relays(sessions: self.sessions, metrics: metrics, logger: logger, configuration: configuration)
        self.users = UserConnections(relays: self.relays)
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
            return V2Setup(
                key: key,
                dataTLS: loaded.context,
                dataFingerprint: loaded.fingerprint,
                tls: .files,
                mode: .reverse
            )
        }
    }

    /// The number of live user sessions (relaying or waiting).
    public var sessionCount: Int { self.sessions.count }

    /// Runs until graceful shutdown: binds, serves, then drains within SHUTDOWN_TIMEOUT.
    public func run() async throws {
        // The kernel relay's engines run while this tunnel does (and stop after the last tunnel).
        try await SpliceEngines.shared.holding(if: self.configuration.splice) { try await self.serve() }
    }

    private func serve() async throws {
        let certificate = try InMemoryCertificate.generate()
        let tls = try certificate.makeServerContext(applicationProtocols: [V2Message.alpn])
        var v2 = try self.url.key.map { try self.makeV2Setup(keyText: $0, certificate: certificate) }

        let userListener = try await self.bindUsers(v2: &v2)
        var listeners: [any Channel] = userListener.map { [$0] } ?? []
        let poolPort: Int
        let tunnelPort: Int
        do {
            let poolListener = try await Listener.bind(
                self.poolBootstrap(v2: v2),
                host: self.url.tunnel.host,
                port: 0,
                what: "pool port at"
            )
            listeners.append(poolListener)
            poolPort = poolListener.localAddress?.port ?? 0
            let controlListener = try await Listener.bind(
                self.controlBootstrap(tls: tls, poolPort: poolPort, v2: v2, fingerprint: certificate.fingerprint),
                host: self.url.tunnel.host,
                port: self.url.tunnel.port,
                what: "tunnel address"
            )
            listeners.append(controlListener)
            tunnelPort = controlListener.localAddress?.port ?? 0
        } catch {
            for listener in listeners { try? await listener.close() }
            throw error
        }
        let ports = ServerPorts(tunnel: tunnelPort, pool: poolPort, target: userListener?.localAddress?.port ?? 0)
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
                """
                protocol v1 has no authentication: anyone who reaches the tunnel and pool ports can act as the \
                client; data connections are not encrypted
                """
            )
        }
        self.logger.info(
            "server started",
            metadata: [
                "np.url": "\(self.url.redacted)", "np.tunnel": "\(ports.tunnel)", "np.pool": "\(ports.pool)",
                "np.target": "\(ports.target)", "np.version": "\(NodePassVersion.current)",
                "np.protocols": "\(NodePassVersion.protocols)",
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

    /// Decides the direction and, in reverse mode, listens for users on TARGET. `mode=0` tries to listen
    /// and falls back to forward mode (the server dials TARGET) when it cannot.
    private func bindUsers(v2: inout V2Setup?) async throws -> (any Channel)? {
        let requested = v2 == nil ? .reverse : self.url.mode
        if requested == .forward {
            self.pool.serveForward(target: self.url.target, relays: self.relays)
            v2?.mode = .forward
            return nil
        }
        do {
            let listener = try await Listener.bind(
                self.userBootstrap(launcher: self.pool.serveReverse()),
                host: self.url.target.host,
                port: self.url.target.port,
                what: "target address"
            )
            if requested == .auto {
                self.logger.info(
                    "mode=0 chose reverse mode: users connect to the server's TARGET",
                    metadata: ["np.target": "\(self.url.target)"]
                )
            }
            return listener
        } catch {
            guard requested == .auto else { throw error }
            self.logger.info(
                "mode=0 chose forward mode: users connect to the client, the server dials its TARGET",
                metadata: ["np.target": "\(self.url.target)", "np.reason": "\(error.message)"]
            )
            self.pool.serveForward(target: self.url.target, relays: self.relays)
            v2?.mode = .forward
            return nil
        }
    }

    private func baseBootstrap(on group: (any EventLoopGroup)? = nil, what: String) -> ServerBootstrap {
        Listener.bootstrap(group: group ?? self.group, logger: self.logger, what: what)
    }

    private func controlBootstrap(
        tls: NIOSSLContext,
        poolPort: Int,
        v2: V2Setup?,
        fingerprint: [UInt8]
    ) -> ServerBootstrap {
        let configuration = self.configuration
        return self.baseBootstrap(what: "tunnel")
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { [pool, logger, pendingHandshakes, metrics] channel in
                if let evicted = pendingHandshakes.admit(channel) {
                    logger.debug(
                        "too many TLS handshakes in progress; the oldest was closed",
                        metadata: ["np.peer": "\(evicted.peerDescription)"]
                    )
                    evicted.close(promise: nil)
                }
                SocketTuning.setUserTimeout(configuration.reportInterval * 3, on: channel)
                let version: ServerControlStateMachine.Version =
                    v2.map { .v2(key: $0.key, fingerprint: fingerprint) } ?? .v1(poolPort: poolPort)
                let parameters: @Sendable ([UInt8]) -> V2SessionParameters = { sessionID in
                    V2SessionParameters(
                        mode: v2?.mode ?? .reverse,
                        tls: v2?.tls ?? .plain,
                        poolPort: poolPort,
                        heartbeatMilliseconds: UInt32(clamping: configuration.reportInterval.nanoseconds / 1_000_000),
                        sessionID: sessionID,
                        dataFingerprint: v2?.dataFingerprint ?? []
                    )
                }
                return channel.eventLoop.makeCompletedFuture {
                    // v1 clients send nothing; what a stranger sends is split into bounded lines and dropped.
                    let decoder: any ChannelHandler =
                        v2 == nil ? ByteToMessageHandler(SignalLineDecoder()) : ByteToMessageHandler(V2FrameDecoder())
                    do {
                        try channel.pipeline.syncOperations.addHandlers([
                            NIOSSLServerHandler(context: tls),
                            decoder,
                            ServerControlHandler(
                                version: version,
                                configuration: configuration,
                                delegate: pool,
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
    }

    private func poolBootstrap(v2: V2Setup?) -> ServerBootstrap {
        let configuration = self.configuration
        return self.baseBootstrap(on: self.dataLoop, what: "pool")
            .childChannelInitializer { [pool, metrics, logger, pendingPoolOpenings, relays] channel in
                channel.eventLoop.makeCompletedFuture {
                    try SocketTuning.prepareRelay(channel)
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
                    let forward = v2?.mode == .forward
                    let glue = relays.glue(forward ? .poolThatDials : .poolWithUsers)
                    try channel.pipeline.syncOperations.addHandlers([
                        ServerPoolConnectionHandler(
                            delegate: pool,
                            glue: glue,
                            waitsForAuthentication: v2 != nil,
                            claimTimeout: forward ? configuration.poolWaitTimeout + configuration.dialTimeout : nil
                        ),
                        glue,
                    ])
                }
            }
    }

    private func userBootstrap(launcher: Launcher) -> ServerBootstrap {
        self.baseBootstrap(on: self.dataLoop, what: "target")
            .childChannelInitializer { [users] channel in
                users.initialize(channel) { launcher.userArrived($0) }
            }
    }
}
