import NIOCore
import NodePassCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// TARGET's address for UDP, on the side that dials. UDP cannot try each address as a TCP dial does (no
/// handshake says which one answers), so a name is resolved to its first IPv4 address, else its first
/// IPv6 one: most services listen on IPv4, and `localhost` often resolves to `::1` first.
enum DatagramTarget {
    struct ResolutionFailed: Error, CustomStringConvertible {
        var target: HostPort
        var description: String { "cannot resolve \(self.target) to an address" }
    }

    /// An IP address as it is; a name through the system resolver (blocking: call it off the event loops).
    static func resolve(_ target: HostPort) throws -> SocketAddress {
        if let address = try? SocketAddress(ipAddress: target.dialHost, port: target.port) {
            return address
        }
        for family in [AF_INET, AF_INET6] {
            var hints = addrinfo()
            hints.ai_family = family
            var result: UnsafeMutablePointer<addrinfo>?
            guard getaddrinfo(target.dialHost, nil, &hints, &result) == 0, let first = result else { continue }
            defer { freeaddrinfo(first) }
            guard let raw = first.pointee.ai_addr else { continue }
            var address: SocketAddress
            if family == AF_INET {
                address = raw.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                    SocketAddress($0.pointee, host: target.dialHost)
                }
            } else {
                address = raw.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                    SocketAddress($0.pointee, host: target.dialHost)
                }
            }
            address.port = target.port
            return address
        }
        throw ResolutionFailed(target: target)
    }
}
