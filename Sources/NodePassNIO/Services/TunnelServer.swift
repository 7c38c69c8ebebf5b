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
    private let group: any EventLoopGroup
    private let onListening: (@Sendable (ServerPorts) -> Void)?
    private let pool: ServerPool
    private let pendingHandshakes: ConnectionBound
    /// v2 pool connections whose opening has not been authenticated yet.
    private let pendingPoolOpenings: ConnectionBound
    private let pipelines: Pipelines
    private var configuration: Configuration { self.pipelines.configuration }
    private var logger: Logger { self.pipelines.logger }
    private var metrics: TunnelMetrics { self.pipelines.metrics }
    private var sessions: SessionTracker { self.pipelines.sessions }
    private let users: UserConnections
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
        self.dataLoop = group.next()
        self.url = url
        self.group = group
        self.onListening = onListening
        self.pipelines = Pipelines(metrics: metrics, logger: logger, configuration: configuration, isClient: false)
        self.pool = ServerPool(
            configuration: configuration,
            metrics: metrics,
            logger: logger,
            resumes: self.pipelines.resumes
        )
        self.users = UserConnections(pipelines: self.pipelines)
        self.pendingHandshakes = ConnectionBound(limit: configuration.maxPendingHandshakes)
        self.pendingPoolOpenings = ConnectionBound(limit: configuration.maxPendingHandshakes * 4)
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
        let tls = try certificate.makeServerContext(applicationProtocols: ServerProtocol.alpn)
        var tunnelProtocol = try ServerProtocol(url: self.url, certificate: certificate)

        let userListeners = try await self.bindUsers(protocol: &tunnelProtocol)
        var listeners = userListeners
        let poolPort: Int
        let tunnelPort: Int
        do {
            let poolListener = try await Listener.bind(
                self.poolBootstrap(protocol: tunnelProtocol),
                host: self.url.tunnel.host,
                port: self.url.poolPort ?? 0
            )
            listeners.append(poolListener)
            poolPort = poolListener.localAddress?.port ?? 0
            let controlListener = try await Listener.bind(
                self.controlBootstrap(
                    tls: tls,
                    protocol: tunnelProtocol,
                    fingerprint: certificate.fingerprint,
                    poolPort: poolPort
                ),
                host: self.url.tunnel.host,
                port: self.url.tunnel.port
            )
            listeners.append(controlListener)
            tunnelPort = controlListener.localAddress?.port ?? 0
        } catch {
            for listener in listeners { try? await listener.close() }
            throw error
        }
        let targetPort = userListeners.first?.localAddress?.port ?? 0
        let ports = ServerPorts(tunnel: tunnelPort, pool: poolPort, target: targetPort)
        if case .v2(let v2) = tunnelProtocol {
            self.logger.info(
                "protocol v2: clients and pool connections must prove the key",
                metadata: [
                    "np.mode": "\(v2.mode)", "np.tls": "\(self.url.effectiveDataTLS.rawValue)",
                    "np.carries": "\(v2.transports)",
                ]
            )
            if self.url.effectiveDataTLS == .plain {
                self.logger.warning("tls=0: data connections are authenticated but not encrypted")
            }
            if let keyText = self.url.key, keyText.count < V2Key.recommendedLength {
                self.logger.warning("the key is short; use at least \(V2Key.recommendedLength) random characters")
            }
            let host = Self.reachableHost(listening: self.url.tunnel.host)
            let guessed = host != self.url.tunnel.host
            self.logger.info("\(PairingCommand.message(host: host, port: tunnelPort, mode: v2.mode, guessed: guessed))")
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
                "np.protocol": "\(NodePassVersion.spoken(keyed: self.url.key != nil))",
            ]
        )
        self.onListening?(ports)

        try? await gracefulShutdown()

        self.logger.info("shutting down", metadata: ["np.sessions": "\(self.sessions.count)"])
        for listener in listeners { try? await listener.close() }
        // Handshakes first: one that finished after the pool closed would leave a session with no pool port.
        self.pendingHandshakes.closeAll()
        self.pendingPoolOpenings.closeAll()
        self.pool.close()
        let cut = await self.sessions.drain(timeout: self.configuration.shutdownTimeout)
        if cut > 0 {
            self.logger.warning("sessions cut at shutdown timeout", metadata: ["np.sessions": "\(cut)"])
        }
        self.logger.info("server stopped")
    }

    /// The host a client on another machine would dial: the tunnel's own when it names one, else (all
    /// interfaces) this machine's first address that is neither loopback nor link-local, IPv4 first.
    static func reachableHost(listening host: String) -> String {
        guard host.isEmpty || host == "0.0.0.0" || host == "::" else { return host }
        let addresses = ((try? System.enumerateDevices()) ?? []).compactMap(\.address)
        let candidates = addresses.compactMap { address -> (ip: String, isV4: Bool)? in
            guard let ip = address.ipAddress else { return nil }
            switch address {
            case .v4 where !ip.hasPrefix("127.") && !ip.hasPrefix("169.254."): return (ip, true)
            case .v6 where ip != "::1" && !ip.lowercased().hasPrefix("fe80"): return (ip, false)
            default: return nil
            }
        }
        return (candidates.first(where: \.isV4) ?? candidates.first)?.ip ?? "SERVER_ADDRESS"
    }

    /// Decides the direction and, in reverse mode, listens for users on TARGET: TCP, and UDP (v2, unless
    /// `noudp=1`) on the same port. `mode=0` tries to listen and falls back to forward mode (the server
    /// dials TARGET) when it cannot; the direction follows TCP when the tunnel carries it, and a UDP port
    /// that is taken then only turns UDP off, with a warning.
    private func bindUsers(protocol tunnelProtocol: inout ServerProtocol) async throws -> [any Channel] {
        let requested = tunnelProtocol.isV2 ? self.url.mode : .reverse
        if requested == .forward {
            self.pool.serveForward(target: self.url.target, pipelines: self.pipelines)
            tunnelProtocol.chooseForward()
            return []
        }
        let launcher = self.pool.serveReverse()
        var listeners: [any Channel] = []
        do {
            var port = self.url.target.port
            if tunnelProtocol.transports.contains(.tcp) {
                let listener = try await Listener.bind(
                    self.userBootstrap(launcher: launcher),
                    host: self.url.target.host,
                    port: port
                )
                listeners.append(listener)
                // Port 0: UDP takes the port TCP was given.
                port = listener.localAddress?.port ?? port
            }
            if tunnelProtocol.transports.contains(.udp) {
                do {
                    listeners.append(
                        try await DatagramUsers.bind(
                            host: self.url.target.host,
                            port: port,
                            on: self.dataLoop,
                            launcher: launcher,
                            pipelines: self.pipelines
                        )
                    )
                } catch  where !listeners.isEmpty {
                    self.logger.warning("UDP is off: \(UserFacingError.describe(error))")
                    tunnelProtocol.turnOffDatagrams()
                }
            }
        } catch {
            for listener in listeners { try? await listener.close() }
            guard requested == .auto else { throw error }
            self.logger.info(
                "mode=0 chose forward mode: users connect to the client, the server dials its TARGET",
                metadata: ["np.target": "\(self.url.target)", "np.reason": "\(UserFacingError.describe(error))"]
            )
            self.pool.serveForward(target: self.url.target, pipelines: self.pipelines)
            tunnelProtocol.chooseForward()
            return []
        }
        if requested == .auto {
            self.logger.info(
                "mode=0 chose reverse mode: users connect to the server's TARGET",
                metadata: ["np.target": "\(self.url.target)"]
            )
        }
        return listeners
    }

    private func baseBootstrap(on group: (any EventLoopGroup)? = nil, what: String) -> ServerBootstrap {
        Listener.bootstrap(group: group ?? self.group, logger: self.logger, what: what)
    }

    private func controlBootstrap(
        tls: NIOSSLContext,
        protocol tunnelProtocol: ServerProtocol,
        fingerprint: [UInt8],
        poolPort: Int
    ) -> ServerBootstrap {
        self.baseBootstrap(what: "tunnel")
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { [pool, logger, pendingHandshakes, pipelines] channel in
                pendingHandshakes.admit(
                    channel,
                    logger: logger,
                    evicted: "too many TLS handshakes in progress; the oldest was closed"
                )
                return channel.eventLoop.makeCompletedFuture {
                    do {
                        try pipelines.serverControl(
                            channel,
                            tls: tls,
                            protocol: tunnelProtocol,
                            fingerprint: fingerprint,
                            poolPort: poolPort,
                            delegate: pool,
                            handshakes: pendingHandshakes
                        )
                    } catch {
                        pendingHandshakes.finish(channel)
                        throw error
                    }
                }
            }
    }

    private func poolBootstrap(protocol tunnelProtocol: ServerProtocol) -> ServerBootstrap {
        let forward = tunnelProtocol.mode == .forward
        guard case .v2(let v2) = tunnelProtocol else {
            return self.baseBootstrap(on: self.dataLoop, what: "pool")
                .childChannelInitializer { [pool, pipelines] channel in
                    channel.eventLoop.makeCompletedFuture {
                        try pipelines.serverPoolConnection(
                            channel,
                            tls: nil,
                            authenticated: false,
                            forward: forward,
                            pool: pool
                        )
                    }
                }
        }
        // Made once: every pool connection of a v2 server is checked with the same settings. The openings are
        // accepted and proven on a loop of their own; a proven one moves to the relays' loop.
        let authentication = ServerPoolAuthenticationHandler.Settings(
            dataLoop: self.dataLoop,
            setUp: { [pool, pipelines] channel, authenticated in
                try pipelines.serverPoolConnection(
                    channel,
                    tls: authenticated.sealing == nil ? v2.dataTLS : nil,
                    sealing: authenticated.sealing,
                    authenticated: true,
                    resume: authenticated.resume,
                    forward: forward,
                    pool: pool
                )
            },
            timeout: self.configuration.idReadTimeout,
            secretForSession: { [pool] in pool.secret(forSession: $0) },
            openings: self.pendingPoolOpenings,
            metrics: self.metrics,
            logger: self.logger
        )
        return self.baseBootstrap(on: PoolOpeningLoop.group, what: "pool")
            .childChannelInitializer { [pipelines] channel in
                channel.eventLoop.makeCompletedFuture {
                    try pipelines.serverPoolOpening(channel, authentication: authentication)
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

/// Where every server of the process accepts v2 pool connections and checks their proofs: a thread of its
/// own that relays nothing, so that a flood of strangers' openings at any tunnel takes a share of the CPU
/// from the relays, never a place in their event loop's queue. Made when the first server needs it and kept
/// for the life of the process, as SwiftNIO's singleton group is.
enum PoolOpeningLoop {
    static let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
}
