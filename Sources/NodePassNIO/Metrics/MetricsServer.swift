import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NodePassCore
import ServiceLifecycle

/// Serves `GET /metrics` over plain HTTP/1.1 with the text a `render` closure returns (Prometheus format).
///
/// Anyone who reaches the port can open connections to it, so they are bounded: at most `connectionLimit`
/// at once (one more closes the oldest, so that idle sockets cannot keep a scraper out), each closed after
/// `idleTimeout` without a byte either way.
public final class MetricsServer: Service, Sendable {
    /// Connections held at once. A Prometheus server keeps one per target.
    public static let connectionLimit = 16
    /// A connection that moved no byte for this long is closed (Prometheus scrapes every 15 s to 1 min and
    /// opens a new connection when its old one was closed).
    public static let idleTimeout = TimeAmount.seconds(90)

    private let address: HostPort
    private let group: any EventLoopGroup
    private let logger: Logger
    private let render: @Sendable () -> [UInt8]
    private let onListening: (@Sendable (Int) -> Void)?
    private let idleTimeout: TimeAmount

    /// Makes a server on `address`; `render` produces the body of each scrape.
    public init(
        address: HostPort,
        group: any EventLoopGroup,
        logger: Logger,
        idleTimeout: TimeAmount = MetricsServer.idleTimeout,
        onListening: (@Sendable (Int) -> Void)? = nil,
        render: @escaping @Sendable () -> [UInt8]
    ) {
        self.address = address
        self.group = group
        self.logger = logger
        self.render = render
        self.onListening = onListening
        self.idleTimeout = idleTimeout
    }

    /// Serves until graceful shutdown.
    public func run() async throws {
        let render = self.render
        let logger = self.logger
        let idleTimeout = self.idleTimeout
        let connections = ConnectionBound(limit: Self.connectionLimit)
        let bootstrap = ServerBootstrap(group: self.group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                connections.admit(
                    channel,
                    logger: logger,
                    evicted: "too many metrics connections; the oldest was closed"
                )
                channel.closeFuture.whenComplete { _ in connections.finish(channel) }
                return channel.eventLoop.makeCompletedFuture {
                    try IdleConnectionCloser.install(
                        on: channel,
                        after: idleTimeout,
                        logger: logger,
                        message: "idle metrics connection closed"
                    )
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(render: render))
                }
            }
        let listener = try await Listener.bind(
            bootstrap,
            host: self.address.host,
            port: self.address.port
        )
        let port = listener.localAddress?.port ?? self.address.port
        self.logger.info("metrics served", metadata: ["np.metrics": "\(HostPort(host: self.address.host, port: port))"])
        self.onListening?(port)
        try? await gracefulShutdown()
        try? await listener.close()
        connections.closeAll()
    }
}

/// Answers one request at a time: `GET /metrics` with the rendered text, anything else with 404.
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let render: @Sendable () -> [UInt8]
    private var found = false
    private var keepAlive = false

    init(render: @escaping @Sendable () -> [UInt8]) {
        self.render = render
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            self.found = head.method == .GET && (head.uri == "/metrics" || head.uri.hasPrefix("/metrics?"))
            self.keepAlive = head.isKeepAlive
        case .body:
            break
        case .end:
            let body = self.found ? ByteBuffer(bytes: self.render()) : ByteBuffer(string: "not found\n")
            var headers = HTTPHeaders()
            headers.add(
                name: "Content-Type",
                value: self.found ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain; charset=utf-8"
            )
            headers.add(name: "Content-Length", value: "\(body.readableBytes)")
            if !self.keepAlive { headers.add(name: "Connection", value: "close") }
            let head = HTTPResponseHead(version: .http1_1, status: self.found ? .ok : .notFound, headers: headers)
            context.write(self.wrapOutboundOut(.head(head)), promise: nil)
            context.write(self.wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            let keepAlive = self.keepAlive
            let channel = context.channel
            context.writeAndFlush(self.wrapOutboundOut(.end(nil))).whenComplete { _ in
                if !keepAlive { channel.close(promise: nil) }
            }
        }
    }
}

@available(*, unavailable)
extension MetricsHTTPHandler: Sendable {}
