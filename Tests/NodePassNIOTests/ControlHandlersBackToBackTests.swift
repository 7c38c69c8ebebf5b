import CoreMetrics
import Logging
import NIOCore
import NIOEmbedded
import NIOTLS
import NodePassCore
import Synchronization
import Testing

@testable import NodePassNIO

private final class RecordingServer: ServerControlDelegate {
    let events = Mutex<[String]>([])
    func controlConnected(_ channel: any Channel) -> SessionAdmission {
        self.events.withLock { $0.append("connected") }
        return .admitted
    }
    func v2SessionStarted(
        _ channel: any Channel,
        sessionID: [UInt8],
        secret: V2SessionSecret,
        datagrams: Bool
    ) -> SessionAdmission {
        self.events.withLock { $0.append("session udp=\(datagrams)") }
        return .admitted
    }
    func controlClosed(_ channel: any Channel) { self.events.withLock { $0.append("closed") } }
    func launchReceived(_ id: PoolID, launch: PoolLaunch, from channel: any Channel) {
        self.events.withLock { $0.append(launch == .stream ? "launch \(id)" : "launch datagrams \(id)") }
    }
}

private final class RecordingPool: ClientControlDelegate {
    let events = Mutex<[String]>([])
    func start(
        port: Int,
        host: String?,
        v2: V2PoolSettings?,
        forwardControl: (any Channel)?,
        transports: TunnelTransports
    ) {
        self.events.withLock {
            $0.append("start \(port) v2=\(v2 != nil) forward=\(forwardControl != nil) udp=\(transports.contains(.udp))")
        }
    }
    func launch(_ id: PoolID, _ launch: PoolLaunch) {
        self.events.withLock { $0.append(launch == .stream ? "launch \(id)" : "launch datagrams \(id)") }
    }
    func stop() { self.events.withLock { $0.append("stop") } }
}

/// The client's and the server's control handlers, back to back on one embedded event loop (no TLS: the
/// TLS handshake's completion is fired by hand), with time advanced by hand.
@Suite struct ControlHandlersBackToBackTests {
    static let key = V2Key(derivedBytes: Array(repeating: 0x11, count: 32))
    static let fingerprint = Array(repeating: UInt8(9), count: 32)
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    /// Heartbeats every second, handshakes bounded at 10 s.
    static let configuration: Configuration = {
        var configuration = Configuration()
        configuration.reportInterval = .seconds(1)
        configuration.handshakeTimeout = .seconds(10)
        return configuration
    }()

    private struct Pair {
        let loop = EmbeddedEventLoop()
        let client: EmbeddedChannel
        let server: EmbeddedChannel
        let pool = RecordingPool()
        let registry = RecordingServer()
        let connected: EventLoopFuture<Void>

        /// `alpn`: what TLS negotiated (v2: `nodepass/2` unless given); `transports`: what the server carries.
        init(
            v2: Bool,
            mode: TunnelMode = .reverse,
            alpn: String? = V2Message.alpn,
            transports: TunnelTransports = [.tcp, .udp]
        ) throws {
            self.client = EmbeddedChannel(loop: self.loop)
            self.server = EmbeddedChannel(loop: self.loop)
            let promise = self.loop.makePromise(of: Void.self)
            self.connected = promise.futureResult
            try self.client.pipeline.syncOperations.addHandlers([
                v2 ? ByteToMessageHandler(V2FrameDecoder()) : ByteToMessageHandler(SignalLineDecoder()),
                ClientControlHandler(
                    protocol: v2
                        ? .v2(key: ControlHandlersBackToBackTests.key, dataTLS: try TLSClientContext.makeForPinning())
                        : .v1,
                    pool: self.pool,
                    configuration: ControlHandlersBackToBackTests.configuration,
                    connected: promise,
                    handshakeDuration: Timer(label: "test"),
                    logger: ControlHandlersBackToBackTests.logger,
                    peerFingerprint: { _ in ControlHandlersBackToBackTests.fingerprint }
                ),
            ])
            try self.server.pipeline.syncOperations.addHandlers([
                v2 ? ByteToMessageHandler(V2FrameDecoder()) : ByteToMessageHandler(SignalLineDecoder()),
                ServerControlHandler(
                    version: v2
                        ? .v2(
                            key: ControlHandlersBackToBackTests.key,
                            fingerprint: ControlHandlersBackToBackTests.fingerprint,
                            transports: transports
                        )
                        : .v1(poolPort: 4000),
                    configuration: ControlHandlersBackToBackTests.configuration,
                    delegate: self.registry,
                    metrics: TunnelMetrics(role: "server"),
                    logger: ControlHandlersBackToBackTests.logger,
                    parameters: V2SessionParameters(
                        mode: mode,
                        tls: .plain,
                        poolPort: 4000,
                        heartbeatMilliseconds: 1000,
                        sessionID: [],
                        dataFingerprint: []
                    ),
                    onHandshakeEnded: { _ in }
                ),
            ])
            let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
            try self.client.connect(to: address).wait()
            try self.server.connect(to: address).wait()
            let alpn = v2 ? alpn : nil
            self.server.pipeline.fireUserInboundEventTriggered(
                TLSUserEvent.handshakeCompleted(negotiatedProtocol: alpn)
            )
            self.client.pipeline.fireUserInboundEventTriggered(
                TLSUserEvent.handshakeCompleted(negotiatedProtocol: alpn)
            )
            try self.exchange()
        }

