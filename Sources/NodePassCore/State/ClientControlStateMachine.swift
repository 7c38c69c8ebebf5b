import NIOCore

/// The client end of a control channel, for v1 and v2: the protocol the server chose, the v2 handshake, the
/// pool port, the heartbeat, and the launches the server sends.
///
/// Without a key the client speaks v1: it waits for `remote://PORT`, starts its pool towards that port and
/// relays `launch://ID`; a server that stays silent for three report intervals is dead. With a key it offers
/// v2: it stops at once against a server that did not negotiate `nodepass/2`, runs the handshake bound to
/// the certificate the server presented, then exchanges heartbeats. Time, the nonce and the fingerprint come
/// in from outside, so that tests drive the machine with fixed values.
public struct ClientControlStateMachine: Sendable {
    /// What this client speaks.
    public enum Version: Sendable {
        /// No key: v1, whose server announces its pool port every `reportInterval`.
        case v1(reportInterval: TimeAmount)
        /// A key: v2.
        case v2(key: V2Key)
    }

    private enum State: Sendable {
        /// The TLS handshake is running.
        case tls
        /// v1: the pool port and the heartbeat.
        case v1(ControlStateMachine)
        /// The v2 handshake is running.
        case v2Handshaking(V2ClientHandshakeStateMachine)
        /// The v2 session runs; in forward mode this side has the users and the server sends no launches.
        /// `datagrams`: `nodepass/2.1`, the server may launch datagram carriers.
        case v2Established(HeartbeatMonitor, forward: Bool, datagrams: Bool)
        /// Closed or closing.
        case closed
    }

    /// What the caller must do after an event.
    public enum Action: Sendable {
        /// Nothing.
        case none
        /// The session started (v1: TLS is up): report the connection; the pool starts on `startPool`.
        case connected
        /// v2: send this handshake message.
        case send(V2Message)
        /// v2: the server accepted this client: report the connection, start the pool with `parameters`
        /// and `secret`, and start the heartbeat with the server's period.
        case established(V2SessionParameters, V2SessionSecret)
        /// Stop: report `error` as the reason the connection failed, send `message` if any, close.
        case fail(V2Message?, NodePassError)
        /// v1: open the pool towards this port (a new port: drop the idle pool first).
        case startPool(port: Int, restart: Bool)
        /// Relay the pool connection with this ID.
        case launch(PoolID)
        /// Carry datagrams over the pool connection with this ID (`nodepass/2.1`).
        case launchDatagrams(PoolID)
        /// A launch that this side must not act on: log it and go on.
        case ignoreLaunch(PoolID, IgnoredLaunch)
        /// Send a v2 heartbeat.
        case sendHeartbeat
        /// Close the channel, logging why as an error.
        case close(ControlClosure)
        /// The handshake took too long: log it and close.
        case handshakeTimedOut
        /// Close the channel (after a connection error, already logged).
        case closeQuietly
    }

    /// Why a launch was ignored.
    public enum IgnoredLaunch: Hashable, Sendable {
        /// v1: it came before the pool port.
        case beforePoolPort
        /// v2 forward mode: this side has the users and sends the launches.
        case forwardMode
    }

    private var state: State = .tls
    private let version: Version

    /// Makes the machine of one control channel.
    public init(version: Version) {
        self.version = version
    }

    /// v1: whether the server has not announced its pool port yet.
    public var isAwaitingPoolPort: Bool {
        if case .v1(let control) = self.state, case .awaitingRemote = control.state { return true }
        return false
    }

    /// The TLS handshake completed at `now`; `alpn` is the protocol negotiated. v2 needs the SHA-256
    /// `fingerprint` of the server's certificate (nil: it presented none) and a fresh client `nonce`.
    public mutating func tlsHandshakeCompleted(
        alpn: String?,
        fingerprint: [UInt8]?,
        nonce: [UInt8],
        now: NIODeadline
    ) -> Action {
        guard case .tls = self.state else { return .none }
        switch self.version {
        case .v1(let reportInterval):
            var control = ControlStateMachine(reportInterval: reportInterval)
            control.connected(now: now)
            self.state = .v1(control)
            return .connected
        case .v2(let key):
            guard let alpn, V2Message.alpnNames.contains(alpn) else {
                return self.fail(nil, V2ClientHandshakeStateMachine.refusal(.noKey, text: ""))
            }
            guard let fingerprint else {
                return self.fail(nil, NodePassError(.tls, "the server presented no certificate"))
            }
            var handshake = V2ClientHandshakeStateMachine(
                key: key,
                clientNonce: nonce,
                fingerprint: fingerprint,
                withTransports: alpn != V2Message.alpn,
                allowsSealed: V2Message.seals(alpn),
                allowsResume: alpn == V2Message.alpnResume
            )
            let hello = handshake.started()
            self.state = .v2Handshaking(handshake)
            return .send(hello)
        }
    }

