import CoreMetrics
import NodePassCore
import Synchronization

/// The metrics of one run of an instance that its master shows (bytes each way by protocol, connections,
/// flows, idle pool connections), kept in memory where the master reads them; a `MetricsFactory` handed to
/// the run's `TunnelMetrics`. The other metrics go nowhere (or to Prometheus, beside this).
final class InstanceTally: MetricsFactory, Sendable {
    private let tcpUpstream = TallyValue()
    private let tcpDownstream = TallyValue()
    private let udpUpstream = TallyValue()
    private let udpDownstream = TallyValue()
    private let connections = TallyValue()
    private let flows = TallyValue()
    private let idlePool = TallyValue()

    /// What the run counted so far.
    struct Reading: Equatable {
        /// Since the run started: tcpReceived is what users sent towards the service (upstream), tcpSent
        /// what came back (downstream); the same for UDP.
        var traffic = TrafficCounters()
        var connections = 0
        var flows = 0
        var idlePool = 0
    }

    func read() -> Reading {
        var traffic = TrafficCounters()
        traffic.tcpReceived = self.tcpUpstream.unsigned
        traffic.tcpSent = self.tcpDownstream.unsigned
        traffic.udpReceived = self.udpUpstream.unsigned
        traffic.udpSent = self.udpDownstream.unsigned
        return Reading(
            traffic: traffic,
            connections: self.connections.count,
            flows: self.flows.count,
            idlePool: self.idlePool.count
        )
    }

    private func value(_ label: String, _ dimensions: [(String, String)]) -> TallyValue? {
        let upstream = dimensions.contains { $0 == ("direction", "upstream") }
        switch label {
        case "nodepass_relay_bytes_total": return upstream ? self.tcpUpstream : self.tcpDownstream
        case "nodepass_udp_bytes_total": return upstream ? self.udpUpstream : self.udpDownstream
        case "nodepass_connections_active": return self.connections
        case "nodepass_udp_flows": return self.flows
        case "nodepass_pool_idle_connections": return self.idlePool
        default: return nil
        }
    }

    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        self.value(label, dimensions) ?? NOOPMetricsHandler.instance
    }

    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        self.value(label, dimensions) ?? NOOPMetricsHandler.instance
    }

    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        NOOPMetricsHandler.instance
    }

    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        NOOPMetricsHandler.instance
    }

    func destroyCounter(_ handler: any CounterHandler) {}
    func destroyMeter(_ handler: any MeterHandler) {}
    func destroyRecorder(_ handler: any RecorderHandler) {}
    func destroyTimer(_ handler: any TimerHandler) {}
}

/// One counted value: a counter's total or a meter's level.
private final class TallyValue: CounterHandler, MeterHandler, Sendable {
    private let value = Atomic<Int64>(0)

    var count: Int { Int(max(0, self.value.load(ordering: .relaxed))) }
    var unsigned: UInt64 { UInt64(max(0, self.value.load(ordering: .relaxed))) }

    func increment(by amount: Int64) { self.value.add(amount, ordering: .relaxed) }
    func reset() { self.value.store(0, ordering: .relaxed) }
    func set(_ value: Int64) { self.value.store(value, ordering: .relaxed) }
    func set(_ value: Double) { self.value.store(Int64(exactly: value.rounded()) ?? 0, ordering: .relaxed) }
    func increment(by amount: Double) { self.value.add(Int64(exactly: amount.rounded()) ?? 0, ordering: .relaxed) }
    func decrement(by amount: Double) {
        self.value.subtract(Int64(exactly: amount.rounded()) ?? 0, ordering: .relaxed)
    }
}
