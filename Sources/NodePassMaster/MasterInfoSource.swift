import NIOCore
import NIOPosix
import NodePassCore
import NodePassNIO
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What `GET …/info` shows (NodePass 1.14's fields) and what `GET …/tcping` does.
final class MasterInfoSource: Sendable {
    private let url: MasterURL
    private let started = NIODeadline.now()
    private let group: any EventLoopGroup
    private let pingTimeout: TimeAmount
    /// The CPU's busy and total time at the previous reading (usage is measured between two readings).
    private let lastCPU = Mutex<(busy: UInt64, total: UInt64)>((0, 0))
    private let pingsInFlight = Atomic<Int>(0)
    /// The most TCP pings at once; more are answered at once with an error.
    static let maximumPings = 10

    init(url: MasterURL, group: any EventLoopGroup, pingTimeout: TimeAmount) {
        self.url = url
        self.group = group
        self.pingTimeout = pingTimeout
    }

    func info(identity: MasterIdentity) -> MasterInfo {
        let memory = Self.fields("/proc/meminfo")
        let kib = { (name: String) in (memory[name] ?? 0) * 1024 }
        let (netReceived, netSent) = Self.network()
        let (diskRead, diskWritten) = Self.disks()
        return MasterInfo(
            mid: identity.masterID,
            alias: identity.alias,
            os: Self.operatingSystem,
            arch: Self.architecture,
            cpu: self.cpuUsage(),
            memTotal: kib("MemTotal"),
            memUsed: kib("MemTotal") - min(kib("MemTotal"), kib("MemAvailable")),
            swapTotal: kib("SwapTotal"),
            swapUsed: kib("SwapTotal") - min(kib("SwapTotal"), kib("SwapFree")),
            netrx: netReceived,
            nettx: netSent,
            diskr: diskRead,
            diskw: diskWritten,
            sysup: Int(Self.text(of: "/proc/uptime")?.split(separator: " ").first.flatMap { Double($0) } ?? 0),
            ver: NodePassVersion.current,
            name: self.url.listen.host.isEmpty ? Self.hostName : self.url.listen.host,
            uptime: Int((NIODeadline.now() - self.started).nanoseconds / 1_000_000_000),
            log: self.url.logLevel.rawValue,
            tls: String(self.url.tls.rawValue),
            crt: self.url.certificateFile ?? "",
            key: self.url.privateKeyFile ?? ""
        )
    }

    /// Connects to `target` (HOST:PORT) and reports how long it took.
    func tcping(_ target: String) async -> TCPingResult {
        let address: HostPort
        do {
            address = try HostPort.parse(target[...], what: "target")
        } catch {
            return TCPingResult(target: target, connected: false, latency: 0, error: error.message)
        }
        guard self.pingsInFlight.add(1, ordering: .relaxed).newValue <= Self.maximumPings else {
            self.pingsInFlight.subtract(1, ordering: .relaxed)
            return TCPingResult(target: target, connected: false, latency: 0, error: "too many requests")
        }
        defer { self.pingsInFlight.subtract(1, ordering: .relaxed) }
        let start = NIODeadline.now()
        do {
            let channel = try await ClientBootstrap(group: self.group)
                .connectTimeout(self.pingTimeout)
                .connect(host: address.dialHost, port: address.port)
                .get()
            let latency = Int((NIODeadline.now() - start).nanoseconds / 1_000_000)
            try? await channel.close()
            return TCPingResult(target: target, connected: true, latency: latency, error: nil)
        } catch {
            return TCPingResult(target: target, connected: false, latency: 0, error: UserFacingError.describe(error))
        }
    }

    // MARK: the system, from /proc

    private func cpuUsage() -> Int {
        guard let line = Self.text(of: "/proc/stat")?.split(separator: "\n").first, line.hasPrefix("cpu ") else {
            return -1
        }
        let times = line.split(separator: " ").dropFirst().compactMap { UInt64($0) }
        guard times.count >= 5 else { return -1 }
        let total = times.reduce(0, &+)
        let busy = total &- times[3] &- times[4]
        let previous = self.lastCPU.withLock { last in
            defer { last = (busy, total) }
            return last
        }
        guard total > previous.total else { return 0 }
        return Int(min(100, (busy &- min(busy, previous.busy)) * 100 / (total - previous.total)))
    }

    /// `Name: value …` lines, as /proc/meminfo has them.
    private static func fields(_ path: String) -> [String: UInt64] {
        var result: [String: UInt64] = [:]
        for line in (Self.text(of: path) ?? "").split(separator: "\n") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, parts[0].hasSuffix(":"), let value = UInt64(parts[1]) else { continue }
            result[String(parts[0].dropLast())] = value
        }
        return result
    }

    /// Bytes received and sent by the physical interfaces (those not under /sys/devices/virtual/net).
    private static func network() -> (UInt64, UInt64) {
        var received: UInt64 = 0
        var sent: UInt64 = 0
        for line in (Self.text(of: "/proc/net/dev") ?? "").split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].trimmingPrefix(while: { $0 == " " })
            guard access("/sys/devices/virtual/net/\(name)", F_OK) != 0 else { continue }
            let numbers = line[line.index(after: colon)...].split(separator: " ").compactMap { UInt64($0) }
            guard numbers.count >= 9 else { continue }
            received &+= numbers[0]
            sent &+= numbers[8]
        }
        return (received, sent)
    }

    /// Bytes read and written by the whole disks (those in /sys/block that are not loop or RAM devices).
    private static func disks() -> (UInt64, UInt64) {
        var read: UInt64 = 0
        var written: UInt64 = 0
        for line in (Self.text(of: "/proc/diskstats") ?? "").split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard parts.count >= 10 else { continue }
            let name = parts[2]
            guard !name.hasPrefix("loop"), !name.hasPrefix("ram"), access("/sys/block/\(name)", F_OK) == 0 else {
                continue
            }
            read &+= (UInt64(parts[5]) ?? 0) &* 512
            written &+= (UInt64(parts[9]) ?? 0) &* 512
        }
        return (read, written)
    }

    /// A small file's text, nil when it cannot be read.
    private static func text(of path: String) -> String? {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return nil }
        defer { close(descriptor) }
        return String(decoding: readToEnd(descriptor, limit: 1 << 20).bytes, as: UTF8.self)
    }

    private static var hostName: String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "" }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    #if os(Linux)
    private static let operatingSystem = "linux"
    #else
    private static let operatingSystem = "darwin"
    #endif
    #if arch(x86_64)
    private static let architecture = "amd64"
    #elseif arch(arm64)
    private static let architecture = "arm64"
    #else
    private static let architecture = "unknown"
    #endif
}

