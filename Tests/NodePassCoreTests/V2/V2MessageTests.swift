import NIOCore
import NodePassCore
import Testing

@Suite struct V2MessageTests {
    static let samples: [V2Message] = [
        .hello(version: 2, nonce: Array(repeating: 1, count: 32)),
        .challenge(version: 2, nonce: Array(repeating: 2, count: 32)),
        .authenticate(proof: Array(repeating: 3, count: 32)),
        .welcome(
            proof: Array(repeating: 4, count: 32),
            parameters: [1, 0, 0x27, 0x75, 0, 0, 0x13, 0x88] + Array(repeating: 5, count: 16)
        ),
        .failure(.authenticationFailed, text: "wrong key"),
        .heartbeat,
        .launch(PoolID(0xdead_beef)),
        .unknown(type: 0x7f),
    ]

    @Test(arguments: Self.samples)
    func everyMessageSurvivesAFrameRoundTrip(message: V2Message) throws {
        var buffer = ByteBuffer()
        message.write(to: &buffer)
        guard case .frame(let frame) = try V2Frame.read(from: &buffer) else {
            Issue.record("no frame")
            return
        }
        #expect(buffer.readableBytes == 0)
        #expect(try V2Message(frame: frame) == message)
    }

    @Test func frameBytesAreTypeLengthPayload() {
        var buffer = ByteBuffer()
        V2Message.launch(PoolID(0x0102_0304)).write(to: &buffer)
        #expect(Array(buffer.readableBytesView) == [0x11, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04])
        buffer.clear()
        V2Message.heartbeat.write(to: &buffer)
        #expect(Array(buffer.readableBytesView) == [0x10, 0x00, 0x00])
    }

    @Test func partialFramesWaitAndConsumeNothing() throws {
        var buffer = ByteBuffer(bytes: [0x11, 0x00, 0x04, 0x01])
        #expect(try V2Frame.read(from: &buffer) == .needMoreData)
        #expect(buffer.readableBytes == 4)
        var header = ByteBuffer(bytes: [0x11])
        #expect(try V2Frame.read(from: &header) == .needMoreData)
    }

    @Test func anOversizedFrameIsRefusedFromItsHeader() {
        var buffer = ByteBuffer(bytes: [0x01, 0x04, 0x01])
        #expect(throws: NodePassError(.protocolViolation, "")) { try V2Frame.read(from: &buffer) }
    }

    @Test(arguments: [
        V2Frame(type: 0x01, payload: ByteBuffer(bytes: [2])),
        V2Frame(type: 0x03, payload: ByteBuffer(bytes: Array(repeating: 0, count: 31))),
        V2Frame(type: 0x04, payload: ByteBuffer(bytes: Array(repeating: 0, count: 32))),
        V2Frame(type: 0x05, payload: ByteBuffer()),
        V2Frame(type: 0x10, payload: ByteBuffer(bytes: [0])),
        V2Frame(type: 0x11, payload: ByteBuffer(bytes: [0, 0, 1])),
    ])
    func malformedPayloadsAreProtocolViolations(frame: V2Frame) {
        #expect(throws: NodePassError(.protocolViolation, "")) { try V2Message(frame: frame) }
    }

    @Test func failureTextIsCutAndMadePrintable() throws {
        let frame = V2Frame(
            type: 0x05,
            payload: ByteBuffer(bytes: [1, 0x41, 0x1b, 0x0a] + Array(repeating: 0x42, count: 500))
        )
        guard case .failure(let reason, let text) = try V2Message(frame: frame) else {
            Issue.record("not a failure")
            return
        }
        #expect(reason == .authenticationFailed)
        #expect(text.hasPrefix("A??B"))
        #expect(text.utf8.count == V2Message.maximumFailureText)
    }

    @Test func sessionParametersRoundTripAndRejectNonsense() throws {
        let parameters = V2SessionParameters(
            mode: .forward,
            tls: .plain,
            poolPort: 65535,
            heartbeatMilliseconds: 1000,
            sessionID: Array(repeating: 9, count: 16),
            dataFingerprint: []
        )
        var buffer = ByteBuffer(bytes: parameters.bytes)
        #expect(parameters.bytes.count == parameters.encodedLength)
        #expect(try V2SessionParameters.read(from: &buffer) == parameters)

        for bad: [UInt8] in [
            [0, 0, 1, 0, 0, 0, 3, 0xe8] + Array(repeating: 0, count: 16),  // mode 0 (auto) is never sent
            [1, 3, 1, 0, 0, 0, 3, 0xe8] + Array(repeating: 0, count: 16),  // tls 3
            [1, 0, 0, 0, 0, 0, 3, 0xe8] + Array(repeating: 0, count: 16),  // port 0
            [1, 0, 1, 0, 0, 0, 0, 1] + Array(repeating: 0, count: 16),  // heartbeat 1 ms
            [1, 1, 1, 0, 0, 0, 3, 0xe8] + Array(repeating: 0, count: 16),  // tls 1 without fingerprint
            [1, 0, 1, 0, 0, 0, 3, 0xe8] + Array(repeating: 0, count: 17),  // trailing byte
        ] {
            var badBuffer = ByteBuffer(bytes: bad)
            #expect(throws: NodePassError(.protocolViolation, "")) { try V2SessionParameters.read(from: &badBuffer) }
        }
    }
}

extension V2Frame: CustomTestStringConvertible {
    public var testDescription: String { "frame type \(self.type), \(self.payload.readableBytes) bytes" }
}
