import CoreMetrics
import NIOCore

/// The metrics one tunnel process reports, through swift-metrics (no-ops unless a backend is bootstrapped).
/// Every metric carries the label `role` (`server` or `client`). A class: it is handed to every relay and
/// captured by many closures, and a copy of a reference is one retain where a copy of these fifteen metrics
/// would be fifteen.
public final class TunnelMetrics: Sendable {
    /// User connections accepted (server) or launched connections relayed (client).
    public let accepted: Counter
    /// Relayed connections open now.
    public let active: Meter
    /// Connections refused or lost before relaying, labelled by `reason`.
    private let failedPoolWait: Counter
    private let failedLimit: Counter
    private let failedTarget: Counter
    /// Bytes relayed from users towards the service.
    public let bytesUpstream: Counter
    /// Bytes relayed from the service back to users.
    public let bytesDownstream: Counter
    /// Idle pool connections.
    public let poolIdle: Meter
    /// Target size of the client's pool.
    public let poolCapacity: Meter
    /// Control channels established after the first one (client reconnects, server client changes).
    public let reconnects: Counter
    /// Failed authentications (protocol v2; stays 0 with v1).
    public let authenticationFailures: Counter
    /// Duration of the control channel's TLS handshake.
    public let handshakeDuration: Timer
    /// From a user's connection to the start of its relay (server), or from a launch to the target's
    /// connection (client).
    public let newConnectionDuration: Timer
    /// UDP (v2): datagrams, bytes, flows and drops.
    let datagrams: DatagramMetrics

    /// Why a connection failed.
    public enum FailureReason: Sendable {
        /// No pool connection came in time (server).
        case poolWait
        /// SEMAPHORE_LIMIT was reached.
        case limit
        /// The target could not be dialled (client).
        case target
    }

    /// Makes the metrics of a process in `role` (`server` or `client`).
    public init(role: String) {
        let role = ("role", role)
        self.accepted = Counter(label: "nodepass_connections_accepted_total", dimensions: [role])
        self.active = Meter(label: "nodepass_connections_active", dimensions: [role])
        self.failedPoolWait = Counter(
            label: "nodepass_connections_failed_total",
            dimensions: [role, ("reason", "pool_wait")]
        )
        self.failedLimit = Counter(label: "nodepass_connections_failed_total", dimensions: [role, ("reason", "limit")])
        self.failedTarget = Counter(
            label: "nodepass_connections_failed_total",
            dimensions: [role, ("reason", "target")]
        )
        self.bytesUpstream = Counter(
            label: "nodepass_relay_bytes_total",
            dimensions: [role, ("direction", "upstream")]
        )
        self.bytesDownstream = Counter(
            label: "nodepass_relay_bytes_total",
            dimensions: [role, ("direction", "downstream")]
        )
        self.poolIdle = Meter(label: "nodepass_pool_idle_connections", dimensions: [role])
        self.poolCapacity = Meter(label: "nodepass_pool_capacity", dimensions: [role])
        self.reconnects = Counter(label: "nodepass_control_reconnects_total", dimensions: [role])
        self.authenticationFailures = Counter(label: "nodepass_authentication_failures_total", dimensions: [role])
        self.handshakeDuration = Timer(label: "nodepass_tls_handshake_duration_seconds", dimensions: [role])
        self.newConnectionDuration = Timer(label: "nodepass_new_connection_duration_seconds", dimensions: [role])
        self.datagrams = DatagramMetrics(role: role.1)
    }

    /// Counts a failed connection.
    public func failed(_ reason: FailureReason) {
        switch reason {
        case .poolWait: self.failedPoolWait.increment()
        case .limit: self.failedLimit.increment()
        case .target: self.failedTarget.increment()
        }
    }

    /// Records the time since `start`.
    static func record(_ timer: Timer, since start: NIODeadline) {
        timer.recordNanoseconds((NIODeadline.now() - start).nanoseconds)
    }
}