/// `GET …/info`: NodePass 1.14's fields.
struct MasterInfo: Encodable {
    var mid: String
    var alias: String
    var os: String
    var arch: String
    var cpu: Int
    var memTotal: UInt64
    var memUsed: UInt64
    var swapTotal: UInt64
    var swapUsed: UInt64
    var netrx: UInt64
    var nettx: UInt64
    var diskr: UInt64
    var diskw: UInt64
    var sysup: Int
    var ver: String
    var name: String
    var uptime: Int
    var log: String
    var tls: String
    var crt: String
    var key: String

    enum CodingKeys: String, CodingKey {
        case mid, alias, os, arch, cpu, netrx, nettx, diskr, diskw, sysup, ver, name, uptime, log, tls, crt, key
        case memTotal = "mem_total"
        case memUsed = "mem_used"
        case swapTotal = "swap_total"
        case swapUsed = "swap_used"
    }
}

/// `GET …/tcping`: `error` is null on success.
struct TCPingResult: Encodable {
    var target: String
    var connected: Bool
    var latency: Int
    var error: String?

    enum CodingKeys: String, CodingKey {
        case target, connected, latency, error
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(self.target, forKey: .target)
        try container.encode(self.connected, forKey: .connected)
        try container.encode(self.latency, forKey: .latency)
        try container.encode(self.error, forKey: .error)
    }
}
