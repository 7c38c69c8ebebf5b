import NIOCore

/// The client's view of the control channel: waiting for the pool port, running, and the heartbeat.
///
/// Time comes in as `NIODeadline` values so that tests can drive it with a mock clock.
public struct ControlStateMachine: Sendable {
    /// Where the control channel is.
    public enum State: Hashable, Sendable {
        /// No control channel.
        case disconnected
        /// TLS is up; the server has not named its pool port yet.
        case awaitingRemote(since: NIODeadline)
        /// The pool port is known; `lastHeartbeat` is when the last `remote://` came.
        case running(poolPort: Int, lastHeartbeat: NIODeadline)
    }

    /// What the caller must do after an event.
    public enum Action: Hashable, Sendable {
        /// Nothing.
        case none
        /// Open the pool towards this port.
        case startPool(port: Int)
        /// The server named another pool port: drop the idle pool and open it towards the new port.
        case restartPool(port: Int)
        /// Relay the pool connection with this ID.
        case launch(PoolID)
        /// A launch came before the pool port: ignore it (and log).
        case ignoreLaunch(PoolID)
        /// No heartbeat for too long: close the control channel.
        case closeDeadChannel
    }

    /// The current state.
    public private(set) var state: State = .disconnected
    /// Silence longer than this means the channel is dead (3 x REPORT_INTERVAL).
    public let deadAfter: TimeAmount
    /// The pool (re)starts at most this often: a server that names another port on every line cannot make
    /// the client reopen its pool each time. A port named too soon is not taken; the server repeats its
    /// port every REPORT_INTERVAL, so the last one it named is taken at its next announcement.
    public static let minimumRestartInterval = TimeAmount.seconds(1)
    /// When the pool last (re)started.
    private var lastPoolStart: NIODeadline?

    /// Makes a machine that declares the channel dead after three missed heartbeats of `reportInterval`.
    public init(reportInterval: TimeAmount) {
        self.deadAfter = reportInterval * 3
    }

    /// The TLS handshake completed.
    public mutating func connected(now: NIODeadline) {
        self.state = .awaitingRemote(since: now)
    }

    /// A signal arrived.
    public mutating func signalReceived(_ signal: Signal, now: NIODeadline) -> Action {
        switch (signal, self.state) {
        case (.remote(let port), .awaitingRemote):
            self.state = .running(poolPort: port, lastHeartbeat: now)
            self.lastPoolStart = now
            return .startPool(port: port)
        case (.remote(let port), .running(let current, _)):
            // Every `remote://` is a heartbeat, whatever its port.
            self.state = .running(poolPort: current, lastHeartbeat: now)
            guard port != current else { return .none }
            if let last = self.lastPoolStart, now - last < Self.minimumRestartInterval { return .none }
            self.state = .running(poolPort: port, lastHeartbeat: now)
            self.lastPoolStart = now
            return .restartPool(port: port)
        case (.remote, .disconnected):
            return .none
        case (.launch(let id), .running):
            return .launch(id)
        case (.launch(let id), _):
            return .ignoreLaunch(id)
        }
    }

    /// The periodic heartbeat check ran at `now`.
    public mutating func heartbeatCheckFired(now: NIODeadline) -> Action {
        let since: NIODeadline
        switch self.state {
        case .disconnected: return .none
        case .awaitingRemote(let start): since = start
        case .running(_, let last): since = last
        }
        return now - since > self.deadAfter ? .closeDeadChannel : .none
    }

    /// The control channel closed.
    public mutating func disconnected() {
        self.state = .disconnected
    }
}