    /// A v1 signal arrived.
    public mutating func signalReceived(_ signal: Signal, now: NIODeadline) -> Action {
        guard case .v1(var control) = self.state else { return .none }
        let action = control.signalReceived(signal, now: now)
        self.state = .v1(control)
        switch action {
        case .none, .closeDeadChannel: return .none
        case .startPool(let port): return .startPool(port: port, restart: false)
        case .restartPool(let port): return .startPool(port: port, restart: true)
        case .launch(let id): return .launch(id)
        case .ignoreLaunch(let id): return .ignoreLaunch(id, .beforePoolPort)
        }
    }

    /// A v2 message arrived at `now`.
    public mutating func messageReceived(_ message: V2Message, now: NIODeadline) -> Action {
        switch self.state {
        case .tls, .v1, .closed:
            return .none
        case .v2Handshaking(var handshake):
            let action = handshake.messageReceived(message)
            self.state = .v2Handshaking(handshake)
            switch action {
            case .send(let reply):
                return .send(reply)
            case .fail(let reply, let error):
                return self.fail(reply, error)
            case .established(let parameters, let secret):
                let interval = TimeAmount.milliseconds(Int64(parameters.heartbeatMilliseconds))
                self.state = .v2Established(
                    HeartbeatMonitor(interval: interval, now: now),
                    forward: parameters.mode == .forward,
                    datagrams: parameters.transports?.contains(.udp) ?? false
                )
                return .established(parameters, secret)
            }
        case .v2Established(var monitor, let forward, let datagrams):
            let meaning = monitor.sessionMessageReceived(message, now: now)
            self.state = .v2Established(monitor, forward: forward, datagrams: datagrams)
            switch meaning {
            case .nothing:
                return .none
            case .launch(let id):
                return forward ? .ignoreLaunch(id, .forwardMode) : .launch(id)
            case .launchDatagrams(let id):
                // Under `nodepass/2` the frame is unknown, and ignored as any unknown frame.
                guard datagrams else { return .none }
                return forward ? .ignoreLaunch(id, .forwardMode) : .launchDatagrams(id)
            case .close(let closure):
                self.state = .closed
                return .close(closure)
            }
        }
    }

    /// A frame that is not a valid v2 message arrived.
    public mutating func malformedMessageReceived(_ error: any Error) -> Action {
        self.fail(.failure(.protocolViolation, text: "malformed message"), Self.failure(error))
    }

    /// The handshake deadline passed.
    public mutating func handshakeTimedOut() -> Action {
        switch self.state {
        case .tls, .v2Handshaking: .handshakeTimedOut
        case .v1, .v2Established, .closed: .none
        }
    }

    /// A heartbeat period passed at `now`: v1 checks the server's `remote://`, v2 checks and sends.
    public mutating func heartbeatDue(now: NIODeadline) -> Action {
        switch self.state {
        case .v1(var control):
            let action = control.heartbeatCheckFired(now: now)
            self.state = .v1(control)
            guard action == .closeDeadChannel else { return .none }
            self.state = .closed
            return .close(.silent(control.deadAfter))
        case .v2Established(let monitor, _, _):
            guard monitor.isDead(now: now) else { return .sendHeartbeat }
            self.state = .closed
            return .close(.silent(monitor.deadAfter))
        case .tls, .v2Handshaking, .closed:
            return .none
        }
    }

    /// The channel failed with `error`.
    public mutating func errorCaught(_ error: any Error) -> Action {
        if case .tls = self.state {
            return self.fail(nil, NodePassError(.tls, "the TLS handshake with the server failed", underlying: error))
        }
        return self.fail(nil, NodePassError(.controlChannelLost, "the control channel failed", underlying: error))
    }

    /// The channel closed.
    public mutating func channelClosed() {
        self.state = .closed
    }

    private mutating func fail(_ message: V2Message?, _ error: NodePassError) -> Action {
        if case .closed = self.state { return .none }
        self.state = .closed
        return .fail(message, error)
    }

    private static func failure(_ error: any Error) -> NodePassError {
        (error as? NodePassError) ?? NodePassError(.protocolViolation, "\(error)")
    }
}
