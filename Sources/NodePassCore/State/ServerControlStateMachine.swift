import NIOCore

/// The server end of a control channel, for v1 and v2: which protocol the client offered, the v2 handshake,
/// the heartbeat, and the client's launches (forward mode).
///
/// A server without a key speaks v1: once TLS is up it announces its pool port at once and every heartbeat
/// period, and refuses a client that offers v2 (it has a key) with a v2 `failure`. A server with a key
/// speaks v2: it refuses a client that offers no `nodepass/2`, runs the handshake, then exchanges
/// heartbeats and receives launches. Time and the server's nonce come in from outside, so that tests drive
/// the machine with fixed values.
public struct ServerControlStateMachine: Sendable {
    /// What this server speaks.
    public enum Version: Sendable {
        /// No key: v1, announcing this pool port.
        case v1(poolPort: Int)
        /// A key: v2, bound to the control certificate's SHA-256 fingerprint; `transports` is what the
        /// tunnel carries for clients that negotiate `nodepass/2.1` (the others get TCP only); `resume`: relays
        /// resume for clients that negotiate `nodepass/2.3` (the server's `resume=1`).
        case v2(key: V2Key, fingerprint: [UInt8], transports: TunnelTransports = [.tcp, .udp], resume: Bool = false)
    }

    private enum State: Sendable {
        /// The TLS handshake is running.
        case tls
        /// A v1 client is connected.
        case v1Running(poolPort: Int)
        /// The v2 handshake is running.
        case v2Handshaking(V2ServerHandshakeStateMachine)
        /// The v2 client proved the key; its session is being registered.
        case v2Authenticated(V2ServerHandshakeStateMachine)
        /// The v2 session runs; `monitor` watches the client's heartbeat.
        case v2Established(HeartbeatMonitor)
        /// Closed or closing; a session that had started has been reported ended.
        case closed
    }

    /// What the caller must do after an event.
    public enum Action: Sendable {
        /// Nothing.
        case none
        /// v1: the client is connected: register it (it replaces any other), send `remote://poolPort` now, and
        /// start the heartbeat.
        case startV1(poolPort: Int)
        /// v1: a client that offered v2 (it has a key): log, send this failure, close. The handshake ended.
        case refuseV2Client(V2Message)
        /// v2: send this handshake message.
        case send(V2Message)
        /// v2: the client proved the key: make its session (`welcome(parameters:)`) and register it, then
        /// report `sessionRegistered(now:)` or `sessionRefused()`.
        case registerSession
        /// v2: refuse the client: count and log `error` with the peer's address, send `message` if any, close.
        /// The handshake ended.
        case refuse(V2Message?, NodePassError)
        /// v2: the server serves as many clients as it accepts: count and log that (not as an authentication
        /// failure: the client proved the key), send this failure, close. The handshake ended.
        case refuseAtCapacity(V2Message)
        /// Send `remote://poolPort` (v1 heartbeat).
        case sendRemote(poolPort: Int)
        /// Send a v2 heartbeat.
        case sendHeartbeat
        /// The client launched one of its pool connections (forward mode).
        case launch(PoolID)
        /// The client launched one of its pool connections as a datagram carrier (forward mode, 2.1).
        case launchDatagrams(PoolID)
        /// The session ends: report its end now (from here on its secret opens no pool connection), log why
        /// as an error, and close the channel (`.malformedMessage`: send a `failure` first).
        case close(ControlClosure)
        /// The handshake took too long: log it and close.
        case handshakeTimedOut
        /// Close the channel (after a connection error, already logged).
        case closeQuietly
    }

    /// What the caller must report when the channel closes.
    public enum Ending: Hashable, Sendable {
        /// The client's session ends (unregister it).
        case sessionEnded
        /// The handshake ends without a session (free its slot).
        case handshakeEnded
        /// Already reported.
        case none
    }

    private var state: State = .tls
    private let version: Version
    /// What this client's session carries: set when TLS completes, nil under `nodepass/2` (TCP only).
    public private(set) var transports: TunnelTransports?
    /// The client negotiated `nodepass/2.2` or later: with `tls=1` its pool connections are sealed, not TLS.
    public private(set) var seals = false
    /// The server resumes relays and the client negotiated `nodepass/2.3`.
    public private(set) var resumes = false
    /// The heartbeat period; silence for three of them ends a v2 session.
    public let heartbeatInterval: TimeAmount

    /// Makes the machine of one control channel.
    public init(version: Version, heartbeatInterval: TimeAmount) {
        self.version = version
        self.heartbeatInterval = heartbeatInterval
    }

    /// Whether the client's session has started (v1: connected; v2: registered).
    public var isEstablished: Bool {
        switch self.state {
        case .v1Running, .v2Established: true
        case .tls, .v2Handshaking, .v2Authenticated, .closed: false
        }
    }

