import NIOCore
import NodePassCore
import Testing

/// Resumable relays (`V2Resume`): the documented vectors, the frame decoder on every cut, the ledger's
/// bookkeeping, and the refusals.
@Suite struct V2ResumeTests {
    static func ticket() throws -> V2ResumeTicket {
        V2ResumeTicket(
            secret: V2SessionSecret(bytes: try V2VectorTests.bytes("S")),
            sessionID: try V2VectorTests.bytes("session_id"),
            nonce: try V2VectorTests.bytes("Np"),
            id: PoolID(0x0bad_cafe)
        )
    }

    @Test func theOpeningTheTicketAndTheExchangeMatchTheVectors() throws {
        let secret = V2SessionSecret(bytes: try V2VectorTests.bytes("S"))
        let message = V2PoolOpening.clientMessage(
            sessionID: try V2VectorTests.bytes("session_id"),
            secret: secret,
            nonce: try V2VectorTests.bytes("Np"),
            resume: true
        )
        #expect(V2VectorTests.hex(message) == V2VectorTests.vectors["pool_resume_message"])
        let ticket = try Self.ticket()
        #expect(V2VectorTests.hex(ticket.key) == V2VectorTests.vectors["resume_key"])
        #expect(ticket.streamID == (try V2VectorTests.bytes("session_id")) + [0x0b, 0xad, 0xca, 0xfe])
        let nonce = try V2VectorTests.bytes("Nr")
        let request = ticket.request(nonce: nonce, count: 0x01_0203_0405)
        #expect(V2VectorTests.hex(request) == V2VectorTests.vectors["resume_request"])
        #expect(ticket.verifyRequest(request, nonce: nonce) == 0x01_0203_0405)
        let reply = ticket.reply(nonce: nonce, count: 0x0a_0b0c)
        #expect(V2VectorTests.hex(reply) == V2VectorTests.vectors["resume_reply"])
        #expect(ticket.verifyReply(reply, nonce: nonce)?.1 == 0x0a_0b0c)
        #expect(ticket.verifyReply(V2ResumeTicket.unknownReply, nonce: nonce)?.0 == .unknown)
    }

    @Test func theResumeProofIsNotAPoolProof() throws {
        let secret = V2SessionSecret(bytes: try V2VectorTests.bytes("S"))
        let nonce = try V2VectorTests.bytes("Np")
        #expect(!secret.isValidPoolClientProof(secret.poolResumeProof(nonce: nonce), nonce: nonce))
        #expect(!secret.isValidPoolResumeProof(secret.poolClientProof(nonce: nonce), nonce: nonce))
        #expect(secret.isValidPoolResumeProof(secret.poolResumeProof(nonce: nonce), nonce: nonce))
    }

    @Test func aRequestIsRefusedOnAnotherConnectionOrForAnotherRelayOrChanged() throws {
        let ticket = try Self.ticket()
        let nonce = try V2VectorTests.bytes("Nr")
        let request = ticket.request(nonce: nonce, count: 7)
        // Replayed on a connection with another nonce.
        #expect(ticket.verifyRequest(request, nonce: [UInt8](repeating: 1, count: 32)) == nil)
        // Another relay's ticket (another pool ID, or the same ID in another opening).
        let other = V2ResumeTicket(
            secret: V2SessionSecret(bytes: try V2VectorTests.bytes("S")),
            sessionID: try V2VectorTests.bytes("session_id"),
            nonce: [UInt8](repeating: 9, count: 32),
            id: PoolID(0x0bad_cafe)
        )
        #expect(other.verifyRequest(request, nonce: nonce) == nil)
        // Every changed byte, and a wrong length.
        for index in request.indices {
            var changed = request
            changed[index] ^= 0x01
            #expect(ticket.verifyRequest(changed, nonce: nonce) == nil, "byte \(index) changed")
        }
        #expect(ticket.verifyRequest(Array(request.dropLast()), nonce: nonce) == nil)
        #expect(V2ResumeTicket.streamID(ofRequest: Array(request.dropLast())) == nil)
        // A changed count in the answer, or an unknown status.
        var reply = ticket.reply(nonce: nonce, count: 3)
        reply[8] ^= 1
        #expect(ticket.verifyReply(reply, nonce: nonce) == nil)
        #expect(ticket.verifyReply([2] + reply.dropFirst(), nonce: nonce) == nil)
    }

    @Test func framesMatchTheVectorsWhereverTheReadsCut() throws {
        let wire = try V2VectorTests.bytes("resume_frames")
        var encoded = ByteBuffer()
        V2Resume.writeDataHeader(length: 4, to: &encoded)
        encoded.writeString("ping")
        V2Resume.writeAck(1_048_577, to: &encoded)
        encoded.writeBytes([V2Resume.endType, V2Resume.abortType])
        #expect(Array(encoded.readableBytesView) == wire)
        for cut in 0...wire.count {
            for secondCut in cut...wire.count {
                var decoder = V2ResumeFrameDecoder()
                var data = ByteBuffer()
                var others: [V2ResumeFrameDecoder.Frame] = []
                for part in [wire[..<cut], wire[cut..<secondCut], wire[secondCut...]] {
                    decoder.feed(ByteBuffer(bytes: part))
                    while let frame = try decoder.next() {
                        if case .data(var bytes) = frame {
                            data.writeBuffer(&bytes)
                        } else {
                            others.append(frame)
                        }
                    }
                }
                #expect(data == ByteBuffer(string: "ping"), "cut at \(cut), \(secondCut)")
                #expect(others == [.ack(1_048_577), .end, .abort], "cut at \(cut), \(secondCut)")
            }
        }
    }

