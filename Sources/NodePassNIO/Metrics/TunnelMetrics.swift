import CoreMetrics
import NIOCore

/// The metrics one tunnel process reports, through swift-metrics (no-ops unless a backend is bootstrapped).
/// Every metric carries the label `role` (`server` or `client`), and in a master `instance`. A class: it is handed to every relay and
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
    /// v2 clients that proved the key but were turned away: the server served as many clients as it accepts.
    public let clientsTurnedAway: Counter
    /// v2 pool connections whose TLS certificate was not the one the server announced (client).
    public let poolCertificateMismatches: Counter
    /// Duration of the control channel's TLS handshake.
    public let handshakeDuration: Timer
    /// From a user's connection to the start of its relay (server), or from a launch to the target's
    /// connection (client).
    public let newConnectionDuration: Timer
    /// UDP (v2): datagrams, bytes, flows and drops.
    let datagrams: DatagramMetrics
    /// Resumable relays: attempts, outcomes, bytes sent again.
    let resume: ResumeMetrics

    /// Why a connection failed.
    public enum FailureReason: Sendable {
        /// No pool connection came in time (server).
        case poolWait
        /// SEMAPHORE_LIMIT was reached.
        case limit
        /// The target could not be dialled (client).
        case target
    }

    /// Makes the metrics of a tunnel in `role` (`server` or `client`); a master's instance adds the label
    /// `instance` with its ID. `factory` makes them (swift-metrics' bootstrapped one unless given).
    public init(role: String, instance: String? = nil, factory: any MetricsFactory = MetricsSystem.factory) {
        let labels = MetricLabels(role: role, instance: instance, factory: factory)
        self.accepted = labels.counter("nodepass_connections_accepted_total")
        self.active = labels.meter("nodepass_connections_active")
        self.failedPoolWait = labels.counter("nodepass_connections_failed_total", ("reason", "pool_wait"))
        self.failedLimit = labels.counter("nodepass_connections_failed_total", ("reason", "limit"))
        self.failedTarget = labels.counter("nodepass_connections_failed_total", ("reason", "target"))
        self.bytesUpstream = labels.counter("nodepass_relay_bytes_total", ("direction", "upstream"))
        self.bytesDownstream = labels.counter("nodepass_relay_bytes_total", ("direction", "downstream"))
        self.poolIdle = labels.meter("nodepass_pool_idle_connections")
        self.poolCapacity = labels.meter("nodepass_pool_capacity")
        self.reconnects = labels.counter("nodepass_control_reconnects_total")
        self.authenticationFailures = labels.counter("nodepass_authentication_failures_total")
        self.clientsTurnedAway = labels.counter("nodepass_clients_turned_away_total")
        self.poolCertificateMismatches = labels.counter("nodepass_pool_certificate_mismatches_total")
        self.handshakeDuration = labels.timer("nodepass_tls_handshake_duration_seconds")
        self.newConnectionDuration = labels.timer("nodepass_new_connection_duration_seconds")
        self.datagrams = DatagramMetrics(labels: labels)
        self.resume = ResumeMetrics(labels: labels)
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

/// The labels every metric of one tunnel carries (`role`, and `instance` in a master), and the factory that
/// makes them.
struct MetricLabels {
    private let common: [(String, String)]
    private let factory: any MetricsFactory

    init(role: String, instance: String?, factory: any MetricsFactory) {
        self.common = [("role", role)] + (instance.map { [("instance", $0)] } ?? [])
        self.factory = factory
    }

    func counter(_ label: String, _ extra: (String, String)...) -> Counter {
        Counter(label: label, dimensions: self.common + extra, factory: self.factory)
    }

    func meter(_ label: String, _ extra: (String, String)...) -> Meter {
        Meter(label: label, dimensions: self.common + extra, factory: self.factory)
    }

    func timer(_ label: String) -> Timer {
        Timer(label: label, dimensions: self.common, factory: self.factory)
    }
}
