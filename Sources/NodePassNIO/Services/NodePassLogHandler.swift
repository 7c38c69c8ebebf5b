import Logging
import NIOConcurrencyHelpers
import NIOCore
import NodePassCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Prints log records in NodePass's line format to standard output:
/// `YYYY-MM-DD HH:MM:SS.mmm  LEVEL  message key=value ...`, the level word in colour on a terminal only, a
/// value in quotes when it holds a space, `=` or a control character (`LogValue`).
/// A master's instances add ` [ID]` to their lines and hand each line (without colour) to `copy` as well.
/// Lines at info, warn and error are written at most 10 times every 10 s for one message (and instance);
/// the next one written carries `np.unlogged=N`, the number left out (`RepeatedLineBudget`).
public struct NodePassLogHandler: LogHandler {
    private static let outputLock = NIOLock()
    /// Shared by every handler of the process (each `Logger` holds its own copy of the handler).
    private static let repeatedLines = NIOLockedValueBox(RepeatedLineBudget())

    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let colour: Bool
    private let suffix: String
    private let copy: (@Sendable (String) -> Void)?

    /// A handler at `level`; `suffix` ends every line, `copy` gets every line as well.
    public init(level: LogLevel, colour: Bool, suffix: String = "", copy: (@Sendable (String) -> Void)? = nil) {
        self.logLevel = Self.loggerLevel(level)
        self.colour = colour
        self.suffix = suffix
        self.copy = copy
    }

    /// swift-log's level for a `log=` level.
    public static func loggerLevel(_ level: LogLevel) -> Logger.Level {
        switch level {
        case .debug: .debug
        case .info: .info
        case .warn: .warning
        case .error: .error
        case .fatal: .critical
        }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var text = "  \(event.message)"
        var all = self.metadata
        if let provided = self.metadataProvider?.get() { all.merge(provided) { $1 } }
        if let extra = event.metadata { all.merge(extra) { $1 } }
        // A flood of one line (refused peers, unknown launches) is cut to a few lines every 10 s; the next
        // line written counts the ones left out. Debug lines (asked for) and fatal ones are all written.
        if event.level != .trace && event.level != .debug && event.level != .critical {
            let kind = "\(event.message)\(self.suffix)"
            guard let unwritten = Self.repeatedLines.withLockedValue({ $0.lineArrived(kind, now: .now()) }) else {
                return
            }
            if unwritten > 0 { all["np.unlogged"] = "\(unwritten)" }
        }
        for key in all.keys.sorted() {
            text += " \(key)=\(LogValue.format(all[key].map { "\($0)" } ?? ""))"
        }
        text += self.suffix
        let timestamp = Self.timestamp()
        let line = "\(timestamp)  \(self.levelWord(event.level, colour: self.colour))\(text)\n"
        Self.outputLock.withLock {
            writeAll(line, to: STDOUT_FILENO)
        }
        if let copy = self.copy {
            copy(
                self.colour
                    ? "\(timestamp)  \(self.levelWord(event.level, colour: false))\(text)" : String(line.dropLast())
            )
        }
    }

    private func levelWord(_ level: Logger.Level, colour: Bool) -> String {
        let (word, code): (String, String) =
            switch level {
            case .trace, .debug: ("DEBUG", "34")
            case .info, .notice: ("INFO", "32")
            case .warning: ("WARN", "33")
            case .error: ("ERROR", "31")
            case .critical: ("FATAL", "35")
            }
        return colour ? "\u{1B}[\(code)m\(word)\u{1B}[0m" : word
    }

    /// The local time now: `YYYY-MM-DD HH:MM:SS.mmm`.
    private static func timestamp() -> String {
        wallClock(utc: false, separator: " ", fractionDigits: 3)
    }
}

/// The time now as `YYYY-MM-DD` `separator` `HH:MM:SS.fraction`, in UTC or local time, with `fractionDigits`
/// digits (1 to 9) of the second.
public func wallClock(utc: Bool, separator: String, fractionDigits: Int) -> String {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    var seconds = now.tv_sec
    var parts = tm()
    if utc { gmtime_r(&seconds, &parts) } else { localtime_r(&seconds, &parts) }
    func pad(_ value: Int, _ width: Int) -> String {
        let text = String(value)
        return String(repeating: "0", count: max(0, width - text.count)) + text
    }
    let digits = min(max(fractionDigits, 1), 9)
    var fraction = Int(now.tv_nsec)
    for _ in digits..<9 { fraction /= 10 }
    return "\(pad(Int(parts.tm_year) + 1900, 4))-\(pad(Int(parts.tm_mon) + 1, 2))-\(pad(Int(parts.tm_mday), 2))"
        + "\(separator)\(pad(Int(parts.tm_hour), 2)):\(pad(Int(parts.tm_min), 2)):\(pad(Int(parts.tm_sec), 2))"
        + ".\(pad(fraction, digits))"
}

/// Writes all of `text` to the file descriptor, retrying short writes; gives up on an error.
public func writeAll(_ text: String, to descriptor: Int32) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { return }
        bytes = bytes.dropFirst(written)
    }
}
