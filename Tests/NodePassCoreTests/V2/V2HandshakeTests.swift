import NIOCore
import NodePassCore
import Testing

/// Drives a client and a server handshake machine back to back, as the two control handlers do.
private struct Pair {
    var client: V2ClientHandshakeStateMachine
    var server: V2ServerHandshakeStateMachine

    init(
        clientKey: V2Key,
        serverKey: V2Key,
        clientSees: [UInt8] = Pair.fingerprint,
        serverHas: [UInt8] = Pair.fingerprint
    ) {
        self.client = V2ClientHandshakeStateMachine(key: clientKey, clientNonce: Pair.bytes(1), fingerprint: clientSees)
        self.server = V2ServerHandshakeStateMachine(key: serverKey, serverNonce: Pair.bytes(2), fingerprint: serverHas)
    }

    static let fingerprint = Pair.bytes(9)
    static let parameters = V2SessionParameters(
        mode: .reverse,
        tls: .inMemory,
        poolPort: 4000,
        heartbeatMilliseconds: 5000,
        sessionID: Array(repeating: 7, count: 16),
        dataFingerprint: Pair.bytes(8)
    )

    static func bytes(_ value: UInt8) -> [UInt8] { Array(repeating: value, count: 32) }
}

@Suite struct V2HandshakeTests {
    static let key = V2Key(derivedBytes: Array(repeating: 0x11, count: 32))
    static let otherKey = V2Key(derivedBytes: Array(repeating: 0x22, count: 32))

    @Test func matchingKeysEstablishTheSameSessionSecret() throws {
        var pair = Pair(clientKey: Self.key, serverKey: Self.key)
        let hello = pair.client.started()
        guard case .send(let challenge) = pair.server.messageReceived(hello) else {
            Issue.record("no challenge")
            return
        }
        guard case .send(let proof) = pair.client.messageReceived(challenge) else {
            Issue.record("no proof")
            return
        }
        #expect(pair.server.messageReceived(proof) == .authenticated)
        let welcome = try #require(pair.server.welcome(parameters: Pair.parameters))
        guard case .established(let parameters, let clientSecret) = pair.client.messageReceived(welcome.message) else {
            Issue.record("client did not accept the welcome")
            return
        }
        #expect(parameters == Pair.parameters)
        #expect(clientSecret.bytes == welcome.secret.bytes)
    }

    @Test func wrongKeyFailsAtTheServerWithAFailureMessage() {
        var pair = Pair(clientKey: Self.otherKey, serverKey: Self.key)
        guard case .send(let challenge) = pair.server.messageReceived(pair.client.started()),
            case .send(let proof) = pair.client.messageReceived(challenge)
        else {
            Issue.record("handshake did not reach the proof")
            return
        }
        guard case .fail(let reply, let error) = pair.server.messageReceived(proof) else {
            Issue.record("server accepted a wrong key")
            return
        }
        #expect(error.code == .authenticationFailed)
        guard case .failure(.authenticationFailed, _)? = reply else {
            Issue.record("no failure message")
            return
        }
        #expect(pair.server.welcome(parameters: Pair.parameters) == nil)
    }

    @Test func serverWithoutTheKeyCannotForgeAWelcome() throws {
        var pair = Pair(clientKey: Self.key, serverKey: Self.otherKey)
        let impostor = V2ServerHandshakeStateMachine(
            key: Self.otherKey,
            serverNonce: Pair.bytes(2),
            fingerprint: Pair.fingerprint
        )
        guard case .send(let challenge) = pair.server.messageReceived(pair.client.started()) else { return }
        _ = pair.client.messageReceived(challenge)
        // The impostor accepts anything and signs its welcome with its own key.
        var forged = impostor
        _ = forged.messageReceived(.hello(version: 2, nonce: Pair.bytes(1)))
        _ = forged.messageReceived(
            .authenticate(
                proof: Self.otherKey.clientProof(
                    transcript: V2Key.transcript(
                        clientNonce: Pair.bytes(1),
                        serverNonce: Pair.bytes(2),
                        fingerprint: Pair.fingerprint
                    )
                )
            )
        )
        let welcome = try #require(forged.welcome(parameters: Pair.parameters))
        guard case .fail(_, let error) = pair.client.messageReceived(welcome.message) else {
            Issue.record("client believed a forged welcome")
            return
        }
        #expect(error.code == .authenticationFailed)
    }

