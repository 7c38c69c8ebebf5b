import NIOCore
import NodePassCore
import Testing

/// The client and server control machines, v1 and v2, driven back to back with a clock advanced by hand.
@Suite struct ControlStateMachinesBackToBackTests {
    static let key = V2Key(derivedBytes: Array(repeating: 0x11, count: 32))
    static let fingerprint = Array(repeating: UInt8(9), count: 32)
    static let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    static func parameters(mode: TunnelMode) -> V2SessionParameters {
        V2SessionParameters(
            mode: mode,
            tls: .plain,
            poolPort: 4000,
            heartbeatMilliseconds: 1000,
            sessionID: Array(repeating: 7, count: 16),
            dataFingerprint: []
        )
    }

    /// Runs the v2 handshake to the end; returns the client's `established` parameters.
    private func establish(
        _ client: inout ClientControlStateMachine,
        _ server: inout ServerControlStateMachine,
        mode: TunnelMode = .reverse
    ) -> V2SessionParameters? {
        #expect(self.isNone(server.tlsHandshakeCompleted(alpn: V2Message.alpn, nonce: Array(repeating: 2, count: 32))))
        let hello = client.tlsHandshakeCompleted(
            alpn: V2Message.alpn,
            fingerprint: Self.fingerprint,
            nonce: Array(repeating: 1, count: 32),
            now: Self.start
        )
        guard case .send(let helloMessage) = hello,
            case .send(let challenge) = server.messageReceived(helloMessage, now: Self.start),
            case .send(let proof) = client.messageReceived(challenge, now: Self.start),
            case .registerSession = server.messageReceived(proof, now: Self.start),
            let welcome = server.welcome(parameters: Self.parameters(mode: mode))
        else {
            Issue.record("the handshake did not reach the welcome")
            return nil
        }
        server.sessionRegistered(now: Self.start)
        guard case .established(let parameters, _) = client.messageReceived(welcome.message, now: Self.start) else {
            Issue.record("the client did not accept the welcome")
            return nil
        }
        return parameters
    }

    private func isNone(_ action: ServerControlStateMachine.Action) -> Bool {
        if case .none = action { return true }
        return false
    }

    @Test func v2EstablishesThenCarriesLaunchesAndHeartbeats() {
        var client = ClientControlStateMachine(version: .v2(key: Self.key))
        var server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        let parameters = self.establish(&client, &server, mode: .forward)
        #expect(parameters?.poolPort == 4000 && server.isEstablished)
        // Forward mode: the client launches, the server dials; a launch from the server is ignored.
        guard case .launch(let id) = server.messageReceived(.launch(PoolID(5)), now: Self.start + .seconds(1)) else {
            Issue.record("the server passes the client's launch on")
            return
        }
        #expect(id == PoolID(5))
        guard case .ignoreLaunch(_, .forwardMode) = client.messageReceived(.launch(PoolID(6)), now: Self.start) else {
            Issue.record("a forward-mode client ignores the server's launches")
            return
        }
        guard case .sendHeartbeat = client.heartbeatDue(now: Self.start + .seconds(2)) else {
            Issue.record("a live session sends heartbeats")
            return
        }
        // The server heard the client at +1 s: silent past +4 s it is dead.
        guard case .sendHeartbeat = server.heartbeatDue(now: Self.start + .seconds(4)) else {
            Issue.record("three periods are allowed")
            return
        }
        guard case .close(.silent(let silence)) = server.heartbeatDue(now: Self.start + .milliseconds(4001)) else {
            Issue.record("a silent client is dead")
            return
        }
        #expect(silence == .seconds(3))
        // `.close` ended the session; the channel's end reports nothing more.
        #expect(server.channelClosed() == .none)
    }

    @Test func v2ReverseModeClientRelaysLaunchesAndEndsOnAFailure() {
        var client = ClientControlStateMachine(version: .v2(key: Self.key))
        var server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        _ = self.establish(&client, &server)
        guard case .launch(PoolID(3)) = client.messageReceived(.launch(PoolID(3)), now: Self.start) else {
            Issue.record("a reverse-mode client relays launches")
            return
        }
        guard
            case .close(.peerGaveUp(.other, text: "bye")) = server.messageReceived(
                .failure(.other, text: "bye"),
                now: Self.start
            )
        else {
            Issue.record("a failure from the client ends the session")
            return
        }
        #expect(server.channelClosed() == .none)
    }

