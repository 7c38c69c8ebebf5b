import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NodePassCore
import ServiceLifecycle
import Synchronization

/// The client: keeps a TLS control channel to the server, a pool of data connections, and relays each
/// launched connection to its TARGET. Reconnects after SERVICE_COOLDOWN when the control channel is lost.
/// With a key it speaks v2 (authenticated handshake and pool connections), else v1.
public final class TunnelClient: Service, Sendable {
    private let url: TunnelURL
    private let group: any EventLoopGroup
    private let pipelines: Pipelines
    private var configuration: Configuration { self.pipelines.configuration }
    private var logger: Logger { self.pipelines.logger }
    private var metrics: TunnelMetrics { self.pipelines.metrics }
    private var sessions: SessionTracker { self.pipelines.sessions }
    private let pool: ClientPool
    private let connections = Atomic<Int>(0)
    /// Forward mode: the listeners on TARGET where users connect (TCP, UDP), open while the server asks
    /// for forward mode, with what they carry.
    private let userListeners = Locked<(transports: TunnelTransports, channels: [any Channel])>(([], []))

    /// Makes a client for `url` (role client).
    public init(
        url: TunnelURL,
        configuration: Configuration,
        group: any EventLoopGroup,
        logger: Logger,
        metrics: TunnelMetrics = TunnelMetrics(role: "client")
    ) {
        self.url = url
        self.group = group
        self.pipelines = Pipelines(metrics: metrics, logger: logger, configuration: configuration, isClient: true)
        self.pool = ClientPool(url: url, group: group, pipelines: self.pipelines)
    }

    /// The server's TUNNEL as this client dials it, for messages.
    private var serverAddress: HostPort { HostPort(host: self.url.tunnel.dialHost, port: self.url.tunnel.port) }

    /// The number of live relayed sessions.
    public var sessionCount: Int { self.sessions.count }
    /// The number of idle pool connections.
    public var idlePoolCount: Int { self.pool.idleCount }

    /// Runs until graceful shutdown, reconnecting after every loss of the control channel.
    public func run() async throws {
        // The kernel relay's engines run while this tunnel does (and stop after the last tunnel).
        try await SpliceEngines.shared.holding(if: self.configuration.splice) { try await self.serve() }
    }

