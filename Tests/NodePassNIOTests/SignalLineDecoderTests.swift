import NIOCore
import NIOEmbedded
import Testing

@testable import NodePassNIO

@Suite struct SignalLineDecoderTests {
    @Test func splitsLinesAcrossReads() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(SignalLineDecoder()))
        try channel.writeInbound(ByteBuffer(string: "remote://80"))
        try channel.writeInbound(ByteBuffer(string: "80\nlaunch://0000000a\n\n"))
        #expect(try channel.readInbound(as: ControlInput.self) == .line(.line(ByteBuffer(string: "remote://8080"))))
        #expect(try channel.readInbound(as: ControlInput.self) == .line(.line(ByteBuffer(string: "launch://0000000a"))))
        #expect(try channel.readInbound(as: ControlInput.self) == .line(.line(ByteBuffer())))
        #expect(try channel.readInbound(as: ControlInput.self) == nil)
        #expect(try channel.finish().isClean)
    }

    @Test func dropsAnOverlongLineOnceAndStaysInSync() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(SignalLineDecoder(maximumLineLength: 16)))
        try channel.writeInbound(ByteBuffer(string: String(repeating: "x", count: 40)))
        try channel.writeInbound(ByteBuffer(string: String(repeating: "y", count: 40)))
        try channel.writeInbound(ByteBuffer(string: "zz\nremote://1\n"))
        #expect(try channel.readInbound(as: ControlInput.self) == .line(.overlong))
        #expect(try channel.readInbound(as: ControlInput.self) == .line(.line(ByteBuffer(string: "remote://1"))))
        #expect(try channel.readInbound(as: ControlInput.self) == nil)
        _ = try channel.finish()
    }

    @Test func overlongLineInOneReadIsReported() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(SignalLineDecoder(maximumLineLength: 4)))
        try channel.writeInbound(ByteBuffer(string: "abcdefgh\nok\n"))
        #expect(try channel.readInbound(as: ControlInput.self) == .line(.overlong))
        #expect(try channel.readInbound(as: ControlInput.self) == .line(.line(ByteBuffer(string: "ok"))))
        _ = try channel.finish()
    }
}
