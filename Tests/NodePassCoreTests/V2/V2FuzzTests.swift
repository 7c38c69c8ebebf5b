import NIOCore
import Testing

@testable import NodePassCore

/// Seeded random and mutated input for everything v2 reads from the network: the frame reader, the message
/// decoder, the welcome parameters, the pool opening and both handshake machines. Nothing may crash, what
/// decodes must encode back to the same bytes, and no random input may pass an authentication check.
/// `NODEPASS_FUZZ_ITERATIONS` sets the count (default 20,000 per target; `scripts/fuzz.sh` runs millions).
@Suite struct V2FuzzTests {
    static let key = V2Key(derivedBytes: Array(repeating: 0x5A, count: 32))

    static func bytes(_ generator: inout SeededGenerator, upTo limit: Int) -> [UInt8] {
        let length = Int(generator.next() % UInt64(limit + 1))
        return (0..<length).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
    }

    /// A frame of a known type (mostly) with a payload of a plausible (mostly) length.
    static func frame(_ generator: inout SeededGenerator) -> V2Frame {
        let types: [UInt8] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x00, 0x7F, 0xFF]
        let lengths = [0, 1, 4, 32, 33, 56, 64, 88, 200, 1024]
        let type = types[Int(generator.next() % UInt64(types.count))]
        var length = lengths[Int(generator.next() % UInt64(lengths.count))]
        if generator.next() % 4 == 0 { length = Int(generator.next() % 1025) }
        let payload = (0..<length).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        return V2Frame(type: type, payload: ByteBuffer(bytes: payload))
    }

    @Test func frameReaderNeverCrashesAndKeepsStreamsInSync() throws {
        var generator = SeededGenerator(state: 0x5EED_0001)
        for _ in 0..<ParserFuzzTests.iterations {
            // A valid stream of frames, fed in random chunks, must come out frame for frame.
            let frames = (0..<Int(1 + generator.next() % 4)).map { _ in Self.frame(&generator) }
            var stream = ByteBuffer()
            for frame in frames { frame.write(to: &stream) }
            var pending = ByteBuffer()
            var decoded: [V2Frame] = []
            while stream.readableBytes > 0 || pending.readableBytes > 0 {
                let take = min(stream.readableBytes, Int(1 + generator.next() % 300))
                if var chunk = stream.readSlice(length: take) { pending.writeBuffer(&chunk) }
                while case .frame(let frame) = try V2Frame.read(from: &pending) { decoded.append(frame) }
                if stream.readableBytes == 0 && pending.readableBytes > 0 {
                    Issue.record("bytes left over after a whole stream")
                    break
                }
            }
            #expect(decoded == frames)

            // Random bytes: either frames, a wait for more, or a refusal; never a crash.
            var noise = ByteBuffer(bytes: Self.bytes(&generator, upTo: 64))
            while noise.readableBytes > 0, case .frame = (try? V2Frame.read(from: &noise)) ?? .needMoreData {}
        }
    }

    @Test func messageDecoderNeverCrashesAndRoundTrips() {
        var generator = SeededGenerator(state: 0x5EED_0002)
        for _ in 0..<ParserFuzzTests.iterations {
            let frame = Self.frame(&generator)
            guard let message = try? V2Message(frame: frame) else { continue }
            switch message {
            case .failure, .unknown:
                // A failure's text is cut and made printable, an unknown frame's payload is ignored: only the
                // type must survive.
                #expect(message.frame.type == frame.type)
            default:
                #expect(message.frame == frame)
            }
        }
    }

    @Test func welcomeParametersNeverCrashAndRoundTrip() throws {
        var generator = SeededGenerator(state: 0x5EED_0003)
        for _ in 0..<ParserFuzzTests.iterations {
            var bytes = Self.bytes(&generator, upTo: 64)
            if generator.next() % 2 == 0, bytes.count >= 2 {
                bytes[0] = UInt8(1 + generator.next() % 2)
                bytes[1] = UInt8(generator.next() % 3)
            }
            var buffer = ByteBuffer(bytes: bytes)
            if let parameters = try? V2SessionParameters.read(from: &buffer) {
                #expect(parameters.bytes == bytes)
            }
        }
    }

    @Test func noRandomInputPassesAnAuthenticationCheck() {
        var generator = SeededGenerator(state: 0x5EED_0004)
        let secret = V2SessionSecret(bytes: Array(repeating: 0x33, count: 32))
        let nonce = Array(repeating: UInt8(0x44), count: 32)
        let transcript = Array(repeating: UInt8(0x55), count: 32)
        for _ in 0..<ParserFuzzTests.iterations {
            let guess = Self.bytes(&generator, upTo: 40)
            #expect(!Self.key.isValidClientProof(guess, transcript: transcript))
            #expect(!Self.key.isValidServerProof(guess, transcript: transcript, parameters: []))
            #expect(!secret.isValidPoolClientProof(guess, nonce: nonce))
            #expect(
                V2PoolOpening.verifyServerMessage(Self.bytes(&generator, upTo: 40), secret: secret, nonce: nonce) == nil
            )
            #expect(V2PoolOpening.splitClientMessage(guess).map { $0.sessionID.count } ?? 16 == 16)
        }
    }

    @Test func handshakeMachinesNeverAuthenticateRandomPeers() {
        var generator = SeededGenerator(state: 0x5EED_0005)
        let nonce = Array(repeating: UInt8(1), count: 32)
        for _ in 0..<ParserFuzzTests.iterations {
            var server = V2ServerHandshakeStateMachine(key: Self.key, serverNonce: nonce, fingerprint: nonce)
            var client = V2ClientHandshakeStateMachine(key: Self.key, clientNonce: nonce, fingerprint: nonce)
            _ = client.started()
            for _ in 0..<Int(1 + generator.next() % 4) {
                var message = (try? V2Message(frame: Self.frame(&generator))) ?? .heartbeat
                // Often a well-formed step of the handshake with a random proof.
                switch generator.next() % 4 {
                case 0: message = .hello(version: 2, nonce: Self.bytes(&generator, upTo: 32))
                case 1:
                    message = .authenticate(proof: (0..<32).map { _ in UInt8(truncatingIfNeeded: generator.next()) })
                case 2: message = .challenge(version: 2, nonce: nonce)
                default: break
                }
                if server.messageReceived(message) == .authenticated {
                    Issue.record("a random peer authenticated at the server with \(message)")
                }
                if case .established = client.messageReceived(message) {
                    Issue.record("a random peer was believed by the client with \(message)")
                }
            }
        }
    }
}