        /// Carries what each side wrote to the other until neither has more to say.
        func exchange(serverToClient: Bool = true) throws {
            var moved = true
            var rounds = 0
            while moved && rounds < 100 {
                moved = false
                rounds += 1
                while let bytes = try self.client.readOutbound(as: ByteBuffer.self), self.server.isActive {
                    try self.server.writeInbound(bytes)
                    moved = true
                }
                while let bytes = try self.server.readOutbound(as: ByteBuffer.self), self.client.isActive {
                    if serverToClient { try self.client.writeInbound(bytes) }
                    moved = true
                }
            }
        }

        /// Advances the clock second by second, exchanging after each.
        func advance(seconds: Int, serverToClient: Bool = true) throws {
            for _ in 0..<seconds {
                self.loop.advanceTime(by: .seconds(1))
                try self.exchange(serverToClient: serverToClient)
            }
        }
    }

    @Test func v2HandshakeStartsThePoolAndHeartbeatsKeepTheSessionAlive() throws {
        let pair = try Pair(v2: true)
        try pair.connected.wait()
        #expect(pair.registry.events.withLock { $0 } == ["session udp=false"])
        #expect(pair.pool.events.withLock { $0 } == ["start 4000 v2=true forward=false udp=false"])
        // A launch from the server reaches the pool.
        var launch = ByteBuffer()
        V2Message.launch(PoolID(0x2a)).write(to: &launch)
        pair.server.writeAndFlush(launch, promise: nil)
        try pair.exchange()
        #expect(pair.pool.events.withLock { $0.last } == "launch 0000002a")
        try pair.advance(seconds: 10)
        #expect(pair.client.isActive && pair.server.isActive)
        // The server falls silent: after three periods the client gives up; the client's heartbeats still
        // reach the server, which stays up.
        try pair.advance(seconds: 4, serverToClient: false)
        #expect(!pair.client.isActive)
        // The pool stops with the channel, before the client's next attempt.
        #expect(pair.pool.events.withLock { $0.last } == "stop")
        #expect(pair.server.isActive)
        _ = try? pair.server.finish()
        #expect(pair.registry.events.withLock { $0.last } == "closed")
    }

    @Test func nodepass21CarriesUDPAndPassesDatagramLaunchesBothWays() throws {
        let pair = try Pair(v2: true, alpn: V2Message.alpnDatagrams)
        try pair.connected.wait()
        #expect(pair.registry.events.withLock { $0 } == ["session udp=true"])
        #expect(pair.pool.events.withLock { $0 } == ["start 4000 v2=true forward=false udp=true"])
        var launch = ByteBuffer()
        V2Message.launchDatagrams(PoolID(0x2b)).write(to: &launch)
        pair.server.writeAndFlush(launch, promise: nil)
        try pair.exchange()
        #expect(pair.pool.events.withLock { $0.last } == "launch datagrams 0000002b")
        var clientLaunch = ByteBuffer()
        V2Message.launchDatagrams(PoolID(0x2c)).write(to: &clientLaunch)
        pair.client.writeAndFlush(clientLaunch, promise: nil)
        try pair.exchange()
        #expect(pair.registry.events.withLock { $0.last } == "launch datagrams 0000002c")
        _ = try? pair.client.finish()
        _ = try? pair.server.finish()
    }

