import NIOCore
import Testing

@testable import NodePassCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A small, seeded generator (SplitMix64), so that a failing input can be reproduced from its seed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64

    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Random and mutated inputs for every parser that reads from the network or the command line: none may
/// crash, and whatever parses must print back to the same value. `NODEPASS_FUZZ_ITERATIONS` sets the count
/// (default 20,000 per parser; `scripts/fuzz.sh` runs millions).
@Suite struct ParserFuzzTests {
    static var iterations: Int {
        guard let text = getenv("NODEPASS_FUZZ_ITERATIONS"), let value = Int(String(cString: text)), value > 0 else {
            return 20_000
        }
        return value
    }

    static let seeds: [String] = [
        "remote://8080", "launch://0a1b2c3d", "server://127.0.0.1:10101/127.0.0.1:8080?log=debug",
        "client://[::1]:1/:2?metrics=127.0.0.1:9090", "1m30s", "500ms", "deadbeef",
        "master://0.0.0.0:9090/admin?log=warn&tls=1", "master://[::1]:9/a/b?tls=2&crt=c&key=k",
    ]
    static let alphabet: [UInt8] = Array("0123456789abcdefABXYZ:/[]@?&=.%-_ \t\r\n\0".utf8) + [0x7F, 0x80, 0xFF]

    /// Either random bytes or a seed with a few bytes changed, inserted or removed.
    static func input(_ generator: inout SeededGenerator) -> [UInt8] {
        if generator.next() % 4 == 0 {
            let length = Int(generator.next() % 80)
            return (0..<length).map { _ in Self.alphabet[Int(generator.next() % UInt64(Self.alphabet.count))] }
        }
        var bytes = Array(Self.seeds[Int(generator.next() % UInt64(Self.seeds.count))].utf8)
        for _ in 0..<Int(1 + generator.next() % 4) {
            let byte = Self.alphabet[Int(generator.next() % UInt64(Self.alphabet.count))]
            let position = bytes.isEmpty ? 0 : Int(generator.next() % UInt64(bytes.count))
            switch generator.next() % 3 {
            case 0 where !bytes.isEmpty: bytes[position] = byte
            case 1: bytes.insert(byte, at: position)
            default: if !bytes.isEmpty { bytes.remove(at: position) }
            }
        }
        return bytes
    }

    @Test func signalParserNeverCrashesAndRoundTrips() throws {
        var generator = SeededGenerator(state: 1)
        var parsed = 0
        for _ in 0..<Self.iterations {
            let bytes = Self.input(&generator)
            guard case .signal(let signal)? = try? Signal.parse(ByteBuffer(bytes: bytes)) else { continue }
            parsed += 1
            var line = ByteBuffer(string: signal.line)
            line.moveWriterIndex(to: line.writerIndex - 1)
            #expect(try Signal.parse(line) == .signal(signal))
        }
        #expect(parsed > 0)
    }

    @Test func poolIDParserNeverCrashesAndRoundTrips() throws {
        var generator = SeededGenerator(state: 2)
        for _ in 0..<Self.iterations {
            let bytes = Self.input(&generator)
            guard let id = try? PoolID(parsing: bytes) else { continue }
            #expect(Array(id.description.utf8) == bytes)
        }
    }

    @Test func urlParserNeverCrashesAndRoundTrips() throws {
        var generator = SeededGenerator(state: 3)
        var parsed = 0
        for _ in 0..<Self.iterations {
            let text = String(decoding: Self.input(&generator), as: UTF8.self)
            guard let url = try? TunnelURL.parse(text) else { continue }
            parsed += 1
            if url.key == nil {
                #expect(try TunnelURL.parse(url.redacted) == url)
            }
        }
        #expect(parsed > 0)
    }

    @Test func masterURLParserNeverCrashesAndRoundTrips() throws {
        var generator = SeededGenerator(state: 5)
        var parsed = 0
        for _ in 0..<Self.iterations {
            let text = String(decoding: Self.input(&generator), as: UTF8.self)
            guard let url = try? MasterURL.parse(text) else { continue }
            parsed += 1
            #expect(try MasterURL.parse(url.description) == url)
        }
        #expect(parsed > 0)
    }

    @Test func durationAndEnvironmentParsersNeverCrash() {
        var generator = SeededGenerator(state: 4)
        for _ in 0..<Self.iterations {
            let text = String(decoding: Self.input(&generator), as: UTF8.self)
            if let amount = DurationParser.parse(text) {
                #expect(amount >= .zero && amount <= DurationParser.maximum)
            }
            let configuration = try? Configuration(environment: ["REPORT_INTERVAL": text, "MIN_POOL_CAPACITY": text])
            if let configuration {
                #expect(configuration.minPoolCapacity <= configuration.maxPoolCapacity)
            }
        }
    }
}
