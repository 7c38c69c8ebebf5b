import NIOCore
import NIOEmbedded
import Testing

@testable import NodePassNIO

@Suite struct SignalWriterTests {
    /// Signals sent while a write is scheduled go out together, in order; a later one is written on its own.
    @Test func signalsSentBeforeTheWriteRunsShareOneWrite() throws {
        let loop = EmbeddedEventLoop()
        let channel = EmbeddedChannel(loop: loop)
        let writer = SignalWriter(channel: channel)
        for byte: UInt8 in [1, 2, 3] {
            writer.send { $0.writeInteger(byte) }
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        loop.run()
        let first = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(Array(first.readableBytesView) == [1, 2, 3])
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)

        writer.send { $0.writeInteger(UInt8(4)) }
        loop.run()
        let second = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(Array(second.readableBytesView) == [4])
        _ = try channel.finish()
    }
}
