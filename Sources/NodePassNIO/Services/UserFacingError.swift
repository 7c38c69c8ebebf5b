import NIOCore
import NIOPosix
import NIOSSL
import NodePassCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Errors in the words of the person who runs the tunnel: what happened, as `ss`, `curl` or an
/// administrator would say it ("connection refused", "name not found"), without SwiftNIO's or BoringSSL's
/// type names, which stay in the debug log.
public enum UserFacingError {
    /// What `error` means, in a few words; a `NodePassError` keeps its message and explains its cause.
    public static func describe(_ error: any Error) -> String {
        switch error {
        case let error as NodePassError:
            guard let underlying = error.underlying else { return error.message }
            return "\(error.message): \(Self.describe(underlying))"
        case let error as IOError:
            return Self.describe(errno: error.errnoCode)
        case let error as NIOConnectionError:
            // Every address was tried (IPv6 and IPv4): the most telling failure is one other than an address
            // family this machine cannot reach at all.
            let failures = error.connectionErrors.map(\.error)
            let telling = failures.first { failure in
                guard let code = (failure as? IOError)?.errnoCode else { return true }
                return code != ENETUNREACH && code != EADDRNOTAVAIL && code != EAFNOSUPPORT
            }
            if let failure = telling ?? failures.first { return Self.describe(failure) }
            if let lookup = error.dnsAError ?? error.dnsAAAAError { return Self.describe(lookup) }
            return "the name has no address"
        case let error as SocketAddressError.UnknownHost:
            return Self.describe(lookupCode: error.errorCode, text: error.errorDescription)
        case ChannelError.connectTimeout(let limit):
            return "timed out after \(DurationParser.format(limit))"
        case ChannelError.eof, ChannelError.ioOnClosedChannel, ChannelError.alreadyClosed:
            return "the connection closed"
        case let error as NIOSSLError:
            return Self.describe(tls: error)
        case let error as BoringSSLError:
            return Self.describe(boringSSL: error)
        default:
            return "\(error)"
        }
    }

    /// A system error number in lower case, as `strerror` says it.
    static func describe(errno code: Int32) -> String {
        switch code {
        case EMFILE, ENFILE:
            return "too many open files"
        case ETIMEDOUT:
            return "timed out"
        default:
            guard let text = strerror(code) else { return "system error \(code)" }
            return Self.lowercasingFirst(String(cString: text))
        }
    }

    /// A name look-up failure (`getaddrinfo`'s code and text).
    static func describe(lookupCode code: Int, text: String) -> String {
        switch Int32(code) {
        case EAI_NONAME: "name not found"
        case EAI_AGAIN: "the name could not be looked up now (is a DNS server reachable?)"
        default: Self.lowercasingFirst(text)
        }
    }

    private static func describe(tls error: NIOSSLError) -> String {
        switch error {
        case .handshakeFailed(let cause): Self.describe(boringSSL: cause)
        case .uncleanShutdown: "the other side closed the connection without closing TLS"
        default: "TLS error (\(error))"
        }
    }

    /// BoringSSL names its reasons in upper case (`error:…:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER`);
    /// the common ones are said in words, the others by that name.
    private static func describe(boringSSL error: BoringSSLError) -> String {
        let text = "\(error)"
        let reasons: [(marker: String, words: String)] = [
            ("WRONG_VERSION_NUMBER", "the other side does not speak TLS"),
            ("HTTP_REQUEST", "the other side does not speak TLS"),
            ("PACKET_LENGTH_TOO_LONG", "the other side does not speak TLS"),
            ("NO_APPLICATION_PROTOCOL", "the other side does not speak a NodePass protocol"),
            ("CERTIFICATE_VERIFY_FAILED", "the certificate is not the one expected"),
            ("HANDSHAKE_FAILURE", "the other side refused the TLS handshake"),
            ("EOF during handshake", "the connection closed during the TLS handshake"),
        ]
        if let known = reasons.first(where: { text.contains($0.marker) }) { return known.words }
        guard let reason = Self.boringSSLReason(text) else { return "TLS error" }
        return "TLS error (\(reason))"
    }

    /// The reason of BoringSSL's first error: the upper-case word after `OPENSSL_internal:`, in lower case.
    private static func boringSSLReason(_ text: String) -> String? {
        guard let range = text.firstRange(of: "OPENSSL_internal:") else { return nil }
        let reason = text[range.upperBound...].prefix { $0.isUppercase || $0.isNumber || $0 == "_" }
        guard !reason.isEmpty else { return nil }
        return String(reason.lowercased().map { $0 == "_" ? " " : $0 })
    }

    private static func lowercasingFirst(_ text: String) -> String {
        guard let first = text.first else { return text }
        // Keep acronyms ("TLS …") as they are.
        if text.dropFirst().first?.isUppercase == true { return text }
        return first.lowercased() + text.dropFirst()
    }
}