    @Test func aWrongKeyIsRefusedAndEndsOnlyTheHandshake() {
        var client = ClientControlStateMachine(
            version: .v2(key: V2Key(derivedBytes: Array(repeating: 0x22, count: 32)))
        )
        var server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        _ = server.tlsHandshakeCompleted(alpn: V2Message.alpn, nonce: Array(repeating: 2, count: 32))
        guard
            case .send(let hello) = client.tlsHandshakeCompleted(
                alpn: V2Message.alpn,
                fingerprint: Self.fingerprint,
                nonce: [1],
                now: Self.start
            ),
            case .send(let challenge) = server.messageReceived(hello, now: Self.start),
            case .send(let proof) = client.messageReceived(challenge, now: Self.start),
            case .refuse(let failure?, let error) = server.messageReceived(proof, now: Self.start),
            case .fail(_, let clientError) = client.messageReceived(failure, now: Self.start)
        else {
            Issue.record("a wrong key is refused on both sides")
            return
        }
        #expect(error.code == .authenticationFailed && clientError.code == .authenticationFailed)
        #expect(server.channelClosed() == .none, "the refusal already ended the handshake")
    }

    @Test func aTooBusyServerRefusesTheSession() {
        var client = ClientControlStateMachine(version: .v2(key: Self.key))
        var server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        _ = server.tlsHandshakeCompleted(alpn: V2Message.alpn, nonce: Array(repeating: 2, count: 32))
        guard
            case .send(let hello) = client.tlsHandshakeCompleted(
                alpn: V2Message.alpn,
                fingerprint: Self.fingerprint,
                nonce: [1],
                now: Self.start
            ),
            case .send(let challenge) = server.messageReceived(hello, now: Self.start),
            case .send(let proof) = client.messageReceived(challenge, now: Self.start),
            case .registerSession = server.messageReceived(proof, now: Self.start),
            case .refuseAtCapacity(.failure(.tooManyClients, _)) = server.sessionRefused()
        else {
            Issue.record("a refused registration refuses the client")
            return
        }
        #expect(!server.isEstablished && server.channelClosed() == .none)
    }

    @Test func versionMismatchesFailAtOnceOnTheSideThatKnows() {
        // A v1 client (no ALPN) at a v2 server.
        var v2Server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        guard case .refuse(nil, let error) = v2Server.tlsHandshakeCompleted(alpn: nil, nonce: []) else {
            Issue.record("a v2 server refuses a client without a key")
            return
        }
        #expect(error.code == .versionMismatch)
        // A v2 client at a v1 server of this implementation: refused with v2's own failure.
        var v1Server = ServerControlStateMachine(version: .v1(poolPort: 4000), heartbeatInterval: .seconds(1))
        guard
            case .refuseV2Client(.failure(.noKey, _)) = v1Server.tlsHandshakeCompleted(alpn: V2Message.alpn, nonce: [])
        else {
            Issue.record("a v1 server refuses a client with a key")
            return
        }
        #expect(v1Server.channelClosed() == .none)
        // A v2 client at a server that negotiated no `nodepass/2` (another v1 implementation).
        var client = ClientControlStateMachine(version: .v2(key: Self.key))
        guard
            case .fail(nil, let clientError) = client.tlsHandshakeCompleted(
                alpn: nil,
                fingerprint: Self.fingerprint,
                nonce: [],
                now: Self.start
            )
        else {
            Issue.record("a v2 client stops at a v1 server")
            return
        }
        #expect(clientError.code == .versionMismatch)
        var noCertificate = ClientControlStateMachine(version: .v2(key: Self.key))
        guard
            case .fail(nil, let tlsError) = noCertificate.tlsHandshakeCompleted(
                alpn: V2Message.alpn,
                fingerprint: nil,
                nonce: [],
                now: Self.start
            )
        else {
            Issue.record("a v2 client needs the server's certificate")
            return
        }
        #expect(tlsError.code == .tls)
    }

