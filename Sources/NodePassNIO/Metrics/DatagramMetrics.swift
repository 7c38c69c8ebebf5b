import CoreMetrics
import NodePassCore

/// The UDP metrics of one tunnel process (v2, `nodepass/2.1`), labelled as the tunnel's other metrics.
final class DatagramMetrics: Sendable {
    /// Datagrams from users towards the service, and their bytes (payload only).
    let datagramsUpstream: Counter
    let bytesUpstream: Counter
    /// Datagrams from the service back to users, and their bytes.
    let datagramsDownstream: Counter
    let bytesDownstream: Counter
    /// Flows live on this side now.
    let flows: Meter
    private let drops: [DatagramDrop: Counter]

    init(labels: MetricLabels) {
        self.datagramsUpstream = labels.counter("nodepass_udp_datagrams_total", ("direction", "upstream"))
        self.bytesUpstream = labels.counter("nodepass_udp_bytes_total", ("direction", "upstream"))
        self.datagramsDownstream = labels.counter("nodepass_udp_datagrams_total", ("direction", "downstream"))
        self.bytesDownstream = labels.counter("nodepass_udp_bytes_total", ("direction", "downstream"))
        self.flows = labels.meter("nodepass_udp_flows")
        var drops: [DatagramDrop: Counter] = [:]
        for reason in DatagramDrop.allCases {
            drops[reason] = labels.counter("nodepass_udp_drops_total", ("reason", reason.rawValue))
        }
        self.drops = drops
    }

    /// Counts a dropped datagram.
    func dropped(_ reason: DatagramDrop, count: Int = 1) {
        guard count > 0 else { return }
        self.drops[reason]?.increment(by: count)
    }
}
