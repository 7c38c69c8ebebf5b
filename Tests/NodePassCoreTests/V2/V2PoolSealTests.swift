import NIOCore
import NodePassCore
import Testing

/// Sealed pool connections (`V2PoolSeal`): the documented vectors, and every way a record is refused.
@Suite struct V2PoolSealTests {
    static func keys() throws -> V2PoolSealKeys {
        V2SessionSecret(bytes: try V2VectorTests.bytes("S"))
            .poolSealKeys(serverNonce: try V2VectorTests.bytes("Np"), clientNonce: try V2VectorTests.bytes("Nk"))
    }

    static func sealed(_ text: String, sequence: UInt64 = 0, key: [UInt8]) throws -> ByteBuffer {
        var sealer = V2RecordSealer(key: key, sequence: sequence)
        var output = ByteBuffer()
        try Array(text.utf8).withUnsafeBytes { try sealer.seal($0, into: &output) }
        return output
    }

    @Test func keysAndRecordsMatchTheVectors() throws {
        let keys = try Self.keys()
        #expect(V2VectorTests.hex(keys.clientToServer) == V2VectorTests.vectors["seal_client_key"])
        #expect(V2VectorTests.hex(keys.serverToClient) == V2VectorTests.vectors["seal_server_key"])
        var sealer = V2RecordSealer(key: keys.serverToClient)
        var output = ByteBuffer()
        try Array("ping".utf8).withUnsafeBytes { try sealer.seal($0, into: &output) }
        try sealer.sealEnd(into: &output)
        #expect(
            V2VectorTests.hex(Array(output.readableBytesView))
                == (V2VectorTests.vectors["sealed_record"] ?? "") + (V2VectorTests.vectors["sealed_end"] ?? "")
        )
        let next = V2PoolSeal.nextKey(after: keys.serverToClient)
        #expect(V2VectorTests.hex(next) == V2VectorTests.vectors["seal_next_key"])
        let late = try Self.sealed("pong", sequence: V2PoolSeal.recordsPerKey, key: keys.serverToClient)
        #expect(V2VectorTests.hex(Array(late.readableBytesView)) == V2VectorTests.vectors["sealed_record_next"])
    }

    @Test func theOpenerReadsTheVectorsAndChangesKeyOnTime() throws {
        let keys = try Self.keys()
        var opener = V2RecordOpener(key: keys.serverToClient)
        var input = ByteBuffer(bytes: try V2VectorTests.bytes("sealed_record") + V2VectorTests.bytes("sealed_end"))
        #expect(try opener.next(from: &input) == .bytes(ByteBuffer(string: "ping")))
        #expect(try opener.next(from: &input) == .end)
        #expect(input.readableBytes == 0)
        // The record after the last of a key's period opens only with the next key.
        var late = V2RecordOpener(key: keys.serverToClient, sequence: V2PoolSeal.recordsPerKey - 1)
        var lastOfPeriod = try Self.sealed("a", sequence: V2PoolSeal.recordsPerKey - 1, key: keys.serverToClient)
        lastOfPeriod.writeBytes(try V2VectorTests.bytes("sealed_record_next"))
        #expect(try late.next(from: &lastOfPeriod) == .bytes(ByteBuffer(string: "a")))
        #expect(try late.next(from: &lastOfPeriod) == .bytes(ByteBuffer(string: "pong")))
    }

    @Test func anIncompleteRecordWaitsForItsBytes() throws {
        let keys = try Self.keys()
        let record = try V2VectorTests.bytes("sealed_record")
        var opener = V2RecordOpener(key: keys.serverToClient)
        for cut in [0, 1, 2, 20, record.count - 1] {
            var part = ByteBuffer(bytes: record[..<cut])
            #expect(try opener.next(from: &part) == nil)
            #expect(part.readableBytes == cut, "an incomplete record is left where it is")
            #expect(V2RecordOpener.missingBytes(in: part) == (cut < 2 ? nil : record.count - cut))
        }
    }

    @Test(arguments: ["a changed bit", "a changed length", "a replayed record", "a skipped record", "a short length"])
    func aRecordThatIsNotTheNextOneIsRefused(_ change: String) throws {
        let keys = try Self.keys()
        var records = try V2VectorTests.bytes("sealed_record") + V2VectorTests.bytes("sealed_end")
        var opener = V2RecordOpener(key: keys.serverToClient)
        switch change {
        case "a changed bit": records[20] ^= 1
        case "a changed length": records[1] = 0x1f
        case "a replayed record":
            var first = ByteBuffer(bytes: records)
            _ = try opener.next(from: &first)
            records = try V2VectorTests.bytes("sealed_record")
        case "a skipped record": records = try V2VectorTests.bytes("sealed_end")
        default: records = [0, 27] + [UInt8](repeating: 0, count: 27)
        }
        var input = ByteBuffer(bytes: records)
        #expect(throws: NodePassError.self) { try opener.next(from: &input) }
    }

    @Test func largePlaintextsAreCutIntoRecordsThatOpenInOrder() throws {
        let keys = try Self.keys()
        let plaintext = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var sealer = V2RecordSealer(key: keys.clientToServer)
        var output = ByteBuffer()
        try plaintext.withUnsafeBytes { try sealer.seal($0, into: &output) }
        #expect(sealer.sequence == 4, "200,000 bytes take four records of at most 65,507")
        var opener = V2RecordOpener(key: keys.clientToServer)
        var opened: [UInt8] = []
        while case .bytes(let bytes)? = try opener.next(from: &output) { opened += bytes.readableBytesView }
        #expect(opened == plaintext)
    }

    @Test func sealedParametersComeOnlyWithNodepass22() throws {
        let parameters = V2SessionParameters(
            mode: .reverse,
            tls: .sealed,
            poolPort: 10101,
            heartbeatMilliseconds: 5000,
            sessionID: try V2VectorTests.bytes("session_id"),
            dataFingerprint: [],
            transports: [.tcp, .udp]
        )
        #expect(V2VectorTests.hex(parameters.bytes) == V2VectorTests.vectors["parameters_sealed"])
        let key = V2Key(derivedBytes: try V2VectorTests.bytes("K"))
        #expect(
            V2VectorTests.hex(key.serverProof(transcript: try V2VectorTests.bytes("T"), parameters: parameters.bytes))
                == V2VectorTests.vectors["server_proof_sealed"]
        )
        var accepted = ByteBuffer(bytes: parameters.bytes)
        #expect(try V2SessionParameters.read(from: &accepted, withTransports: true, allowsSealed: true) == parameters)
        var refused = ByteBuffer(bytes: parameters.bytes)
        #expect(throws: NodePassError.self) { try V2SessionParameters.read(from: &refused, withTransports: true) }
    }

    @Test func aSealedSessionsClientMessageCarriesItsNonce() throws {
        let secret = V2SessionSecret(bytes: try V2VectorTests.bytes("S"))
        let message =
            V2PoolOpening.clientMessage(
                sessionID: try V2VectorTests.bytes("session_id"),
                secret: secret,
                nonce: try V2VectorTests.bytes("Np")
            ) + (try V2VectorTests.bytes("Nk"))
        #expect(V2VectorTests.hex(message) == V2VectorTests.vectors["pool_client_message_sealed"])
    }
}
