import NIOCore

/// Which side has the users and which side dials the target.
public enum TunnelMode: UInt8, Hashable, Sendable, CaseIterable {
    /// The server decides at start: reverse when it can listen on its TARGET, forward otherwise.
    case auto = 0
    /// Users connect to the server's TARGET; the client dials its TARGET (as v1).
    case reverse = 1
    /// Users connect to the client's TARGET; the server dials its TARGET.
    case forward = 2
}

/// How v2 data (pool) connections are protected.
public enum DataTLSMode: UInt8, Hashable, Sendable, CaseIterable {
    /// Plain TCP after an authenticated opening: the data is not encrypted.
    case plain = 0
    /// TLS with the server's in-memory certificate, pinned by the client.
    case inMemory = 1
    /// TLS with the certificate and key from the `crt=` and `key=` files, pinned by the client.
    case files = 2
    /// On the wire only (never on a URL): what `tls=1` becomes with a client that negotiated `nodepass/2.2`,
    /// records sealed with keys from the session secret (`V2PoolSeal`), no TLS and no certificate.
    case sealed = 3

    /// Whether pool connections run TLS, so that the parameters name the certificate's fingerprint.
    public var hasCertificate: Bool { self == .inMemory || self == .files }
}

/// What a tunnel carries (`nodepass/2.1`): the server's `notcp=1` and `noudp=1` clear a member.
public struct TunnelTransports: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8

    public init(rawValue: UInt8) {
        self.rawValue = rawValue
    }

    /// TCP connections, each over a pool connection of its own.
    public static let tcp = TunnelTransports(rawValue: 1)
    /// UDP datagrams, over a datagram carrier.
    public static let udp = TunnelTransports(rawValue: 2)
}

extension TunnelTransports: CustomStringConvertible {
    /// `tcp+udp`, `tcp`, `udp` or `none`.
    public var description: String {
        let names = [self.contains(.tcp) ? "tcp" : nil, self.contains(.udp) ? "udp" : nil].compactMap { $0 }
        return names.isEmpty ? "none" : names.joined(separator: "+")
    }
}

/// What the server tells an authenticated client in its `welcome` message.
public struct V2SessionParameters: Hashable, Sendable {
    /// Length of a session ID in bytes.
    public static let sessionIDLength = 16
    /// Length of a certificate fingerprint (SHA-256) in bytes.
    public static let fingerprintLength = 32

    /// The direction of this tunnel (never `.auto` on the wire).
    public var mode: TunnelMode
    /// How data connections are protected.
    public var tls: DataTLSMode
    /// The server's pool port.
    public var poolPort: Int
    /// The server's heartbeat period, in milliseconds; both sides send heartbeats this often.
    public var heartbeatMilliseconds: UInt32
    /// The ID the client names when it opens a pool connection.
    public var sessionID: [UInt8]
    /// SHA-256 of the data connections' certificate (DER); empty when `tls` is `.plain`.
    public var dataFingerprint: [UInt8]
    /// `nodepass/2.1`: what the tunnel carries (one more byte); nil under `nodepass/2` (TCP only).
    public var transports: TunnelTransports?
    /// `nodepass/2.3`: relays resume on a new pool connection after a break (bit 2 of the transports byte).
    public var resumes = false

    /// The bit of the transports byte that says relays resume (`nodepass/2.3`).
    static let resumeBit: UInt8 = 4

    /// Makes parameters.
    public init(
        mode: TunnelMode,
        tls: DataTLSMode,
        poolPort: Int,
        heartbeatMilliseconds: UInt32,
        sessionID: [UInt8],
        dataFingerprint: [UInt8],
        transports: TunnelTransports? = nil,
        resumes: Bool = false
    ) {
        self.mode = mode
        self.tls = tls
        self.poolPort = poolPort
        self.heartbeatMilliseconds = heartbeatMilliseconds
        self.sessionID = sessionID
        self.dataFingerprint = dataFingerprint
        self.transports = transports
        self.resumes = resumes
    }

    /// The encoded length: 24 bytes, plus 32 with a fingerprint, plus 1 with the transports.
    public var encodedLength: Int {
        8 + Self.sessionIDLength + (self.tls.hasCertificate ? Self.fingerprintLength : 0)
            + (self.transports == nil ? 0 : 1)
    }

