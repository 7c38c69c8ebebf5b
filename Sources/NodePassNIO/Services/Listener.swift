import Logging
import NIOCore
import NIOPosix
import NodePassCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Binding helpers shared by the services.
enum Listener {
    /// A listener's bootstrap: address reuse, a deep backlog, accept errors logged and followed by a pause of
    /// a second (`AcceptPauseHandler`); accepted connections inherit the keepalive options of `SocketTuning`.
    /// Relayed connections get their channel options from `SocketTuning.prepareRelay` in their initializer.
    static func bootstrap(group: any EventLoopGroup, logger: Logger, what: String) -> ServerBootstrap {
        SocketTuning.applyToAccepted(ServerBootstrap(group: group))
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(AcceptPauseHandler(logger: logger, what: what))
                }
            }
    }

    /// Binds `bootstrap` on `address`; an empty host binds every interface (IPv6 and IPv4, or IPv4 only
    /// where IPv6 is off). A failure becomes an error that names the address and its cause.
    static func bind(
        _ bootstrap: ServerBootstrap,
        host: String,
        port: Int
    ) async throws(NodePassError) -> any Channel {
        let hosts = host.isEmpty ? ["::", "0.0.0.0"] : [host]
        var lastError: (any Error)?
        for candidate in hosts {
            do {
                return try await bootstrap.bind(host: candidate, port: port).get()
            } catch {
                lastError = error
            }
        }
        let address = HostPort(host: host, port: port)
        switch (lastError as? IOError)?.errnoCode {
        case EACCES? where port < 1024:
            throw NodePassError(
                .bindFailed,
                "cannot listen on \(address): permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            )
        case EADDRNOTAVAIL?:
            throw NodePassError(.bindFailed, "cannot listen on \(address): this machine has no such address")
        default:
            throw NodePassError(.bindFailed, "cannot listen on \(address)", underlying: lastError)
        }
    }
}
