import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NodePassCore
import NodePassNIO
import ServiceLifecycle

/// Master mode: many tunnels (instances) in this process, managed over NodePass's HTTP API, their
/// definitions kept in a state directory. Runs until graceful shutdown: then the event streams get
/// `shutdown`, every tunnel stops, the state is saved and the API closes.
public final class MasterService: Service {
    private let url: MasterURL
    private let core: MasterCore
    private let tls: APITLS?
    private let configuration: Configuration
    private let group: any EventLoopGroup
    private let logger: Logger

    /// Prepares a master: takes the state directory, loads the state (or makes a new identity) and the API's
    /// TLS certificate. Errors say what cannot be used and why; nothing listens yet.
    ///
    /// `instanceLogHandler(id, level, copy)` makes the log handler of instance `id`'s tunnel; it must hand
    /// every line to `copy` too (the event stream's `log` events).
    public init(
        url: MasterURL,
        configuration: Configuration,
        store: StateStore,
        group: any EventLoopGroup,
        logger: Logger,
        prometheus: Bool,
        instanceLogHandler:
            @escaping @Sendable (String, LogLevel, @escaping @Sendable (String) -> Void) -> any LogHandler
    ) throws(NodePassError) {
        // The API's certificate first: a master that cannot serve makes no state.
        self.tls = try APITLS.make(
            mode: url.tls,
            certificateFile: url.certificateFile,
            privateKeyFile: url.privateKeyFile
        )
        try store.prepare()
        let state: MasterState
        if let saved = try store.load() {
            state = saved
            logger.info(
                "API key loaded",
                metadata: ["np.key": "\(saved.master.apiKey)", "np.state": "\(store.file)"]
            )
        } else {
            state = MasterState(master: .generate())
            try store.save(state)
            logger.info("API key created", metadata: ["np.key": "\(state.master.apiKey)", "np.state": "\(store.file)"])
        }
        self.url = url
        self.configuration = configuration
        self.group = group
        self.logger = logger
        self.core = MasterCore(
            state: state,
            logLevel: url.logLevel,
            store: store,
            configuration: configuration,
            group: group,
            logger: logger,
            prometheus: prometheus,
            instanceLogHandler: instanceLogHandler
        )
    }

    public func run() async throws {
        let info = MasterInfoSource(url: self.url, group: self.group, pingTimeout: self.configuration.dialTimeout)
        let router = MasterAPI.router(base: self.url.apiBase, core: self.core, info: info, logger: self.logger)
        // Idle connections (and ones that never finish a request) close after a minute; event streams,
        // being responses in progress, are not idle.
        let peers = PeerConnections()
        let http1 = HTTPServerBuilder.http1(
            configuration: .init(
                additionalChannelHandlers: [ConnectionGuard(peers: peers)],
                idleTimeout: .seconds(60),
                httpDecoderConfiguration: .init(
                    maxHeaderFieldSize: 16384,
                    maxHeaderListSize: 65536,
                    maxHeaderFieldCount: 100
                )
            )
        )
        let server: HTTPServerBuilder
        if let tls = self.tls {
            do {
                server = try .tls(http1, tlsConfiguration: tls.configuration)
            } catch {
                throw NodePassError(.tls, "cannot serve the API over TLS", underlying: error)
            }
        } else {
            server = http1
        }
        let scheme = self.tls == nil ? "http" : "https"
        let core = self.core
        let logger = self.logger
        let url = self.url
        let fingerprint = self.tls?.fingerprint
        let app = Application(
            router: router,
            server: server,
            configuration: ApplicationConfiguration(
                address: .hostname(url.listen.host.isEmpty ? "::" : url.listen.dialHost, port: url.listen.port),
                availableConnectionsDelegate: MaximumAvailableConnections(256)
            ),
            onServerRunning: { channel in
                var metadata: Logger.Metadata = [
                    "np.api": "\(scheme)://\(url.listen)\(url.apiBase)",
                    "np.port": "\(channel.localAddress?.port ?? 0)", "np.version": "\(NodePassVersion.current)",
                ]
                if let fingerprint { metadata["np.fingerprint"] = "\(fingerprint)" }
                logger.info("master started", metadata: metadata)
                if url.tls == .plain && !Self.isLoopback(url.listen.host) {
                    logger.warning("tls=0: the API key and the instances' URLs cross the network in clear; use tls=1")
                }
            },
            eventLoopGroupProvider: .shared(self.group),
            logger: Logger(label: "nodepass.api", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        try await withThrowingDiscardingTaskGroup { tasks in
            tasks.addTask {
                do {
                    // What ran before runs again before the first request is served.
                    await core.resume()
                    try await app.run()
                } catch {
                    await core.shutdown()
                    throw NodePassError(.bindFailed, "cannot serve the API on \(url.listen)", underlying: error)
                }
            }
            tasks.addTask {
                // Reports every REPORT_INTERVAL, and a comment on the event streams now and then (a stream
                // to a peer that is gone fails its write and ends), until shutdown; then the tunnels stop
                // before the API closes.
                var lastKeepAlive = NIODeadline.now()
                while !Task.isShuttingDownGracefully && !Task.isCancelled {
                    try? await cancelWhenGracefulShutdown {
                        try await Task.sleep(nanoseconds: UInt64(self.configuration.reportInterval.nanoseconds))
                    }
                    await core.report()
                    if NIODeadline.now() - lastKeepAlive >= EventHub.keepAlivePeriod {
                        core.hub.keepAlive()
                        lastKeepAlive = .now()
                    }
                }
                logger.info("master shutting down")
                await core.shutdown()
            }
        }
        logger.info("master stopped")
    }

    private static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host.hasPrefix("127.") || host == "::1"
    }
}
