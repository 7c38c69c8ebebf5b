#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore

/// Socket options every tunnel connection gets.
enum SocketTuning {
    /// Seconds of idleness before the first keepalive probe, and between probes.
    static let keepaliveSeconds = 15
    /// Unanswered probes before the kernel declares the peer dead.
    static let keepaliveProbes = 3

    private static let tcpLevel = SocketOptionLevel(IPPROTO_TCP)

    /// Keepalive on, Nagle off, for a connected stream channel. Called on the channel's event loop.
    static func apply(to channel: any Channel) {
        let options = channel.syncOptions
        try? options?.setOption(.socketOption(.so_keepalive), value: 1)
        try? options?.setOption(.tcpOption(.tcp_nodelay), value: 1)
        #if os(Linux)
        try? options?.setOption(
            ChannelOptions.Types.SocketOption(level: Self.tcpLevel, name: SocketOptionName(TCP_KEEPIDLE)),
            value: Self.keepaliveSeconds
        )
        try? options?.setOption(
            ChannelOptions.Types.SocketOption(level: Self.tcpLevel, name: SocketOptionName(TCP_KEEPINTVL)),
            value: Self.keepaliveSeconds
        )
        try? options?.setOption(
            ChannelOptions.Types.SocketOption(level: Self.tcpLevel, name: SocketOptionName(TCP_KEEPCNT)),
            value: Self.keepaliveProbes
        )
        #endif
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