    @Test(arguments: [[0x05], [0x01, 0x00, 0x00], [0x00]])
    func unknownOrEmptyFramesAreViolations(bytes: [UInt8]) {
        var decoder = V2ResumeFrameDecoder()
        decoder.feed(ByteBuffer(bytes: bytes))
        #expect(throws: NodePassError.self) { try decoder.next() }
    }

    @Test func theLedgerKeepsWhatIsNotAcknowledgedAndSendsItAgain() throws {
        var ledger = ResumeLedger()
        ledger.sending(ByteBuffer(string: "hello "))
        ledger.sending(ByteBuffer(string: "world"))
        #expect(ledger.sent == 11 && ledger.keptBytes == 11)
        #expect(try ledger.acknowledged(3) == 3)
        var (again, end) = ledger.unacknowledged
        #expect(again == [ByteBuffer(string: "lo "), ByteBuffer(string: "world")] && !end)
        ledger.sendingEnd()
        #expect(ledger.sent == 12 && !ledger.isComplete)
        #expect(try ledger.acknowledged(11) == 8)
        (again, end) = ledger.unacknowledged
        #expect(again.isEmpty && end, "the end is sent again until acknowledged")
        #expect(try ledger.acknowledged(12) == 0)
        #expect(ledger.keptBytes == 0 && !ledger.unacknowledged.end)
        try ledger.receivedBytes(5)
        #expect(ledger.unacknowledgedReceived == 5)
        #expect(ledger.acknowledgingReceived() == 5)
        try ledger.receivedEnd()
        #expect(ledger.isComplete && ledger.received == 6)
        #expect(throws: NodePassError.self) { try ledger.receivedBytes(1) }
        #expect(throws: NodePassError.self) { try ledger.receivedEnd() }
    }

    @Test func impossibleAcknowledgementsAreViolations() throws {
        var ledger = ResumeLedger()
        ledger.sending(ByteBuffer(string: "abc"))
        #expect(throws: NodePassError.self) { try ledger.acknowledged(4) }
        try ledger.acknowledged(2)
        #expect(throws: NodePassError.self) { try ledger.acknowledged(1) }
        #expect(ledger.keptBytes == 1)
    }

    @Test func parametersCarryTheResumeBitOnlyUnder23() throws {
        var sealed = try V2VectorTests.bytes("parameters_sealed")
        sealed[sealed.count - 1] |= 4
        #expect(V2VectorTests.hex(sealed) == V2VectorTests.vectors["parameters_resume"])
        var buffer = ByteBuffer(bytes: sealed)
        let parameters = try V2SessionParameters.read(
            from: &buffer,
            withTransports: true,
            allowsSealed: true,
            allowsResume: true
        )
        #expect(parameters.resumes && parameters.transports == [.tcp, .udp])
        #expect(parameters.bytes == sealed)
        var older = ByteBuffer(bytes: sealed)
        #expect(throws: NodePassError.self) {
            try V2SessionParameters.read(from: &older, withTransports: true, allowsSealed: true)
        }
        let key = V2Key(derivedBytes: try V2VectorTests.bytes("K"))
        let proof = key.serverProof(transcript: try V2VectorTests.bytes("T"), parameters: sealed)
        #expect(V2VectorTests.hex(proof) == V2VectorTests.vectors["server_proof_resume"])
        #expect(key.sessionSecret(transcript: [], parameters: parameters).resumesRelays)
    }
}

/// Which sessions resume: a server with `resume=1` and a client of `nodepass/2.3`, nothing else.
@Suite struct V2ResumeNegotiationTests {
    @Test(arguments: [
        (true, V2Message.alpnResume, true), (true, V2Message.alpnSealed, false),
        (false, V2Message.alpnResume, false), (true, V2Message.alpnDatagrams, false),
    ])
    func onlyAResumingServerAndA23ClientResume(serverResumes: Bool, alpn: String, resumes: Bool) {
        let key = V2Key(derivedBytes: [UInt8](repeating: 7, count: 32))
        var server = ServerControlStateMachine(
            version: .v2(key: key, fingerprint: [], resume: serverResumes),
            heartbeatInterval: .seconds(1)
        )
        _ = server.tlsHandshakeCompleted(alpn: alpn, nonce: [UInt8](repeating: 1, count: 32))
        #expect(server.resumes == resumes)
        #expect(server.seals == (alpn == V2Message.alpnResume || alpn == V2Message.alpnSealed))
    }
}