    @Test func manInTheMiddleWithItsOwnCertificateFailsOnBothSides() {
        // The client sees the proxy's certificate; the server knows its own.
        var pair = Pair(
            clientKey: Self.key,
            serverKey: Self.key,
            clientSees: Pair.bytes(0xAA),
            serverHas: Pair.fingerprint
        )
        guard case .send(let challenge) = pair.server.messageReceived(pair.client.started()),
            case .send(let proof) = pair.client.messageReceived(challenge)
        else {
            Issue.record("handshake did not reach the proof")
            return
        }
        guard case .fail(_, let serverError) = pair.server.messageReceived(proof) else {
            Issue.record("server accepted a proof bound to another certificate")
            return
        }
        #expect(serverError.code == .authenticationFailed)

        // And a welcome the real server would send (bound to its own certificate) fails at the client.
        var honest = V2ServerHandshakeStateMachine(
            key: Self.key,
            serverNonce: Pair.bytes(2),
            fingerprint: Pair.fingerprint
        )
        _ = honest.messageReceived(.hello(version: 2, nonce: Pair.bytes(1)))
        let transcript = V2Key.transcript(
            clientNonce: Pair.bytes(1),
            serverNonce: Pair.bytes(2),
            fingerprint: Pair.fingerprint
        )
        #expect(
            honest.messageReceived(.authenticate(proof: Self.key.clientProof(transcript: transcript))) == .authenticated
        )
        guard let welcome = honest.welcome(parameters: Pair.parameters),
            case .fail(_, let clientError) = pair.client.messageReceived(welcome.message)
        else {
            Issue.record("client accepted a welcome bound to another certificate")
            return
        }
        #expect(clientError.code == .authenticationFailed)
    }

    @Test func aRecordedProofIsRefusedUnderAFreshServerNonce() {
        var first = Pair(clientKey: Self.key, serverKey: Self.key)
        guard case .send(let challenge) = first.server.messageReceived(first.client.started()),
            case .send(let recordedProof) = first.client.messageReceived(challenge)
        else {
            Issue.record("handshake did not reach the proof")
            return
        }
        #expect(first.server.messageReceived(recordedProof) == .authenticated)

        var replayed = V2ServerHandshakeStateMachine(
            key: Self.key,
            serverNonce: Pair.bytes(3),
            fingerprint: Pair.fingerprint
        )
        _ = replayed.messageReceived(.hello(version: 2, nonce: Pair.bytes(1)))
        guard case .fail(_, let error) = replayed.messageReceived(recordedProof) else {
            Issue.record("a replayed proof was accepted")
            return
        }
        #expect(error.code == .authenticationFailed)
    }

    @Test func otherVersionsAndOutOfOrderMessagesFail() {
        var server = V2ServerHandshakeStateMachine(
            key: Self.key,
            serverNonce: Pair.bytes(2),
            fingerprint: Pair.fingerprint
        )
        guard case .fail(_, let error) = server.messageReceived(.hello(version: 3, nonce: Pair.bytes(1))) else {
            Issue.record("version 3 accepted")
            return
        }
        #expect(error.code == .versionMismatch)

        var early = V2ServerHandshakeStateMachine(
            key: Self.key,
            serverNonce: Pair.bytes(2),
            fingerprint: Pair.fingerprint
        )
        guard case .fail(_, let earlyError) = early.messageReceived(.authenticate(proof: Pair.bytes(0))) else {
            Issue.record("proof before hello accepted")
            return
        }
        #expect(earlyError.code == .protocolViolation)

        var client = V2ClientHandshakeStateMachine(
            key: Self.key,
            clientNonce: Pair.bytes(1),
            fingerprint: Pair.fingerprint
        )
        _ = client.started()
        guard case .fail(_, let clientError) = client.messageReceived(.launch(PoolID(1))) else {
            Issue.record("launch during the handshake accepted")
            return
        }
        #expect(clientError.code == .protocolViolation)
    }

    /// A refusal says what to change on this side where the reason tells it, else quotes the server.
    @Test(arguments: [
        (V2FailureReason.noKey, NodePassError.Code.versionMismatch, "give the server the same key as this client"),
        (.authenticationFailed, .authenticationFailed, "give both sides the same key"),
        (.unsupportedVersion, .versionMismatch, "(the server's words): run the same version on both sides"),
        (.other, .protocolViolation, "refused this client (the server's words)"),
    ])
    func aServerRefusalSaysWhatToChange(reason: V2FailureReason, code: NodePassError.Code, words: String) {
        var client = V2ClientHandshakeStateMachine(
            key: Self.key,
            clientNonce: Pair.bytes(1),
            fingerprint: Pair.fingerprint
        )
        _ = client.started()
        guard case .fail(nil, let error) = client.messageReceived(.failure(reason, text: "the server's words")) else {
            Issue.record("failure not reported")
            return
        }
        #expect(error.code == code)
        #expect(error.message.contains(words))
    }
}
