import Crypto
import Foundation
import NIOCore
import NodePassCore
import Testing

/// Checks the implementation against the test vectors published in docs/PROTOCOL.md.
@Suite struct V2VectorTests {
    /// The `name = value` lines of the ```vectors block of docs/PROTOCOL.md.
    static let vectors: [String: String] = {
        let path = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
            .appendingPathComponent("docs/PROTOCOL.md")
        guard let text = try? String(contentsOf: path, encoding: .utf8),
            let start = text.range(of: "```vectors\n"),
            let end = text.range(of: "\n```", range: start.upperBound..<text.endIndex)
        else { return [:] }
        var result: [String: String] = [:]
        for line in text[start.upperBound..<end.lowerBound].split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            if parts.count == 2 { result[parts[0]] = parts[1] }
        }
        return result
    }()

    static func bytes(_ name: String) throws -> [UInt8] {
        let hex = try #require(Self.vectors[name], "docs/PROTOCOL.md has no vector \(name)")
        var result: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            result.append(try #require(UInt8(hex[index..<next], radix: 16)))
            index = next
        }
        return result
    }

    static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
    }

    @Test func theKeyIsStretchedWithPBKDF2() throws {
        let key = try V2Key(try #require(Self.vectors["key"]))
        #expect(Self.hex(key.derivedBytes) == Self.vectors["K"])
    }

    @Test func handshakeValuesMatch() throws {
        let key = V2Key(derivedBytes: try Self.bytes("K"))
        let transcript = V2Key.transcript(
            clientNonce: try Self.bytes("Nc"),
            serverNonce: try Self.bytes("Ns"),
            fingerprint: try Self.bytes("F")
        )
        #expect(Self.hex(transcript) == Self.vectors["T"])
        #expect(Self.hex(key.clientProof(transcript: transcript)) == Self.vectors["client_proof"])

        let parameters = V2SessionParameters(
            mode: .reverse,
            tls: .inMemory,
            poolPort: 10101,
            heartbeatMilliseconds: 5000,
            sessionID: try Self.bytes("session_id"),
            dataFingerprint: Array(SHA256.hash(data: Array("example data certificate".utf8)))
        )
        #expect(Self.hex(parameters.bytes) == Self.vectors["parameters"])
        #expect(
            Self.hex(key.serverProof(transcript: transcript, parameters: parameters.bytes))
                == Self.vectors["server_proof"]
        )
        #expect(
            Self.hex(key.sessionSecret(transcript: transcript, sessionID: parameters.sessionID).bytes)
                == Self.vectors["S"]
        )
    }

    @Test func forwardPlainParametersMatch() throws {
        let key = V2Key(derivedBytes: try Self.bytes("K"))
        let parameters = V2SessionParameters(
            mode: .forward,
            tls: .plain,
            poolPort: 10101,
            heartbeatMilliseconds: 5000,
            sessionID: try Self.bytes("session_id"),
            dataFingerprint: []
        )
        #expect(Self.hex(parameters.bytes) == Self.vectors["parameters_forward_plain"])
        #expect(
            Self.hex(key.serverProof(transcript: try Self.bytes("T"), parameters: parameters.bytes))
                == Self.vectors["server_proof_forward_plain"]
        )
    }

    @Test func theHandshakeMachinesProduceTheVectors() throws {
        let key = V2Key(derivedBytes: try Self.bytes("K"))
        var server = V2ServerHandshakeStateMachine(
            key: key,
            serverNonce: try Self.bytes("Ns"),
            fingerprint: try Self.bytes("F")
        )
        var client = V2ClientHandshakeStateMachine(
            key: key,
            clientNonce: try Self.bytes("Nc"),
            fingerprint: try Self.bytes("F")
        )
        guard case .send(let challenge) = server.messageReceived(client.started()),
            case .send(.authenticate(let proof)) = client.messageReceived(challenge)
        else {
            Issue.record("handshake did not reach the proof")
            return
        }
        #expect(Self.hex(proof) == Self.vectors["client_proof"])
        #expect(server.messageReceived(.authenticate(proof: proof)) == .authenticated)
        var encoded = ByteBuffer(bytes: try Self.bytes("parameters"))
        let welcome = try #require(server.welcome(parameters: try V2SessionParameters.read(from: &encoded)))
        guard case .welcome(let serverProof, _) = welcome.message else {
            Issue.record("no welcome")
            return
        }
        #expect(Self.hex(serverProof) == Self.vectors["server_proof"])
        #expect(Self.hex(welcome.secret.bytes) == Self.vectors["S"])
    }

    @Test func poolOpeningValuesMatch() throws {
        let secret = V2SessionSecret(bytes: try Self.bytes("S"))
        let nonce = try Self.bytes("Np")
        let clientMessage = V2PoolOpening.clientMessage(
            sessionID: try Self.bytes("session_id"),
            secret: secret,
            nonce: nonce
        )
        #expect(Self.hex(clientMessage) == Self.vectors["pool_client_message"])
        let id = try PoolID(parsing: try #require(Self.vectors["pool_id"]))
        let serverMessage = V2PoolOpening.serverMessage(id: id, secret: secret, nonce: nonce)
        #expect(Self.hex(serverMessage) == Self.vectors["pool_server_message"])
        #expect(V2PoolOpening.verifyServerMessage(serverMessage, secret: secret, nonce: nonce) == id)
        #expect(Self.hex(secret.poolConfirmation(nonce: nonce, id: id)) == Self.vectors["pool_confirmation"])

        let split = try #require(V2PoolOpening.splitClientMessage(clientMessage))
        #expect(secret.isValidPoolClientProof(split.proof, nonce: nonce))
        // The same answer under another nonce (a replay) is refused.
        #expect(!secret.isValidPoolClientProof(split.proof, nonce: Array(repeating: 0, count: 32)))
        var tampered = serverMessage
        tampered[3] ^= 1
        #expect(V2PoolOpening.verifyServerMessage(tampered, secret: secret, nonce: nonce) == nil)
    }
}
