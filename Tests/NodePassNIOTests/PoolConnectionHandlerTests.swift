import NIOCore
import NIOEmbedded
import NodePassCore
import Synchronization
import Testing

@testable import NodePassNIO

private final class RecordingServerDelegate: ServerPoolConnectionDelegate {
    let events = Mutex<[String]>([])
    let id: PoolID?

    init(id: PoolID?) {
        self.id = id
    }

    func poolConnectionAccepted(_ channel: any Channel, authentication: V2PoolAuthenticated?) -> PoolAdmission? {
        guard let id = self.id else { return nil }
        var opening = ByteBuffer()
        id.write(to: &opening)
        return PoolAdmission(id: id, opening: opening, owner: 1)
    }
    func poolConnectionReady(_ connection: PoolConnection) {
        self.events.withLock { $0.append("ready \(connection.id)") }
    }
    func poolConnectionClosed(id: PoolID, channel: any Channel, protocolViolation: Bool) {
        self.events.withLock { $0.append("closed \(id) \(protocolViolation)") }
    }
}

private final class RecordingClientDelegate: ClientPoolConnectionDelegate {
    let events = Mutex<[String]>([])
    func poolConnectionEstablished(_ connection: PoolConnection) {
        self.events.withLock { $0.append("id \(connection.id)") }
    }
    func poolConnectionClaimed(id: PoolID) { self.events.withLock { $0.append("claimed \(id)") } }
    func poolConnectionClosed(_ channel: any Channel, id: PoolID?) {
        self.events.withLock { $0.append("closed \(id.map { "\($0)" } ?? "-")") }
    }
    func poolCertificateMismatched(_ channel: any Channel) { self.events.withLock { $0.append("mismatch") } }
}

@Suite struct ServerPoolConnectionHandlerTests {
    @Test func writesTheIDInOneWriteAndReportsReady() throws {
        let delegate = RecordingServerDelegate(id: PoolID(0x0102_0a0b))
        let channel = EmbeddedChannel(handler: ServerPoolConnectionHandler(delegate: delegate, glue: GlueHandler()))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let written = try channel.readOutbound(as: ByteBuffer.self)
        #expect(written == ByteBuffer(string: "01020a0b"))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(delegate.events.withLock { $0 } == ["ready 01020a0b"])
        _ = try channel.finish()
    }

    @Test func bytesOnAnIdleConnectionCloseIt() throws {
        let delegate = RecordingServerDelegate(id: PoolID(5))
        let channel = EmbeddedChannel(handler: ServerPoolConnectionHandler(delegate: delegate, glue: GlueHandler()))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.writeInbound(ByteBuffer(string: "x"))
        #expect(!channel.isActive)
        #expect(delegate.events.withLock { $0 } == ["ready 00000005", "closed 00000005 true"])
    }

    @Test func refusedConnectionIsClosedWithoutAnID() throws {
        let delegate = RecordingServerDelegate(id: nil)
        let channel = EmbeddedChannel(handler: ServerPoolConnectionHandler(delegate: delegate, glue: GlueHandler()))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        #expect(!channel.isActive)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
    }
}

@Suite struct ServerPoolConnectionHandlerForwardTests {
    private func makeChannel(_ delegate: RecordingServerDelegate) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        let glue = GlueHandler()
        try channel.pipeline.syncOperations.addHandlers([
            ServerPoolConnectionHandler(delegate: delegate, glue: glue, claimTimeout: .seconds(5)),
            glue,
        ])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        _ = try channel.readOutbound(as: ByteBuffer.self)
        return channel
    }

    @Test func bytesBeforeTheLaunchAreHeldAndPassedOnInOrderAtTheHandoff() throws {
        let delegate = RecordingServerDelegate(id: PoolID(7))
        let channel = try self.makeChannel(delegate)
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\n"))
        try channel.writeInbound(ByteBuffer(string: "Host: x\r\n\r\n"))
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(channel.isActive, "forward mode holds early bytes instead of closing")
        #expect(delegate.events.withLock { $0 } == ["ready 00000007"])

        let partner = EmbeddedChannel(loop: channel.embeddedEventLoop)
        try partner.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 2)).wait()
        let handler = try channel.pipeline.syncOperations.handler(type: ServerPoolConnectionHandler.self)
        #expect(handler.handOff(to: .relay(partner: partner)))
        channel.embeddedEventLoop.run()
        var relayed = ByteBuffer()
        while var part = try partner.readOutbound(as: ByteBuffer.self) { relayed.writeBuffer(&part) }
        #expect(relayed == ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        #expect(!handler.handOff(to: .relay(partner: partner)), "a connection is handed off once")
        _ = try? partner.finish()
        _ = try? channel.finish()
    }

    @Test func heldBytesWithoutALaunchAreDroppedAtTheClaimTimeout() throws {
        let delegate = RecordingServerDelegate(id: PoolID(8))
        let channel = try self.makeChannel(delegate)
        try channel.writeInbound(ByteBuffer(string: "early"))
        channel.embeddedEventLoop.advanceTime(by: .seconds(6))
        #expect(!channel.isActive)
        #expect(delegate.events.withLock { $0 } == ["ready 00000008", "closed 00000008 false"])
    }
}

@Suite struct ClientPoolConnectionHandlerTests {
    private func makeChannel(_ delegate: RecordingClientDelegate) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        let glue = GlueHandler()
        try channel.pipeline.syncOperations.addHandlers([
            ClientPoolConnectionHandler(
                delegate: delegate,
                glue: glue,
                idReadTimeout: .seconds(5),
                claimTimeout: .seconds(5)
            ),
            glue,
        ])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    @Test func readsAnIDSplitAcrossReads() throws {
        let delegate = RecordingClientDelegate()
        let channel = try self.makeChannel(delegate)
        try channel.writeInbound(ByteBuffer(string: "dead"))
        #expect(delegate.events.withLock { $0 }.isEmpty)
        try channel.writeInbound(ByteBuffer(string: "beef"))
        #expect(delegate.events.withLock { $0 } == ["id deadbeef"])
        _ = try channel.finish()
    }

    @Test func malformedIDClosesTheConnection() throws {
        let delegate = RecordingClientDelegate()
        let channel = try self.makeChannel(delegate)
        try channel.writeInbound(ByteBuffer(string: "NOT-HEX!"))
        #expect(!channel.isActive)
        #expect(delegate.events.withLock { $0 } == ["closed -"])
    }

    @Test func bytesBeforeTheLaunchAreKeptAndClaimTheConnection() throws {
        let delegate = RecordingClientDelegate()
        let channel = try self.makeChannel(delegate)
        try channel.writeInbound(ByteBuffer(string: "0000000fGET / HTTP/1.1\r\n"))
        #expect(delegate.events.withLock { $0 } == ["id 0000000f", "claimed 0000000f"])
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)
        #expect(channel.isActive)
        _ = try channel.finish()
    }

    @Test func endOfInputOnAnIdleConnectionLosesIt() throws {
        let delegate = RecordingClientDelegate()
        let channel = try self.makeChannel(delegate)
        try channel.writeInbound(ByteBuffer(string: "0000000e"))
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(!channel.isActive)
        #expect(delegate.events.withLock { $0 } == ["id 0000000e", "closed 0000000e"])
    }

    @Test func idReadTimesOut() throws {
        let delegate = RecordingClientDelegate()
        let channel = try self.makeChannel(delegate)
        channel.embeddedEventLoop.advanceTime(by: .seconds(6))
        #expect(!channel.isActive)
        #expect(delegate.events.withLock { $0 } == ["closed -"])
    }
}
