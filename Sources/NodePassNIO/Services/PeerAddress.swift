import NIOCore

/// Socket addresses as logs show them: `192.0.2.1:5000` or `[2001:db8::1]:5000`, easy to match in a
/// log filter (such as fail2ban's).
enum PeerAddress {
    static func describe(_ address: SocketAddress?) -> String {
        guard let address, let ip = address.ipAddress else { return "?" }
        let port = address.port.map { ":\($0)" } ?? ""
        if case .v6 = address {
            return "[\(ip)]\(port)"
        }
        return "\(ip)\(port)"
    }
}

extension Channel {
    /// The peer's address as logs show it.
    var peerDescription: String { PeerAddress.describe(self.remoteAddress) }
}
