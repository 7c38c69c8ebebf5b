/// A host and a TCP port, as written in a tunnel URL: `127.0.0.1:80`, `[::1]:80`, `example.com:80` or `:80`.
public struct HostPort: Hashable, Sendable, CustomStringConvertible {
    /// The host: a name, an IPv4 address, an IPv6 address without brackets, or empty for "all interfaces".
    public var host: String
    /// The TCP port, 1 to 65535.
    public var port: Int

    /// Makes an address from its parts.
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// True when the host is an IPv6 address.
    public var isIPv6: Bool {
        self.host.contains(":")
    }

    /// The address as written in a URL, with brackets around an IPv6 host.
    public var description: String {
        self.isIPv6 ? "[\(self.host)]:\(self.port)" : "\(self.host):\(self.port)"
    }

    /// The host to dial: an empty host means this machine.
    public var dialHost: String {
        self.host.isEmpty ? "localhost" : self.host
    }

    /// Parses `host:port`, `[v6]:port` or `:port`; `what` names the part in error messages.
    public static func parse(_ text: Substring, what: String) throws(NodePassError) -> HostPort {
        let host: Substring
        let portText: Substring
        if text.first == "[" {
            guard let close = text.firstIndex(of: "]") else {
                throw NodePassError(.invalidURL, "\(what) '\(text)': IPv6 address has no closing ']'")
            }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.first == ":" else {
                throw NodePassError(.invalidURL, "\(what) '\(text)': missing ':PORT' after the IPv6 address")
            }
            portText = rest.dropFirst()
            guard !host.isEmpty, host.allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }) else {
                throw NodePassError(.invalidURL, "\(what) '\(text)': '\(host)' is not an IPv6 address")
            }
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                throw NodePassError(.invalidURL, "\(what) '\(text)': missing ':PORT'")
            }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            guard host.allSatisfy({ Self.isHostNameCharacter($0) }) else {
                throw NodePassError(
                    .invalidURL,
                    "\(what) '\(text)': host '\(host)' has characters a host name cannot have "
                        + "(write an IPv6 address as [addr]:port)"
                )
            }
        }
        guard !portText.isEmpty else {
            throw NodePassError(.invalidURL, "\(what) '\(text)': missing port number after ':'")
        }
        guard let port = Self.port(portText) else {
            throw NodePassError(.invalidURL, "\(what) '\(text)': port '\(portText)' is not a number from 1 to 65535")
        }
        return HostPort(host: String(host), port: port)
    }

    /// A TCP or UDP port written in decimal digits only, 1 to 65535; nil for anything else.
    public static func port(_ text: Substring) -> Int? {
        guard text.count <= 5, text.allSatisfy({ $0.isASCII && $0.isNumber }), let port = Int(text),
            (1...65535).contains(port)
        else { return nil }
        return port
    }

    private static func isHostNameCharacter(_ c: Character) -> Bool {
        guard c.isASCII else { return false }
        return c.isLetter || c.isNumber || c == "." || c == "-" || c == "_"
    }
}
