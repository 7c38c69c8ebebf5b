import Logging
import NIOCore
import NIOEmbedded
import NodePassCore
import Testing

@testable import NodePassNIO

/// Keeps what passes the seal on the way in: bytes, the end of input, errors.
private final class Received: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    var bytes: [UInt8] = []
    var inputClosed = false
    var broken = false
    var errors: [any Error] = []

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.bytes += self.unwrapInboundIn(data).readableBytesView
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { self.inputClosed = true }
        if event is PoolConnectionBroken { self.broken = true }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.errors.append(error)
    }
}

@Suite struct SealedRecordHandlerTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    static let keys = V2PoolSealKeys(
        clientToServer: [UInt8](repeating: 1, count: 32),
        serverToClient: [UInt8](repeating: 2, count: 32)
    )

    private func end(isClient: Bool) throws -> (EmbeddedChannel, Received) {
        let received = Received()
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandlers([
            SealedRecordHandler(keys: Self.keys, isClient: isClient, logger: Self.logger), received,
        ])
        return (channel, received)
    }

    private func written(_ channel: EmbeddedChannel) throws -> ByteBuffer {
        var all = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&part) }
        return all
    }

    @Test func bytesCrossInOrderWhateverTheCutsOfTheReads() throws {
        let (client, _) = try self.end(isClient: true)
        let (server, received) = try self.end(isClient: false)
        let plaintext = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        // Writes of several sizes, an empty one among them (it carries no record).
        for range in [0..<1, 1..<1, 1..<70_000, 70_000..<70_100, 70_100..<300_000] {
            try client.writeOutbound(ByteBuffer(bytes: plaintext[range]))
        }
        var wire = try self.written(client)
        #expect(wire.readableBytes > plaintext.count, "what leaves is records, not the plaintext")
        #expect(!wire.readableBytesView.starts(with: plaintext[0..<1] + plaintext[1..<64]))
        // Cut inside a length field, inside a record, and between records.
        for cut in [1, 2, 29, 33, 65_000, 70_000, 1, 100_000] {
            guard let slice = wire.readSlice(length: min(cut, wire.readableBytes)) else { break }
            try server.writeInbound(slice)
        }
        try server.writeInbound(wire)
        #expect(received.bytes == plaintext)
        #expect(server.isActive && received.errors.isEmpty)
    }

    @Test func aHalfCloseSendsTheEndRecordAndTheOtherSideSeesACleanEnd() throws {
        let (client, _) = try self.end(isClient: true)
        let (server, received) = try self.end(isClient: false)
        try client.writeOutbound(ByteBuffer(string: "last words"))
        let closed = client.close(mode: .output)
        client.embeddedEventLoop.run()
        try closed.wait()
        try server.writeInbound(try self.written(client))
        #expect(received.bytes == Array("last words".utf8))
        #expect(received.inputClosed)
        // The socket's own end of input after the end record is expected: the connection stays up for the
        // other direction.
        server.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(server.isActive)
        // And the other direction still works: one record of 6 bytes.
        try server.writeOutbound(ByteBuffer(string: "answer"))
        #expect(try self.written(server).readableBytes == V2PoolSeal.headerLength + V2PoolSeal.overhead + 6)
    }

    /// The lengths of the records in `wire`.
    private func recordLengths(_ wire: ByteBuffer) -> [Int] {
        var wire = wire
        var lengths: [Int] = []
        while let length = wire.readInteger(as: UInt16.self), wire.readSlice(length: Int(length)) != nil {
            lengths.append(Int(length) - V2PoolSeal.overhead)
        }
        return lengths
    }

    @Test func smallWritesWithoutAPromiseGoInTheNextWritesFirstRecord() throws {
        let (client, _) = try self.end(isClient: true)
        let (server, received) = try self.end(isClient: false)
        let header: [UInt8] = [1, 0x3F, 0xFD]
        let payload = (0..<(SealedRecordHandler.recordSize - 3)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        client.write(ByteBuffer(bytes: header), promise: nil)
        client.write(ByteBuffer(bytes: payload), promise: nil)
        client.flush()
        let wire = try self.written(client)
        #expect(self.recordLengths(wire) == [SealedRecordHandler.recordSize], "one full record, not 3 + the rest")
        try server.writeInbound(wire)
        #expect(received.bytes == header + payload)
    }

    @Test func heldBytesGoOutAloneAtAFlushAnEmptyWriteOrTheEnd() throws {
        let (client, _) = try self.end(isClient: true)
        let (server, received) = try self.end(isClient: false)
        // A flush.
        client.write(ByteBuffer(string: "ack"), promise: nil)
        client.flush()
        var wire = try self.written(client)
        #expect(self.recordLengths(wire) == [3])
        // An empty write with a promise: its callback comes once the bytes written before it went out.
        client.write(ByteBuffer(string: "header"), promise: nil)
        var outAtCallback = ByteBuffer()
        client.write(ByteBuffer()).assumeIsolated().whenSuccess {
            outAtCallback = (try? self.written(client)) ?? ByteBuffer()
        }
        client.flush()
        #expect(self.recordLengths(outAtCallback) == [6], "the held bytes were written before the empty write")
        wire.writeImmutableBuffer(outAtCallback)
        // The end of the direction.
        client.write(ByteBuffer(string: "end"), promise: nil)
        let closed = client.close(mode: .output)
        client.embeddedEventLoop.run()
        try closed.wait()
        var end = try self.written(client)
        #expect(self.recordLengths(end) == [3, 0])
        wire.writeBuffer(&end)
        try server.writeInbound(wire)
        #expect(received.bytes == Array("ackheaderend".utf8))
        #expect(received.inputClosed)
    }

    @Test func anEndOfInputWithoutTheEndRecordClosesInsteadOfEndingCleanly() throws {
        let (client, _) = try self.end(isClient: true)
        let (server, received) = try self.end(isClient: false)
        try client.writeOutbound(ByteBuffer(string: "cut short"))
        try server.writeInbound(try self.written(client))
        server.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(received.bytes == Array("cut short".utf8))
        #expect(!received.inputClosed, "a cut stream must not look like a clean end")
        #expect(received.broken, "the relay is told to reset its other half")
        #expect(!server.isActive)
    }

    @Test func aRecordThatDoesNotOpenClosesTheConnectionAndPassesNothingOn() throws {
        let (client, _) = try self.end(isClient: true)
        let (server, received) = try self.end(isClient: false)
        try client.writeOutbound(ByteBuffer(string: "genuine"))
        try client.writeOutbound(ByteBuffer(string: "changed"))
        var wire = try self.written(client)
        let lastByte = wire.writerIndex - 1
        wire.setInteger((wire.getInteger(at: lastByte, as: UInt8.self) ?? 0) ^ 0x80, at: lastByte)
        try server.writeInbound(wire)
        #expect(received.bytes == Array("genuine".utf8))
        #expect(received.errors.count == 1)
        #expect(received.broken)
        #expect(!server.isActive)
    }

    @Test func bytesAfterTheEndRecordAreRefused() throws {
        let (server, received) = try self.end(isClient: false)
        var sealer = V2RecordSealer(key: Self.keys.clientToServer)
        var wire = ByteBuffer()
        try Array("before".utf8).withUnsafeBytes { try sealer.seal($0, into: &wire) }
        try sealer.sealEnd(into: &wire)
        try Array("after".utf8).withUnsafeBytes { try sealer.seal($0, into: &wire) }
        try server.writeInbound(wire)
        #expect(received.bytes == Array("before".utf8))
        #expect(received.inputClosed)
        #expect(received.errors.count == 1)
        #expect(!server.isActive)
    }

    @Test func aFullCloseEndsTheDirectionWithTheEndRecord() throws {
        let (client, _) = try self.end(isClient: true)
        let (server, received) = try self.end(isClient: false)
        try client.writeOutbound(ByteBuffer(string: "bye"))
        try client.close().wait()
        try server.writeInbound(try self.written(client))
        #expect(received.bytes == Array("bye".utf8))
        #expect(received.inputClosed, "a close after the last write is a clean end for the peer")
    }

    @Test func recordsSealedForTheOtherDirectionAreRefused() throws {
        // A record the server sent, reflected back at it, must not open.
        let (server, received) = try self.end(isClient: false)
        try server.writeOutbound(ByteBuffer(string: "reflected"))
        try server.writeInbound(try self.written(server))
        #expect(received.bytes.isEmpty)
        #expect(!server.isActive)
    }
}
