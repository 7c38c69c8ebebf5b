import NIOCore
import NIOPosix

extension ClientBootstrap {
    /// Connects to `host:port`. An IP address is dialled directly; a name goes through the resolver and
    /// Happy Eyeballs. The direct path spares every pool and target connection the resolver's work.
    func dial(host: String, port: Int) -> EventLoopFuture<any Channel> {
        if let address = try? SocketAddress(ipAddress: host, port: port) {
            return self.connect(to: address)
        }
        return self.connect(host: host, port: port)
    }
}
