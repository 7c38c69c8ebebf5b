import NIOCore

/// The client side of the v2 control handshake, inside TLS:
/// `hello`, then `challenge` → `authenticate`, then `welcome` (checked before it is believed).
///
/// Pure: the nonce and the fingerprint of the certificate the server presented come in from outside.
public struct V2ClientHandshakeStateMachine: Sendable {
    /// Where the handshake is.
    public enum State: Sendable {
        /// `hello` not sent yet.
        case idle
        /// `hello` sent; waiting for the server's `challenge`.
        case awaitingChallenge
        /// Proof sent; waiting for the server's `welcome`.
        case awaitingWelcome(transcript: [UInt8])
        /// The server proved the key and named the session's parameters.
        case established
        /// The handshake failed; the connection must close.
        case failed
    }

    /// What the caller must do after an event.
    public enum Action: Sendable {
        /// Send this message and wait for the next one.
        case send(V2Message)
        /// The server proved the key: run the session with these parameters and secret.
        case established(V2SessionParameters, V2SessionSecret)
        /// Send this failure message (if any), log `error`, and close.
        case fail(V2Message?, NodePassError)
    }

    /// The current state.
    public private(set) var state: State = .idle
    private let key: V2Key
    private let clientNonce: [UInt8]
    private let fingerprint: [UInt8]
    /// `nodepass/2.1` was negotiated: the welcome's parameters end with what the tunnel carries.
    private let withTransports: Bool
    /// `nodepass/2.2` was negotiated: the server may seal the pool connections.
    private let allowsSealed: Bool
    /// `nodepass/2.3` was negotiated: the server may make relays resumable.
    private let allowsResume: Bool

    /// Makes a machine with the client's fresh nonce and the fingerprint of the server's certificate;
    /// `withTransports` under `nodepass/2.1` and later, `allowsSealed` under `nodepass/2.2` and later,
    /// `allowsResume` under `nodepass/2.3`.
    public init(
        key: V2Key,
        clientNonce: [UInt8],
        fingerprint: [UInt8],
        withTransports: Bool = false,
        allowsSealed: Bool = false,
        allowsResume: Bool = false
    ) {
        self.key = key
        self.clientNonce = clientNonce
        self.fingerprint = fingerprint
        self.withTransports = withTransports
        self.allowsSealed = allowsSealed
        self.allowsResume = allowsResume
    }

    /// TLS is up: the first message to send.
    public mutating func started() -> V2Message {
        self.state = .awaitingChallenge
        return .hello(version: V2Message.version, nonce: self.clientNonce)
    }

    /// A message arrived from the server.
    public mutating func messageReceived(_ message: V2Message) -> Action {
        switch (self.state, message) {
        case (.awaitingChallenge, .challenge(let version, let nonce)):
            guard version == V2Message.version else {
                self.state = .failed
                return .fail(
                    .failure(.unsupportedVersion, text: "this client speaks protocol version \(V2Message.version)"),
                    NodePassError(.versionMismatch, "the server speaks protocol version \(version)")
                )
            }
            let transcript = V2Key.transcript(
                clientNonce: self.clientNonce,
                serverNonce: nonce,
                fingerprint: self.fingerprint
            )
            self.state = .awaitingWelcome(transcript: transcript)
            return .send(.authenticate(proof: self.key.clientProof(transcript: transcript)))
        case (.awaitingWelcome(let transcript), .welcome(let proof, let encoded)):
            guard self.key.isValidServerProof(proof, transcript: transcript, parameters: encoded) else {
                self.state = .failed
                return .fail(
                    .failure(.authenticationFailed, text: "authentication failed: the server's proof does not match"),
                    NodePassError(
                        .authenticationFailed,
                        """
                        the server did not prove the key: give both sides the same key (if they have it, something \
                        between them is not the server)
                        """
                    )
                )
            }
            var buffer = ByteBuffer(bytes: encoded)
            do {
                let parameters = try V2SessionParameters.read(
                    from: &buffer,
                    withTransports: self.withTransports,
                    allowsSealed: self.allowsSealed,
                    allowsResume: self.allowsResume
                )
                self.state = .established
                return .established(parameters, self.key.sessionSecret(transcript: transcript, parameters: parameters))
            } catch {
                self.state = .failed
                return .fail(.failure(.protocolViolation, text: "bad welcome"), error)
            }
        case (_, .failure(let reason, let text)):
            self.state = .failed
            return .fail(nil, Self.refusal(reason, text: text))
        default:
            self.state = .failed
            return .fail(
                .failure(.protocolViolation, text: "unexpected message"),
                NodePassError(.protocolViolation, "unexpected message \(message.frame.type) during the handshake")
            )
        }
    }

    /// The server's refusal, said with what to change on this side; the server's own words (at most a short
    /// printable line) are kept where the reason says too little.
    static func refusal(_ reason: V2FailureReason, text: String) -> NodePassError {
        switch reason {
        case .authenticationFailed:
            NodePassError(
                .authenticationFailed,
                """
                the server did not accept this client's proof of the key: give both sides the same key (if they \
                have it, something between them is not the server)
                """
            )
        case .noKey:
            NodePassError(
                .versionMismatch,
                "the server has no key (protocol v1): give the server the same key as this client"
            )
        case .unsupportedVersion:
            NodePassError(
                .versionMismatch,
                "the server does not speak this client's protocol version (\(text)): run the same version on both sides"
            )
        case .tooManyClients:
            NodePassError(.protocolViolation, "the server refused this client: it serves as many clients as it accepts")
        case .protocolViolation, .other:
            NodePassError(.protocolViolation, "the server refused this client (\(text))")
        }
    }
}
