import ArgumentParser
import Logging
import Metrics
import NIOCore
import NIOPosix
import NodePassCore
import NodePassMaster
import NodePassNIO
import Prometheus
import ServiceLifecycle
import UnixSignals

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct NodePassCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nodepass",
        abstract:
            "A TCP and UDP tunnel through NATs and firewalls: a TLS control channel and a pool of data connections.",
        discussion: """
            URL:
              server://[KEY@]TUNNEL_HOST:PORT/TARGET_HOST:PORT?log=LEVEL
              client://[KEY@]SERVER_HOST:PORT/TARGET_HOST:PORT?log=LEVEL
              master://[HOST]:PORT[/PREFIX]?log=LEVEL&tls=0|1|2   (see MASTER MODE)

            The server listens on TUNNEL (TLS control channel), on a pool port
            (pool=PORT, else a free one) that it announces to the client, and
            on TARGET, where users connect. The client connects to the
            server's TUNNEL and dials its own TARGET (the real service) for
            each user connection.
            With a KEY the tunnel carries UDP too, on the same TARGET address:
            each user's datagrams reach the service one by one, whole, and the
            replies go back to that user. Without a key: TCP only.
            A host is a name, an IPv4 address, [an IPv6 address] or empty
            (all interfaces).

            KEY (the same on both sides) selects protocol v2: mutual
            authentication bound to TLS, authenticated and encrypted data
            connections, several clients per server. Without a key: protocol
            v1, compatible with NodePass 1.0, not authenticated. The key may
            instead be in the environment variable NODEPASS_KEY (then leave
            it out of the URL), which keeps it out of the process list.

            QUERY PARAMETERS:
              log=LEVEL          debug, info (default), warn, error or fatal
              metrics=HOST:PORT  serve Prometheus metrics at http://HOST:PORT/metrics
                                 (off by default; unauthenticated: bind it to
                                 127.0.0.1 or a private address)
            Server only:
              pool=PORT          the pool port (default: a free port chosen at
                                 each start); fix it to open it in a firewall
            Server with a KEY only (the client follows the server):
              tls=1              encrypted and authenticated data connections
                                 (default): sealed with keys of the session
                                 (AES-256-GCM, no handshake each); with an
                                 older client, TLS with the in-memory
                                 certificate, pinned by the client
              tls=2              TLS with crt=CERT.pem and key=KEY.pem
              tls=0              plain data connections (authenticated only)
              mode=1             reverse: users connect to the server's TARGET,
                                 the client dials its TARGET (as v1)
              mode=2             forward: users connect to the client's TARGET,
                                 the server dials its TARGET
              mode=0             (default) 1 if the server can listen on its
                                 TARGET, else 2
              noudp=1            carry TCP only (no UDP listener on TARGET)
              notcp=1            carry UDP only
              resume=1           relayed connections survive a broken pool
                                 connection: the client opens a new one and
                                 the bytes not received are sent again

            ENVIRONMENT (integers; durations as 5s, 500ms, 1m; sizes as 64K, 1M):
              SEMAPHORE_LIMIT    1024  concurrent user / relayed connections
              MIN_POOL_CAPACITY  16    idle pool connections kept at least
              MAX_POOL_CAPACITY  1024  idle pool connections at most
              REPORT_INTERVAL    5s    heartbeat period (3 missed = gone)
              SERVICE_COOLDOWN   5s    first pause before reconnecting (then
                                       doubling with jitter, up to 1m)
              SHUTDOWN_TIMEOUT   5s    grace for live connections on exit
              IDLE_TIMEOUT       1h    close a user connection idle this long
                                       both ways (0: never)
              UDP_IDLE_TIMEOUT   60s   forget a UDP flow (a user's address) idle
                                       this long both ways
              UDP_MAX_FLOWS      8192  UDP flows at once; datagrams of new flows
                                       are dropped past it
              RELAY_BUFFER       64K   bytes one direction of a relay holds
                                       in memory before it stops reading
              BUFFER_BUDGET      64M   bytes all relays together hold in
                                       memory before reads shrink to 1 KiB
              RESUME_GRACE       30s   with resume=1: how long a relay waits for
                                       a new pool connection after a break
              NODEPASS_SPLICE    1     0: relay plain connections in user space
                                       only, never with splice(2)

            MASTER MODE:
              One process runs many tunnels (instances: server:// and client://
              URLs as above) and serves NodePass's master API under
              PREFIX/v1 (PREFIX: /api by default): GET/POST /instances,
              GET/PATCH/PUT/DELETE /instances/ID, GET /events (server-sent
              events), GET/POST /info, GET /tcping?target=HOST:PORT, and the
              API's description at /openapi.json and /docs. Every request but
              those two needs the header X-API-Key: the key is made at the
              first start and logged (np.key=...). tls=1 serves the API over
              TLS with a certificate made in memory (its fingerprint is
              logged), tls=2 with crt=FILE and key=FILE; tls=0 (default) is
              plain HTTP: keep it on 127.0.0.1 or a private network.
              metrics=HOST:PORT labels each tunnel's metrics with instance=ID.
              The instances and the key are kept in STATE_DIRECTORY (set by
              systemd's StateDirectory=), else $XDG_STATE_HOME/nodepass, else
              ~/.local/state/nodepass; what ran runs again at the next start.

            KEY:
              nodepass key       prints a fresh random key (32 hex digits)
              A server with a key logs, once at start, the command to run on
              the client's machine, with its address and the key left to
              NODEPASS_KEY.

            EXAMPLES:
              nodepass key       (give its output to both sides as NODEPASS_KEY)
              NODEPASS_KEY=... nodepass "server://:10101/127.0.0.1:8080?pool=10102"
              NODEPASS_KEY=... nodepass "client://server.example.com:10101/127.0.0.1:80"
              nodepass "server://:10101/127.0.0.1:8080"   (v1: trusted networks only)
              nodepass "master://127.0.0.1:9090?tls=1"

            EXIT CODES: 0 clean shutdown, 64 bad URL, 78 bad environment
            variable, 1 the tunnel or master cannot start (e.g. a port in use,
            an unreadable crt= or key= file, a damaged state file).
            """,
        version: "nodepass \(NodePassVersion.current), protocols: \(NodePassVersion.protocols)"
    )

    @Argument(
        help: "server://TUNNEL/TARGET?..., client://TUNNEL/TARGET?..., master://HOST:PORT?... or key (see below)"
    )
    var url: String

    /// Whether the argument is a master URL (`master://…`) rather than a tunnel URL.
    private var isMaster: Bool { self.url.lowercased().hasPrefix("master://") }

    /// `nodepass key`: print a fresh key rather than run a tunnel.
    private var isKeyRequest: Bool { self.url == "key" }

    func validate() throws {
        guard !self.isKeyRequest else { return }
        do {
            if self.isMaster {
                _ = try MasterURL.parse(self.url)
            } else {
                _ = try TunnelURL.parse(self.url, environmentKey: Self.environmentKey())
            }
        } catch {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        if self.isKeyRequest {
            writeAll("\(PairingCommand.freshKey())\n", to: STDOUT_FILENO)
            return
        }
        if self.isMaster {
            try await self.runMaster()
            return
        }
        let url: TunnelURL
        do {
            url = try TunnelURL.parse(self.url, environmentKey: Self.environmentKey())
        } catch {
            throw ValidationError(error.message)
        }
        let configuration = try Self.tunnelConfiguration()
        let logger = Self.bootstrapLogging(url.logLevel)
        let group = MultiThreadedEventLoopGroup.singleton
        try await Self.run(metrics: url.metrics, group: group, logger: logger, what: "the tunnel") {
            switch url.role {
            case .server: TunnelServer(url: url, configuration: configuration, group: group, logger: logger)
            case .client: TunnelClient(url: url, configuration: configuration, group: group, logger: logger)
            }
        }
    }

    /// Master mode: the API and the instances it keeps in the state directory.
    private func runMaster() async throws {
        let url: MasterURL
        do {
            url = try MasterURL.parse(self.url)
        } catch {
            throw ValidationError(error.message)
        }
        let configuration = try Self.tunnelConfiguration()
        let store: StateStore
        do {
            var environment: [String: String] = [:]
            for name in ["STATE_DIRECTORY", "XDG_STATE_HOME", "HOME"] {
                if let value = getenv(name) { environment[name] = String(cString: value) }
            }
            store = StateStore(directory: try StateStore.directory(environment: environment))
        } catch {
            Self.printError(error.message)
            throw ExitCode(78)
        }
        let logger = Self.bootstrapLogging(url.logLevel)
        let group = MultiThreadedEventLoopGroup.singleton
        let colour = isatty(STDOUT_FILENO) == 1
        let master: MasterService
        do {
            master = try MasterService(
                url: url,
                configuration: configuration,
                store: store,
                group: group,
                logger: logger,
                prometheus: url.metrics != nil,
                instanceLogHandler: { id, level, copy in
                    NodePassLogHandler(level: level, colour: colour, suffix: " [\(id)]", copy: copy)
                }
            )
        } catch {
            logger.critical("cannot start the master: \(UserFacingError.describe(error))")
            throw ExitCode(1)
        }
        try await Self.run(metrics: url.metrics, group: group, logger: logger, what: "the master") { master }
    }

    /// The environment's settings, or exit 78 with what is wrong.
    private static func tunnelConfiguration() throws -> Configuration {
        do {
            return try Configuration(environment: Self.environment())
        } catch {
            Self.printError(error.message)
            throw ExitCode(78)
        }
    }

    private static func bootstrapLogging(_ level: LogLevel) -> Logger {
        Self.raiseDescriptorLimit()
        let colour = isatty(STDOUT_FILENO) == 1
        LoggingSystem.bootstrap { _ in NodePassLogHandler(level: level, colour: colour) }
        return Logger(label: "nodepass")
    }

    /// Runs the service that `main` makes (a tunnel or a master) with the memory trimmer and, with `metrics`,
    /// a Prometheus endpoint, until SIGTERM or SIGINT. `main` is called once metrics are set up, so that the
    /// metrics its service makes are Prometheus metrics.
    private static func run(
        metrics: HostPort?,
        group: MultiThreadedEventLoopGroup,
        logger: Logger,
        what: String,
        main: () -> any Service
    ) async throws {
        var services: [any Service] = []
        if let address = metrics {
            let registry = PrometheusCollectorRegistry()
            var factory = PrometheusMetricsFactory(registry: registry)
            factory.defaultDurationHistogramBuckets = [
                .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1),
                .milliseconds(2.5), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
                .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5),
                .seconds(5), .seconds(10),
            ]
            MetricsSystem.bootstrap(factory)
            services.append(
                MetricsServer(address: address, group: group, logger: logger, render: { registry.emitToBuffer() })
            )
        }
        MemoryTrimmer.keepHeapTops()
        services.append(MemoryTrimmer())
        services.append(main())
        let serviceGroup = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: services.map { .init(service: $0) },
                gracefulShutdownSignals: [.sigterm, .sigint],
                cancellationSignals: [],
                logger: Logger(label: "nodepass.lifecycle", factory: { _ in SwiftLogNoOpLogHandler() })
            )
        )
        do {
            try await serviceGroup.run()
        } catch {
            logger.debug("cannot run \(what)", metadata: ["np.error": "\(error)"])
            logger.critical("\(UserFacingError.describe(error))")
            throw ExitCode(1)
        }
    }

    /// Every relayed connection and UDP flow holds descriptors: the soft limit (often 1024) is raised to
    /// the hard one, as most network daemons do.
    private static func raiseDescriptorLimit() {
        #if os(Linux)
        let resource = Int32(RLIMIT_NOFILE.rawValue)
        #else
        let resource = RLIMIT_NOFILE
        #endif
        var limit = rlimit()
        guard getrlimit(resource, &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(resource, &limit)
    }

    private static func environment() -> [String: String] {
        var result: [String: String] = [:]
        for name in Configuration.variableNames {
            if let value = getenv(name) {
                result[name] = String(cString: value)
            }
        }
        return result
    }

    private static func environmentKey() -> String? {
        getenv(TunnelURL.keyVariable).map { String(cString: $0) }
    }

    /// An error found before the tunnel starts, in the format of the argument parser's own ("Error: …").
    private static func printError(_ message: String) {
        writeAll("Error: \(message)\n  See 'nodepass --help' for the environment variables.\n", to: STDERR_FILENO)
    }
}
