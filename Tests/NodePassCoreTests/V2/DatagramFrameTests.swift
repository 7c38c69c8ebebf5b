import NIOCore
import Testing

@testable import NodePassCore

@Suite struct DatagramFrameTests {
    private func bytes(_ frame: DatagramFrame) -> [UInt8] {
        var buffer = ByteBuffer()
        frame.write(to: &buffer)
        return Array(buffer.readableBytesView)
    }

    @Test func framesMatchTheDocumentedVectors() throws {
        let datagram = DatagramFrame.datagram(flow: 1, payload: ByteBuffer(string: "pong"))
        #expect(V2VectorTests.hex(self.bytes(datagram)) == V2VectorTests.vectors["datagram_frame"])
        #expect(V2VectorTests.hex(self.bytes(.end(flow: 42))) == V2VectorTests.vectors["end_frame"])
        var buffer = ByteBuffer(bytes: try V2VectorTests.bytes("datagram_frame"))
        #expect(try DatagramFrame.read(from: &buffer) == datagram)
    }

    @Test(arguments: [0, 1, 512, 1200, 1472, 8192, 65_507, DatagramFrame.maximumPayload])
    func everySizeRoundTripsAloneWhateverTheSplit(size: Int) throws {
        let payload = ByteBuffer(bytes: (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        var stream = ByteBuffer()
        DatagramFrame.datagram(flow: 7, payload: payload).write(to: &stream)
        DatagramFrame.end(flow: 7).write(to: &stream)
        // Fed one slice at a time (a cut inside the header and inside the payload): nothing is read early.
        let whole = Array(stream.readableBytesView)
        var fed = ByteBuffer()
        var frames: [DatagramFrame] = []
        for cut in stride(from: 0, to: whole.count, by: max(1, whole.count / 5)) {
            fed.writeBytes(whole[cut..<min(whole.count, cut + max(1, whole.count / 5))])
            while let frame = try DatagramFrame.read(from: &fed) { frames.append(frame) }
        }
        #expect(frames == [.datagram(flow: 7, payload: payload), .end(flow: 7)])
        #expect(fed.readableBytes == 0)
    }

    @Test func anIncompleteFrameConsumesNothing() throws {
        var buffer = ByteBuffer(bytes: [0x01, 0, 0, 0, 1, 0, 4, 0x70, 0x6f])
        #expect(try DatagramFrame.read(from: &buffer) == nil)
        #expect(buffer.readableBytes == 9)
    }

    @Test(arguments: [
        [UInt8]([0x03, 0, 0, 0, 1, 0, 0]),  // unknown kind
        [0x01, 0, 0, 0, 1, 0xff, 0xf8],  // 65,528 bytes: one more than the largest datagram
        [0x02, 0, 0, 0, 1, 0, 1, 0x00],  // an end with a payload
    ])
    func aBrokenHeaderIsAViolationAtOnce(header: [UInt8]) {
        var buffer = ByteBuffer(bytes: header)
        #expect(throws: NodePassError.self) { try DatagramFrame.read(from: &buffer) }
    }

    @Test func parametersCarryTheTransportsOnlyUnderNodepass21() throws {
        var parameters = V2SessionParameters(
            mode: .forward,
            tls: .plain,
            poolPort: 10101,
            heartbeatMilliseconds: 5000,
            sessionID: try V2VectorTests.bytes("session_id"),
            dataFingerprint: [],
            transports: [.tcp, .udp]
        )
        #expect(V2VectorTests.hex(parameters.bytes) == V2VectorTests.vectors["parameters_forward_plain_udp"])
        let key = V2Key(derivedBytes: try V2VectorTests.bytes("K"))
        #expect(
            V2VectorTests.hex(key.serverProof(transcript: try V2VectorTests.bytes("T"), parameters: parameters.bytes))
                == V2VectorTests.vectors["server_proof_forward_plain_udp"]
        )
        var buffer = ByteBuffer(bytes: parameters.bytes)
        #expect(try V2SessionParameters.read(from: &buffer, withTransports: true) == parameters)
        // Read as nodepass/2, the extra byte is refused; nodepass/2 parameters lack it under 2.1.
        buffer = ByteBuffer(bytes: parameters.bytes)
        #expect(throws: NodePassError.self) { try V2SessionParameters.read(from: &buffer) }
        parameters.transports = nil
        buffer = ByteBuffer(bytes: parameters.bytes)
        #expect(throws: NodePassError.self) { try V2SessionParameters.read(from: &buffer, withTransports: true) }
        for bad: UInt8 in [0, 4, 0xff] {
            buffer = ByteBuffer(bytes: parameters.bytes + [bad])
            #expect(throws: NodePassError.self) { try V2SessionParameters.read(from: &buffer, withTransports: true) }
        }
    }
}