    private func serve() async throws {
        let tunnelProtocol = try ClientProtocol(url: self.url)
        if let keyText = self.url.key, keyText.count < V2Key.recommendedLength {
            self.logger.warning("the key is short; use at least \(V2Key.recommendedLength) random characters")
        }
        let tls = try TLSClientContext.makeUnverified(applicationProtocols: tunnelProtocol.alpn)
        self.logger.info(
            "client started",
            metadata: [
                "np.url": "\(self.url.redacted)", "np.version": "\(NodePassVersion.current)",
                "np.protocol": "\(NodePassVersion.spoken(keyed: self.url.key != nil))",
            ]
        )
        // Only failed attempts double the wait: after a completed handshake it starts over, so that a server
        // that restarts several times in a row is rejoined within SERVICE_COOLDOWN each time.
        var backoff = Backoff(base: self.configuration.serviceCooldown)
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            let established = Locked(false)
            var failure: (any Error)?
            do {
                try await self.runControlChannel(tls: tls, protocol: tunnelProtocol, established: established)
            } catch {
                failure = error
            }
            self.pool.stop()
            if Task.isShuttingDownGracefully { break }
            if established.withLock({ $0 }) { backoff.reset() }
            let delay = backoff.nextDelay(jitter: Double.random(in: 0..<1))
            let retry: Logger.Metadata = [
                "np.retry": "\(DurationParser.format(.milliseconds(delay.nanoseconds / 1_000_000)))"
            ]
            // One line per attempt, in the user's words (what to change, where that is known); the error as
            // SwiftNIO or BoringSSL gave it at debug.
            if let failure {
                self.logger.debug("control channel failed", metadata: ["np.error": "\(failure)"])
                var metadata = retry
                if (failure as? NodePassError)?.code != .unreachable {
                    metadata["np.server"] = "\(self.serverAddress)"
                }
                self.logger.error("\(UserFacingError.describe(failure))", metadata: metadata)
            } else {
                self.logger.error("control channel lost; reconnecting", metadata: retry)
            }
            try? await cancelWhenGracefulShutdown {
                try await Task.sleep(nanoseconds: UInt64(delay.nanoseconds))
            }
        }
        self.pool.stop()
        try? await self.updateUserListeners(forward: false)
        self.logger.info("shutting down", metadata: ["np.sessions": "\(self.sessions.count)"])
        let cut = await self.sessions.drain(timeout: self.configuration.shutdownTimeout)
        if cut > 0 {
            self.logger.warning("sessions cut at shutdown timeout", metadata: ["np.sessions": "\(cut)"])
        }
        self.logger.info("client stopped")
    }

    /// Opens the TARGET listeners (TCP, and UDP when the session carries it) when the server asks for
    /// forward mode; closes them otherwise, or to reopen them when what the tunnel carries changed.
    private func updateUserListeners(forward: Bool, transports: TunnelTransports = []) async throws {
        let wanted = forward ? transports : []
        let current = self.userListeners.withLock { $0 }
        guard current.transports != wanted else { return }
        self.userListeners.withLock { $0 = ([], []) }
        for listener in current.channels { try? await listener.close() }
        guard !wanted.isEmpty else { return }
        var opened: [any Channel] = []
        do {
            var port = self.url.target.port
            if wanted.contains(.tcp) {
                let listener = try await Listener.bind(
                    self.userBootstrap(),
                    host: self.url.target.host,
                    port: port
                )
                opened.append(listener)
                // Port 0: UDP takes the port TCP was given.
                port = listener.localAddress?.port ?? port
            }
            if wanted.contains(.udp) {
                do {
                    opened.append(
                        try await DatagramUsers.bind(
                            host: self.url.target.host,
                            port: port,
                            on: self.pool.forwardLoop,
                            launcher: self.pool.forwardLauncher,
                            pipelines: self.pipelines
                        )
                    )
                } catch  where !opened.isEmpty {
                    // TCP goes on; the users of UDP on this side get no answer.
                    self.logger.warning("UDP is off on this side: \(UserFacingError.describe(error))")
                }
            }
        } catch {
            for listener in opened { try? await listener.close() }
            throw error
        }
        self.userListeners.withLock { $0 = (wanted, opened) }
        self.logger.info(
            "forward mode: users connect to this side's TARGET",
            metadata: [
                "np.target": "\(PeerAddress.describe(opened.first?.localAddress))",
                "np.udp": "\(wanted.contains(.udp) ? "on" : "off")",
            ]
        )
    }

    private func userBootstrap() -> ServerBootstrap {
        let users = UserConnections(pipelines: self.pipelines)
        // On the pool's forward loop: each user and its pool connection share a thread.
        return Listener.bootstrap(group: self.pool.forwardLoop, logger: self.logger, what: "target")
            .childChannelInitializer { [pool] channel in
                users.initialize(channel) { pool.userArrived($0) }
            }
    }

    /// One attempt: connects, runs the session until the channel closes; `established` is set once the
    /// handshake completed (v1: the pool port came; v2: the server accepted this client).
    private func runControlChannel(
        tls: NIOSSLContext,
        protocol tunnelProtocol: ClientProtocol,
        established: Locked<Bool>
    ) async throws {
        let loop = self.group.next()
        let connected = loop.makePromise(of: Void.self)
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: loop)
                .connectTimeout(self.configuration.dialTimeout)
                .channelInitializer { [pool, pipelines] channel in
                    channel.eventLoop.makeCompletedFuture {
                        try pipelines.clientControl(
                            channel,
                            tls: tls,
                            protocol: tunnelProtocol,
                            pool: pool,
                            connected: connected
                        )
                    }
                }
                .connect(host: self.url.tunnel.dialHost, port: self.url.tunnel.port)
                .get()
        } catch {
            let unreachable = NodePassError(
                .unreachable,
                "cannot reach the server at \(self.serverAddress)",
                underlying: error
            )
            connected.fail(unreachable)
            throw unreachable
        }
        try await withGracefulShutdownHandler {
            try await connected.futureResult.get()
            established.withLock { $0 = true }
            if self.connections.wrappingAdd(1, ordering: .relaxed).newValue > 1 {
                self.metrics.reconnects.increment()
            }
            do {
                try await self.updateUserListeners(forward: self.pool.isForward, transports: self.pool.transports)
            } catch {
                channel.close(promise: nil)
                throw error
            }
            try await channel.closeFuture.get()
        } onGracefulShutdown: {
            channel.close(promise: nil)
        }
    }
}