    /// Writes mode (1), tls (1), pool port (2), heartbeat ms (4), session ID (16), fingerprint (32, only
    /// when tls is 1 or 2), transports (1, `nodepass/2.1` and later, with the resume bit under `nodepass/2.3`);
    /// integers big-endian.
    public func write(to buffer: inout ByteBuffer) {
        buffer.writeInteger(self.mode.rawValue)
        buffer.writeInteger(self.tls.rawValue)
        buffer.writeInteger(UInt16(truncatingIfNeeded: self.poolPort))
        buffer.writeInteger(self.heartbeatMilliseconds)
        buffer.writeBytes(self.sessionID)
        if self.tls.hasCertificate {
            buffer.writeBytes(self.dataFingerprint)
        }
        if let transports = self.transports {
            buffer.writeInteger(transports.rawValue | (self.resumes ? Self.resumeBit : 0))
        }
    }

    /// The encoded bytes.
    public var bytes: [UInt8] {
        var buffer = ByteBuffer()
        self.write(to: &buffer)
        return Array(buffer.readableBytesView)
    }

    /// Reads parameters that fill `buffer` exactly, ending with the transports byte when `withTransports`
    /// (`nodepass/2.1` and later), naming sealed pool connections only when `allowsSealed` (`nodepass/2.2`),
    /// resumable relays only when `allowsResume` (`nodepass/2.3`); throws `.protocolViolation` otherwise.
    public static func read(
        from buffer: inout ByteBuffer,
        withTransports: Bool = false,
        allowsSealed: Bool = false,
        allowsResume: Bool = false
    ) throws(NodePassError) -> V2SessionParameters {
        guard let modeByte = buffer.readInteger(as: UInt8.self),
            let tlsByte = buffer.readInteger(as: UInt8.self),
            let port = buffer.readInteger(as: UInt16.self),
            let heartbeat = buffer.readInteger(as: UInt32.self),
            let sessionID = buffer.readBytes(length: Self.sessionIDLength)
        else {
            throw NodePassError(.protocolViolation, "welcome parameters are too short")
        }
        guard let mode = TunnelMode(rawValue: modeByte), mode != .auto else {
            throw NodePassError(.protocolViolation, "welcome names an unknown mode \(modeByte)")
        }
        guard let tls = DataTLSMode(rawValue: tlsByte) else {
            throw NodePassError(.protocolViolation, "welcome names an unknown tls setting \(tlsByte)")
        }
        guard port != 0 else {
            throw NodePassError(.protocolViolation, "welcome names pool port 0")
        }
        guard heartbeat >= 10, heartbeat <= 86_400_000 else {
            throw NodePassError(.protocolViolation, "welcome names a heartbeat of \(heartbeat) ms")
        }
        var fingerprint: [UInt8] = []
        guard tls != .sealed || allowsSealed else {
            throw NodePassError(.protocolViolation, "welcome names sealed pool connections without nodepass/2.2")
        }
        if tls.hasCertificate {
            guard let bytes = buffer.readBytes(length: Self.fingerprintLength) else {
                throw NodePassError(.protocolViolation, "welcome lacks the data certificate fingerprint")
            }
            fingerprint = bytes
        }
        var transports: TunnelTransports?
        var resumes = false
        if withTransports {
            guard var byte = buffer.readInteger(as: UInt8.self) else {
                throw NodePassError(.protocolViolation, "welcome lacks what the tunnel carries")
            }
            if allowsResume {
                resumes = byte & Self.resumeBit != 0
                byte &= ~Self.resumeBit
            }
            let carried = TunnelTransports(rawValue: byte)
            guard !carried.isEmpty, carried.isSubset(of: [.tcp, .udp]) else {
                throw NodePassError(.protocolViolation, "welcome says the tunnel carries \(byte)")
            }
            transports = carried
        }
        guard buffer.readableBytes == 0 else {
            throw NodePassError(.protocolViolation, "welcome parameters have \(buffer.readableBytes) extra bytes")
        }
        return V2SessionParameters(
            mode: mode,
            tls: tls,
            poolPort: Int(port),
            heartbeatMilliseconds: heartbeat,
            sessionID: sessionID,
            dataFingerprint: fingerprint,
            transports: transports,
            resumes: resumes
        )
    }
}
