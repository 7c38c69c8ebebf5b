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
    /// Forward mode: the listener on TARGET where users connect, open while the server asks for forward mode.
    private let userListener = Locked<(any Channel)?>(nil)

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
        self.pipelines = Pipelines(metrics: metrics, logger: logger, configuration: configuration)
        self.pool = ClientPool(url: url, group: group, pipelines: self.pipelines)
    }

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
        let alpn = tunnelProtocol.isV2 ? [V2Message.alpn] : []
        let tls = try TLSClientContext.makeUnverified(applicationProtocols: alpn)
        self.logger.info(
            "client started",
            metadata: [
                "np.url": "\(self.url.redacted)", "np.version": "\(NodePassVersion.current)",
                "np.protocols": "\(NodePassVersion.protocols)",
            ]
        )
        var backoff = Backoff(
            base: self.configuration.serviceCooldown,
            healthyAfter: self.configuration.reportInterval * 3
        )
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            let started = NIODeadline.now()
            var failure: (message: Logger.Message, error: (any Error)?) = ("control channel lost; reconnecting", nil)
            do {
                try await self.runControlChannel(tls: tls, protocol: tunnelProtocol)
            } catch {
                failure = ("cannot connect to the server; retrying", error)
            }
            self.pool.stop()
            if Task.isShuttingDownGracefully { break }
            backoff.sessionEnded(uptime: .now() - started)
            let delay = backoff.nextDelay(jitter: Double.random(in: 0..<1))
            var metadata: Logger.Metadata = [
                "np.retry": "\(DurationParser.format(.milliseconds(delay.nanoseconds / 1_000_000)))"
            ]
            if let error = failure.error { metadata["np.error"] = "\(error)" }
            self.logger.error(failure.message, metadata: metadata)
            try? await cancelWhenGracefulShutdown {
                try await Task.sleep(nanoseconds: UInt64(delay.nanoseconds))
            }
        }
        self.pool.stop()
        try? await self.updateUserListener(forward: false)
        self.logger.info("shutting down", metadata: ["np.sessions": "\(self.sessions.count)"])
        let cut = await self.sessions.drain(timeout: self.configuration.shutdownTimeout)
        if cut > 0 {
            self.logger.warning("sessions cut at shutdown timeout", metadata: ["np.sessions": "\(cut)"])
        }
        self.logger.info("client stopped")
    }

    /// Opens the TARGET listener when the server asks for forward mode, closes it otherwise.
    private func updateUserListener(forward: Bool) async throws {
        let current = self.userListener.withLock { $0 }
        if !forward {
            guard let current else { return }
            self.userListener.withLock { $0 = nil }
            try? await current.close()
            return
        }
        guard current == nil else { return }
        let listener = try await Listener.bind(
            self.userBootstrap(),
            host: self.url.target.host,
            port: self.url.target.port,
            what: "target address (forward mode)"
        )
        self.userListener.withLock { $0 = listener }
        self.logger.info(
            "forward mode: users connect to this side's TARGET",
            metadata: ["np.target": "\(PeerAddress.describe(listener.localAddress))"]
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

    private func runControlChannel(tls: NIOSSLContext, protocol tunnelProtocol: ClientProtocol) async throws {
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
            connected.fail(error)
            throw error
        }
        try await withGracefulShutdownHandler {
            try await connected.futureResult.get()
            if self.connections.wrappingAdd(1, ordering: .relaxed).newValue > 1 {
                self.metrics.reconnects.increment()
            }
            do {
                try await self.updateUserListener(forward: self.pool.isForward)
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
