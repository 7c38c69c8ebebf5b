import Logging
import NIOConcurrencyHelpers
import NodePassCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Prints log records in NodePass's line format to standard output:
/// `YYYY-MM-DD HH:MM:SS.mmm  LEVEL  message key=value ...`, the level word in colour on a terminal only.
struct NodePassLogHandler: LogHandler {
    private static let outputLock = NIOLock()

    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?
    private let colour: Bool

    init(level: LogLevel, colour: Bool) {
        self.logLevel = Self.loggerLevel(level)
        self.colour = colour
    }

    static func loggerLevel(_ level: LogLevel) -> Logger.Level {
        switch level {
        case .debug: .debug
        case .info: .info
        case .warn: .warning
        case .error: .error
        case .fatal: .critical
        }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var line = Self.timestamp()
        line += "  "
        line += self.levelWord(event.level)
        line += "  "
        line += "\(event.message)"
        var all = self.metadata
        if let provided = self.metadataProvider?.get() { all.merge(provided) { $1 } }
        if let extra = event.metadata { all.merge(extra) { $1 } }
        for key in all.keys.sorted() {
            line += " \(key)=\(all[key].map { "\($0)" } ?? "")"
        }
        line += "\n"
        Self.outputLock.withLock {
            writeAll(line, to: STDOUT_FILENO)
        }
    }

    private func levelWord(_ level: Logger.Level) -> String {
        let (word, code): (String, String) =
            switch level {
            case .trace, .debug: ("DEBUG", "34")
            case .info, .notice: ("INFO", "32")
            case .warning: ("WARN", "33")
            case .error: ("ERROR", "31")
            case .critical: ("FATAL", "35")
            }
        return self.colour ? "\u{1B}[\(code)m\(word)\u{1B}[0m" : word
    }

    private static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = now.tv_sec
        var parts = tm()
        localtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int) -> String {
            let text = String(value)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        let millis = Int32(now.tv_nsec / 1_000_000)
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2)) "
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(millis, 3))"
    }
}

/// Writes all of `text` to the file descriptor, retrying short writes; gives up on an error.
func writeAll(_ text: String, to descriptor: Int32) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { return }
        bytes = bytes.dropFirst(written)
    }
}
