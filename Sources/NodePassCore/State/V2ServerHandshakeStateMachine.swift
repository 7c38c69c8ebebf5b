/// The server side of the v2 control handshake, inside TLS:
/// `hello` → `challenge`, `authenticate` → `welcome` (or `failure`).
///
/// Pure: the nonce and the certificate fingerprint come in from outside, so tests can use fixed values.
public struct V2ServerHandshakeStateMachine: Sendable {
    /// Where the handshake is.
    public enum State: Sendable {
        /// Waiting for the client's `hello`.
        case awaitingHello
        /// `challenge` sent; waiting for the client's proof.
        case awaitingProof(transcript: [UInt8])
        /// The client proved the key.
        case authenticated(transcript: [UInt8])
        /// The handshake failed; the connection must close.
        case failed
    }

    /// What the caller must do after an event.
    public enum Action: Hashable, Sendable {
        /// Send this message and wait for the next one.
        case send(V2Message)
        /// The client proved the key: register it and send `welcome(parameters:)`.
        case authenticated
        /// Send this failure message (if any), log `error`, and close.
        case fail(V2Message?, NodePassError)
    }

    /// The current state.
    public private(set) var state: State = .awaitingHello
    private let key: V2Key
    private let serverNonce: [UInt8]
    private let fingerprint: [UInt8]

    /// Makes a machine with the server's fresh nonce and its certificate's SHA-256 fingerprint.
    public init(key: V2Key, serverNonce: [UInt8], fingerprint: [UInt8]) {
        self.key = key
        self.serverNonce = serverNonce
        self.fingerprint = fingerprint
    }

    /// A message arrived from the client.
    public mutating func messageReceived(_ message: V2Message) -> Action {
        switch (self.state, message) {
        case (.awaitingHello, .hello(let version, let nonce)):
            guard version == V2Message.version else {
                self.state = .failed
                return .fail(
                    .failure(.unsupportedVersion, text: "this server speaks protocol version \(V2Message.version)"),
                    NodePassError(.versionMismatch, "client asked for protocol version \(version)")
                )
            }
            let transcript = V2Key.transcript(
                clientNonce: nonce,
                serverNonce: self.serverNonce,
                fingerprint: self.fingerprint
            )
            self.state = .awaitingProof(transcript: transcript)
            return .send(.challenge(version: V2Message.version, nonce: self.serverNonce))
        case (.awaitingProof(let transcript), .authenticate(let proof)):
            guard self.key.isValidClientProof(proof, transcript: transcript) else {
                self.state = .failed
                return .fail(
                    .failure(.authenticationFailed, text: "authentication failed: the key does not match"),
                    NodePassError(.authenticationFailed, "the client's proof does not match the key")
                )
            }
            self.state = .authenticated(transcript: transcript)
            return .authenticated
        case (_, .failure(let reason, let text)):
            self.state = .failed
            return .fail(nil, NodePassError(.authenticationFailed, "the client gave up: \(reason) (\(text))"))
        case (.failed, _):
            return .fail(nil, NodePassError(.protocolViolation, "message after a failed handshake"))
        case (.authenticated, _):
            self.state = .failed
            return .fail(nil, NodePassError(.protocolViolation, "handshake message after the handshake"))
        default:
            self.state = .failed
            return .fail(
                .failure(.protocolViolation, text: "unexpected message"),
                NodePassError(.protocolViolation, "unexpected message \(message.frame.type) during the handshake")
            )
        }
    }

    /// The `welcome` message for `parameters` and the session's secret; nil unless authenticated.
    public func welcome(parameters: V2SessionParameters) -> (message: V2Message, secret: V2SessionSecret)? {
        guard case .authenticated(let transcript) = self.state else { return nil }
        let encoded = parameters.bytes
        let proof = self.key.serverProof(transcript: transcript, parameters: encoded)
        return (
            .welcome(proof: proof, parameters: encoded),
            self.key.sessionSecret(transcript: transcript, parameters: parameters)
        )
    }
}
