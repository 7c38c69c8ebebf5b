/// How a value appears after `key=` in a log line.
///
/// Values come from peers too (an error's text, a failure's words), so a value must not be able to pass for
/// more fields or more lines: one that holds a space, `=`, a quote, a backslash or a control character is
/// written in double quotes, with `"` and `\` escaped and control characters as `\n`, `\r`, `\t` or
/// `\u{XX}`. Anything else is written as it is, so `np.peer=127.0.0.1:4000` stays as readers know it.
public enum LogValue {
    /// `value` as it is written after `key=`.
    public static func format(_ value: String) -> String {
        guard value.isEmpty || value.unicodeScalars.contains(where: Self.needsQuotes) else { return value }
        var quoted = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": quoted += "\\\""
            case "\\": quoted += "\\\\"
            case "\n": quoted += "\\n"
            case "\r": quoted += "\\r"
            case "\t": quoted += "\\t"
            case _ where Self.isControl(scalar):
                quoted += "\\u{\(String(scalar.value, radix: 16, uppercase: true))}"
            default: quoted.unicodeScalars.append(scalar)
            }
        }
        return quoted + "\""
    }

    private static func needsQuotes(_ scalar: Unicode.Scalar) -> Bool {
        scalar == " " || scalar == "=" || scalar == "\"" || scalar == "\\" || Self.isControl(scalar)
            || scalar.properties.isWhitespace
    }

    /// C0 and C1 controls, DEL, and the line and paragraph separators.
    private static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) || scalar.value == 0x2028
            || scalar.value == 0x2029
    }
}
