import NIOCore
import Testing

@testable import NodePassCore

@Suite struct SignalTests {
    private func parse(_ text: String) throws(NodePassError) -> Signal.Parsed {
        try Signal.parse(ByteBuffer(string: text))
    }

    @Test func printsTheExactBytes() {
        #expect(Signal.remote(port: 1024).line == "remote://1024\n")
        #expect(Signal.launch(PoolID(0x00ab_cdef)).line == "launch://00abcdef\n")
    }

    @Test func parsesWhatItPrints() throws {
        for signal in [Signal.remote(port: 1), .remote(port: 65535), .launch(PoolID(0)), .launch(PoolID(.max))] {
            var line = ByteBuffer(string: signal.line)
            line.moveWriterIndex(to: line.writerIndex - 1)
            #expect(try Signal.parse(line) == .signal(signal))
        }
    }

    @Test func trimsWhiteSpace() throws {
        #expect(try self.parse("  remote://8080\r ") == .signal(.remote(port: 8080)))
        #expect(try self.parse("\t\r") == .empty)
    }

    @Test func ignoresUnknownSchemes() throws {
        #expect(try self.parse("ping://now") == .unknown(scheme: "ping"))
    }

    @Test(arguments: [
        "garbage", "remote://", "remote://0", "remote://99999", "remote://080", "remote://-1", "remote://8080x",
        "launch://", "launch://123456789", "launch://1234567", "launch://ABCDEF12", "launch://zzzzzzzz",
        "\u{0}\u{ff}\u{fe}", "://x", "re mote://1", "remote:/1",
    ])
    func refusesMalformedLines(_ text: String) {
        #expect(throws: NodePassError(.malformedSignal, "")) {
            try self.parse(text)
        }
    }

    @Test func refusesBinaryAndHugeLines() {
        #expect(throws: NodePassError(.malformedSignal, "")) {
            try Signal.parse(ByteBuffer(bytes: [0x72, 0x00, 0xFF, 0x80]))
        }
        #expect(throws: NodePassError(.malformedSignal, "")) {
            try self.parse("remote://" + String(repeating: "1", count: 1000))
        }
    }

    @Test func poolIDRoundTrips() throws {
        for value: UInt32 in [0, 1, 0xdead_beef, .max] {
            let id = PoolID(value)
            #expect(id.description.count == 8)
            #expect(try PoolID(parsing: id.description) == id)
        }
    }

    @Test(arguments: ["", "1234567", "123456789", "DEADBEEF", "dead beef", "deadbeeg"])
    func poolIDRefusesBadBytes(_ text: String) {
        #expect(throws: NodePassError(.malformedPoolID, "")) {
            try PoolID(parsing: text)
        }
    }
}
