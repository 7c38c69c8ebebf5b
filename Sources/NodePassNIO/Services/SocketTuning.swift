import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Socket options every tunnel connection gets.
enum SocketTuning {
    /// Seconds of idleness before the first keepalive probe, and between probes.
    static let keepaliveSeconds = 15
    /// Unanswered probes before the kernel declares the peer dead.
    static let keepaliveProbes = 3

    private static let tcpLevel = SocketOptionLevel(IPPROTO_TCP)

    /// The keepalive options: on, first probe after `keepaliveSeconds` idle, then every `keepaliveSeconds`,
    /// `keepaliveProbes` unanswered probes end the connection.
    private static let keepalive: [(ChannelOptions.Types.SocketOption, SocketOptionValue)] = {
        var options = [(ChannelOptions.Types.SocketOption.socketOption(.so_keepalive), SocketOptionValue(1))]
        #if os(Linux)
        func tcp(_ name: Int32, _ value: Int) -> (ChannelOptions.Types.SocketOption, SocketOptionValue) {
            let option = ChannelOptions.Types.SocketOption(level: Self.tcpLevel, name: SocketOptionName(name))
            return (option, SocketOptionValue(value))
        }
        options += [
            tcp(TCP_KEEPIDLE, Self.keepaliveSeconds),
            tcp(TCP_KEEPINTVL, Self.keepaliveSeconds),
            tcp(TCP_KEEPCNT, Self.keepaliveProbes),
        ]
        #endif
        return options
    }()

    /// Keepalive for a connection this side dialled. Called on the channel's event loop. (Nagle is off on
    /// every SwiftNIO TCP channel already.) Through SwiftNIO's option path: reaching the socket descriptor
    /// directly (`withUnsafeTransportIfAvailable`) costs a dynamic cast to a constrained existential that
    /// takes more instructions than the four options (callgrind).
    static func apply(to channel: any Channel) {
        guard let options = channel.syncOptions else { return }
        for (option, value) in Self.keepalive {
            try? options.setOption(option, value: value)
        }
    }

    /// A relayed connection's channel options, set before it is registered: no automatic reads (the relay
    /// reads when the far side can take the bytes) and half-closure passed on instead of closing. (Its
    /// `GlueHandler` sizes its reads.) Set here rather than as bootstrap options, which SwiftNIO applies one
    /// future at a time.
    static func prepareRelay(_ channel: any Channel) throws {
        guard let options = channel.syncOptions else { return }
        try options.setOption(.autoRead, value: false)
        try options.setOption(.allowRemoteHalfClosure, value: true)
    }

    /// Keepalive for every connection `bootstrap` accepts: set once on the listening socket, whose options
    /// (keepalive, its timings, TCP_NODELAY) each accepted socket inherits, instead of four system calls
    /// per connection.
    static func applyToAccepted(_ bootstrap: ServerBootstrap) -> ServerBootstrap {
        Self.keepalive.reduce(bootstrap) { $0.serverChannelOption($1.0, value: $1.1) }
    }

    /// The pool connection of a resumable relay: the kernel ends it soon after its path dies, so that the
    /// relay resumes on a new one. Keepalive probes after 5 s of silence, every 2 s, 3 unanswered end it;
    /// written bytes unacknowledged for 30 s end it too (TCP_USER_TIMEOUT; also after 30 s of a zero window, when
    /// the far end stopped reading: the relay then resumes on a new connection, which costs a connection and
    /// nothing else). Called on the channel's loop.
    static func detectDeadPath(on channel: any Channel) {
        guard let options = channel.syncOptions else { return }
        try? options.setOption(.socketOption(.so_keepalive), value: 1)
        #if os(Linux)
        for (name, value) in [(TCP_KEEPIDLE, 5), (TCP_KEEPINTVL, 2), (TCP_KEEPCNT, 3)] {
            try? options.setOption(
                ChannelOptions.Types.SocketOption(level: Self.tcpLevel, name: SocketOptionName(name)),
                value: SocketOptionValue(value)
            )
        }
        #endif
        Self.setUserTimeout(.seconds(30), on: channel)
    }

    /// Aborts the connection when written bytes stay unacknowledged for `timeout` (Linux TCP_USER_TIMEOUT),
    /// so a dead peer on the control channel is noticed by the side that only writes.
    static func setUserTimeout(_ timeout: TimeAmount, on channel: any Channel) {
        #if os(Linux)
        let milliseconds = Int(timeout.nanoseconds / 1_000_000)
        try? channel.syncOptions?.setOption(
            ChannelOptions.Types.SocketOption(level: Self.tcpLevel, name: SocketOptionName(TCP_USER_TIMEOUT)),
            value: milliseconds
        )
        #endif
    }
}
