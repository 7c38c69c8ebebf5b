import CoreMetrics
import NodePassCore

/// The UDP metrics of one tunnel process (v2, `nodepass/2.1`), each labelled with `role`.
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

    init(role: String) {
        let role = ("role", role)
        self.datagramsUpstream = Counter(
            label: "nodepass_udp_datagrams_total",
            dimensions: [role, ("direction", "upstream")]
        )
        self.bytesUpstream = Counter(label: "nodepass_udp_bytes_total", dimensions: [role, ("direction", "upstream")])
        self.datagramsDownstream = Counter(
            label: "nodepass_udp_datagrams_total",
            dimensions: [role, ("direction", "downstream")]
        )
        self.bytesDownstream = Counter(
            label: "nodepass_udp_bytes_total",
            dimensions: [role, ("direction", "downstream")]
        )
        self.flows = Meter(label: "nodepass_udp_flows", dimensions: [role])
        var drops: [DatagramDrop: Counter] = [:]
        for reason in DatagramDrop.allCases {
            drops[reason] = Counter(label: "nodepass_udp_drops_total", dimensions: [role, ("reason", reason.rawValue)])
        }
        self.drops = drops
    }

    /// Counts a dropped datagram.
    func dropped(_ reason: DatagramDrop, count: Int = 1) {
        guard count > 0 else { return }
        self.drops[reason]?.increment(by: count)
    }
}