    @Test func underNodepass2ADatagramLaunchIsIgnoredAsAnyUnknownFrame() throws {
        let pair = try Pair(v2: true, alpn: V2Message.alpn)
        try pair.connected.wait()
        var launch = ByteBuffer()
        V2Message.launchDatagrams(PoolID(0x2b)).write(to: &launch)
        pair.server.writeAndFlush(launch, promise: nil)
        pair.client.writeAndFlush(launch, promise: nil)
        try pair.exchange()
        #expect(pair.pool.events.withLock { $0 } == ["start 4000 v2=true forward=false udp=false"])
        #expect(pair.registry.events.withLock { $0 } == ["session udp=false"])
        #expect(pair.client.isActive && pair.server.isActive)
        _ = try? pair.client.finish()
        _ = try? pair.server.finish()
    }

    @Test func aServerThatCarriesUDPOnlyRefusesAClientOfNodepass2() throws {
        let pair = try Pair(v2: true, alpn: V2Message.alpn, transports: [.udp])
        #expect(throws: NodePassError.self) { try pair.connected.wait() }
        #expect(pair.registry.events.withLock { $0 }.isEmpty)
        // The pool never started; the closed channel only stops it.
        #expect(pair.pool.events.withLock { $0 } == ["stop"])
        #expect(!pair.server.isActive)
    }

    @Test func v2ForwardModeClientIgnoresTheServersLaunches() throws {
        let pair = try Pair(v2: true, mode: .forward)
        try pair.connected.wait()
        #expect(pair.pool.events.withLock { $0 } == ["start 4000 v2=true forward=true udp=false"])
        var launch = ByteBuffer()
        V2Message.launch(PoolID(1)).write(to: &launch)
        pair.server.writeAndFlush(launch, promise: nil)
        try pair.exchange()
        #expect(pair.pool.events.withLock { $0.count } == 1)
        // And the server passes the client's launches on.
        var clientLaunch = ByteBuffer()
        V2Message.launch(PoolID(2)).write(to: &clientLaunch)
        pair.client.writeAndFlush(clientLaunch, promise: nil)
        try pair.exchange()
        #expect(pair.registry.events.withLock { $0.last } == "launch 00000002")
        _ = try? pair.client.finish()
        _ = try? pair.server.finish()
    }

    @Test func v1AnnouncesThePoolPortEveryPeriodAndASilentServerIsDropped() throws {
        let pair = try Pair(v2: false)
        try pair.connected.wait()
        #expect(pair.registry.events.withLock { $0 } == ["connected"])
        #expect(pair.pool.events.withLock { $0 } == ["start 4000 v2=false forward=false udp=false"])
        try pair.advance(seconds: 10)
        #expect(pair.client.isActive)
        #expect(pair.pool.events.withLock { $0.count } == 1, "the same port does not restart the pool")
        try pair.advance(seconds: 4, serverToClient: false)
        #expect(!pair.client.isActive)
        _ = try? pair.server.finish()
        #expect(pair.registry.events.withLock { $0.last } == "closed")
    }

    @Test func aHandshakeThatNeverCompletesIsClosedAtItsDeadline() throws {
        let loop = EmbeddedEventLoop()
        let server = EmbeddedChannel(loop: loop)
        let ended = Mutex(0)
        try server.pipeline.syncOperations.addHandlers([
            ByteToMessageHandler(V2FrameDecoder()),
            ServerControlHandler(
                version: .v2(key: Self.key, fingerprint: Self.fingerprint),
                configuration: Self.configuration,
                delegate: RecordingServer(),
                metrics: TunnelMetrics(role: "server"),
                logger: Self.logger,
                parameters: V2SessionParameters(
                    mode: .reverse,
                    tls: .plain,
                    poolPort: 4000,
                    heartbeatMilliseconds: 1000,
                    sessionID: [],
                    dataFingerprint: []
                ),
                onHandshakeEnded: { _ in ended.withLock { $0 += 1 } }
            ),
        ])
        try server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        loop.advanceTime(by: .seconds(9))
        #expect(server.isActive)
        loop.advanceTime(by: .seconds(1))
        #expect(!server.isActive)
        #expect(ended.withLock { $0 } == 1)
    }
}
