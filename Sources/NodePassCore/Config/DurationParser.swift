import NIOCore

/// Parses durations written as in `5s`, `500ms`, `1m30s`, `1.5s` (units: ns, us, ms, s, m, h).
public enum DurationParser {
    /// The longest duration accepted (one day), so that no arithmetic can overflow.
    public static let maximum = TimeAmount.hours(24)

    /// Parses `text`, or returns nil when it is not a duration of at most one day.
    public static func parse(_ text: String) -> TimeAmount? {
        guard !text.isEmpty, text.utf8.count <= 64 else { return nil }
        var bytes = Substring(text).utf8[...]
        var totalNanos: Double = 0
        while !bytes.isEmpty {
            let number = bytes.prefix {
                ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: ".")
            }
            guard !number.isEmpty, let value = Double(String(decoding: number, as: UTF8.self)) else { return nil }
            bytes = bytes.dropFirst(number.count)
            let unit = bytes.prefix {
                !(($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: "."))
            }
            bytes = bytes.dropFirst(unit.count)
            let scale: Double
            switch String(decoding: unit, as: UTF8.self) {
            case "ns": scale = 1
            case "us", "µs": scale = 1e3
            case "ms": scale = 1e6
            case "s": scale = 1e9
            case "m": scale = 60e9
            case "h": scale = 3600e9
            default: return nil
            }
            totalNanos += value * scale
            guard totalNanos <= Double(Self.maximum.nanoseconds) else { return nil }
        }
        return .nanoseconds(Int64(totalNanos))
    }

    /// Formats a duration the way it can be written back: `5s`, `250ms`.
    public static func format(_ amount: TimeAmount) -> String {
        let nanos = amount.nanoseconds
        if nanos % 1_000_000_000 == 0 { return "\(nanos / 1_000_000_000)s" }
        if nanos % 1_000_000 == 0 { return "\(nanos / 1_000_000)ms" }
        if nanos % 1_000 == 0 { return "\(nanos / 1_000)us" }
        return "\(nanos)ns"
    }
}