    /// The TLS handshake completed; `alpn` is the protocol negotiated, `nonce` a fresh server nonce.
    public mutating func tlsHandshakeCompleted(alpn: String?, nonce: [UInt8]) -> Action {
        guard case .tls = self.state else { return .none }
        let offersV2 = alpn.map(V2Message.alpnNames.contains) ?? false
        switch self.version {
        case .v1(let poolPort):
            guard !offersV2 else {
                self.state = .closed
                return .refuseV2Client(
                    .failure(.noKey, text: "this server has no key (protocol v1): give it the same key")
                )
            }
            self.state = .v1Running(poolPort: poolPort)
            return .startV1(poolPort: poolPort)
        case .v2(let key, let fingerprint, let transports, let resume):
            guard offersV2 else {
                return self.refuse(
                    nil,
                    NodePassError(.versionMismatch, "the client has no key (protocol v1); this server requires one")
                )
            }
            if alpn != V2Message.alpn {
                self.transports = transports
                self.seals = V2Message.seals(alpn)
                self.resumes = resume && alpn == V2Message.alpnResume
            } else if !transports.contains(.tcp) {
                // An older v2 client carries TCP only, which this server does not.
                return self.refuse(
                    .failure(.unsupportedVersion, text: "this server carries UDP only (notcp=1): update the client"),
                    NodePassError(
                        .versionMismatch,
                        "the client carries TCP only (an older version); notcp=1 refuses it"
                    )
                )
            }
            self.state = .v2Handshaking(
                V2ServerHandshakeStateMachine(key: key, serverNonce: nonce, fingerprint: fingerprint)
            )
            return .none
        }
    }

    /// A v2 message arrived (v1 clients send nothing the server reads).
    public mutating func messageReceived(_ message: V2Message, now: NIODeadline) -> Action {
        switch self.state {
        case .tls, .v1Running, .v2Authenticated, .closed:
            return .none
        case .v2Handshaking(var handshake):
            let action = handshake.messageReceived(message)
            self.state = .v2Handshaking(handshake)
            switch action {
            case .send(let reply):
                return .send(reply)
            case .fail(let reply, let error):
                return self.refuse(reply, error)
            case .authenticated:
                self.state = .v2Authenticated(handshake)
                return .registerSession
            }
        case .v2Established(var monitor):
            let meaning = monitor.sessionMessageReceived(message, now: now)
            self.state = .v2Established(monitor)
            switch meaning {
            case .nothing: return .none
            case .launch(let id): return .launch(id)
            case .launchDatagrams(let id):
                // Under `nodepass/2` the frame is unknown, and ignored as any unknown frame.
                guard self.transports?.contains(.udp) == true else { return .none }
                return .launchDatagrams(id)
            case .close(let closure): return self.close(closure)
            }
        }
    }

    /// A frame that is not a valid v2 message arrived: during the handshake a refusal, after it the end of
    /// the session.
    public mutating func malformedMessageReceived(_ error: any Error) -> Action {
        guard self.isEstablished else {
            return self.refuse(.failure(.protocolViolation, text: "malformed message"), error)
        }
        let failure = (error as? NodePassError) ?? NodePassError(.protocolViolation, "\(error)")
        return self.close(.malformedMessage(failure.message))
    }

    /// The `welcome` for `parameters` and the session's secret, once the client proved the key.
    public func welcome(parameters: V2SessionParameters) -> (message: V2Message, secret: V2SessionSecret)? {
        guard case .v2Authenticated(let handshake) = self.state else { return nil }
        var parameters = parameters
        parameters.transports = self.transports
        parameters.resumes = self.resumes
        if self.seals && parameters.tls == .inMemory {
            (parameters.tls, parameters.dataFingerprint) = (.sealed, [])
        }
        return handshake.welcome(parameters: parameters)
    }

    /// The session was registered at `now`: send the welcome, start the heartbeat.
    public mutating func sessionRegistered(now: NIODeadline) {
        guard case .v2Authenticated = self.state else { return }
        self.state = .v2Established(HeartbeatMonitor(interval: self.heartbeatInterval, now: now))
    }

    /// The server serves as many clients as it accepts: refuse this one.
    public mutating func sessionRefused() -> Action {
        if case .closed = self.state { return .none }
        self.state = .closed
        return .refuseAtCapacity(.failure(.tooManyClients, text: "the server serves as many clients as it accepts"))
    }

    /// The handshake deadline passed.
    public mutating func handshakeTimedOut() -> Action {
        switch self.state {
        case .tls, .v2Handshaking, .v2Authenticated: .handshakeTimedOut
        case .v1Running, .v2Established, .closed: .none
        }
    }

    /// A heartbeat period passed at `now`.
    public mutating func heartbeatDue(now: NIODeadline) -> Action {
        switch self.state {
        case .v1Running(let poolPort):
            return .sendRemote(poolPort: poolPort)
        case .v2Established(let monitor):
            guard monitor.isDead(now: now) else { return .sendHeartbeat }
            return self.close(.silent(monitor.deadAfter))
        case .tls, .v2Handshaking, .v2Authenticated, .closed:
            return .none
        }
    }

    /// The channel failed with `error`.
    public mutating func errorCaught(_ error: any Error) -> Action {
        switch self.state {
        case .v1Running, .v2Established, .closed:
            return .closeQuietly
        case .tls where self.isV1:
            return .closeQuietly
        case .tls, .v2Handshaking, .v2Authenticated:
            return self.refuse(nil, error)
        }
    }

    /// The channel closed: what to report.
    public mutating func channelClosed() -> Ending {
        defer { self.state = .closed }
        switch self.state {
        case .v1Running, .v2Established: return .sessionEnded
        case .tls, .v2Handshaking, .v2Authenticated: return .handshakeEnded
        case .closed: return .none
        }
    }

    private var isV1: Bool {
        if case .v1 = self.version { return true }
        return false
    }

    private mutating func refuse(_ message: V2Message?, _ error: any Error) -> Action {
        if case .closed = self.state { return .none }
        self.state = .closed
        let failure = (error as? NodePassError) ?? NodePassError(.tls, "\(error)")
        return .refuse(message, failure)
    }

    private mutating func close(_ closure: ControlClosure) -> Action {
        self.state = .closed
        return .close(closure)
    }
}