    @Test func v1AnnouncesThePoolPortAndTheClientFollowsIt() {
        var server = ServerControlStateMachine(version: .v1(poolPort: 4000), heartbeatInterval: .seconds(1))
        var client = ClientControlStateMachine(version: .v1(reportInterval: .seconds(1)))
        guard case .startV1(poolPort: 4000) = server.tlsHandshakeCompleted(alpn: nil, nonce: []),
            case .connected = client.tlsHandshakeCompleted(alpn: nil, fingerprint: nil, nonce: [], now: Self.start)
        else {
            Issue.record("v1 starts once TLS is up")
            return
        }
        #expect(client.isAwaitingPoolPort)
        guard
            case .ignoreLaunch(PoolID(1), .beforePoolPort) = client.signalReceived(.launch(PoolID(1)), now: Self.start),
            case .startPool(port: 4000, restart: false) = client.signalReceived(.remote(port: 4000), now: Self.start),
            case .sendRemote(poolPort: 4000) = server.heartbeatDue(now: Self.start + .seconds(1)),
            case .none = client.signalReceived(.remote(port: 4000), now: Self.start + .seconds(1)),
            case .startPool(port: 4001, restart: true) = client.signalReceived(
                .remote(port: 4001),
                now: Self.start + .seconds(2)
            ),
            case .launch(PoolID(2)) = client.signalReceived(.launch(PoolID(2)), now: Self.start + .seconds(2))
        else {
            Issue.record("the client follows the announced pool port")
            return
        }
        #expect(!client.isAwaitingPoolPort)
        guard case .none = client.heartbeatDue(now: Self.start + .seconds(5)),
            case .close(.silent(.seconds(3))) = client.heartbeatDue(now: Self.start + .milliseconds(5001))
        else {
            Issue.record("a silent v1 server is dead after three report intervals")
            return
        }
        #expect(server.channelClosed() == .sessionEnded)
    }

    @Test func handshakesThatTakeTooLongAreClosed() {
        var server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        guard case .handshakeTimedOut = server.handshakeTimedOut() else {
            Issue.record("the server closes a slow handshake")
            return
        }
        #expect(server.channelClosed() == .handshakeEnded)
        var client = ClientControlStateMachine(version: .v1(reportInterval: .seconds(1)))
        _ = client.tlsHandshakeCompleted(alpn: nil, fingerprint: nil, nonce: [], now: Self.start)
        guard case .none = client.handshakeTimedOut() else {
            Issue.record("a finished handshake has no deadline")
            return
        }
    }

    @Test func aMalformedMessageIsAProtocolViolation() {
        var server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        _ = server.tlsHandshakeCompleted(alpn: V2Message.alpn, nonce: [])
        guard
            case .refuse(.failure(.protocolViolation, _)?, _) = server.malformedMessageReceived(
                NodePassError(.protocolViolation, "x")
            )
        else {
            Issue.record("the server refuses a malformed message")
            return
        }
        var client = ClientControlStateMachine(version: .v2(key: Self.key))
        guard
            case .fail(.failure(.protocolViolation, _)?, _) = client.malformedMessageReceived(
                NodePassError(.protocolViolation, "x")
            )
        else {
            Issue.record("the client fails on a malformed message")
            return
        }
    }

    @Test func aMalformedMessageAfterTheHandshakeEndsTheSession() {
        var client = ClientControlStateMachine(version: .v2(key: Self.key))
        var server = ServerControlStateMachine(
            version: .v2(key: Self.key, fingerprint: Self.fingerprint),
            heartbeatInterval: .seconds(1)
        )
        guard self.establish(&client, &server) != nil else { return }
        guard
            case .close(.malformedMessage(let why)) = server.malformedMessageReceived(
                NodePassError(.protocolViolation, "a heartbeat carries no payload")
            )
        else {
            Issue.record("an established session ends on a malformed message")
            return
        }
        #expect(why == "a heartbeat carries no payload")
        // `.close` reports the session's end at once; the channel's end reports nothing more.
        #expect(server.channelClosed() == .none)
    }
}
