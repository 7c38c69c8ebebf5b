import NIOCore
import NIOSSL
import NodePassCore

/// The protocol a server speaks, chosen once when it starts: v1 without a key, v2 with one.
enum ServerProtocol: Sendable {
    case v1
    case v2(V2)

    /// What a v2 server needs at run time.
    struct V2: Sendable {
        /// The stretched key.
        var key: V2Key
        /// The direction the server chose at start (never `.auto`).
        var mode: TunnelMode
        /// How data connections are protected.
        var tls: DataTLSMode
        /// The TLS server context of data connections; nil with `tls=0`.
        var dataTLS: NIOSSLContext?
        /// SHA-256 of the data connections' certificate (DER); empty with `tls=0`.
        var dataFingerprint: [UInt8]
        /// What the tunnel carries for clients of `nodepass/2.1` (`notcp=1`, `noudp=1`).
        var transports: TunnelTransports
        /// Relays resume for clients of `nodepass/2.3` (`resume=1`).
        var resume = false
    }

    /// The protocol `url` selects, in reverse mode until the server chooses (`chooseForward`). `certificate`
    /// is the in-memory certificate (`tls=1`); `tls=2` loads the `crt=` and `key=` files.
    init(url: TunnelURL, certificate: InMemoryCertificate) throws {
        guard let keyText = url.key else {
            self = .v1
            return
        }
        let key = try V2Key(keyText)
        var dataTLS: NIOSSLContext?
        var fingerprint: [UInt8] = []
        switch url.effectiveDataTLS {
        case .plain, .sealed:
            break
        case .inMemory:
            dataTLS = try certificate.makeServerContext()
            fingerprint = certificate.fingerprint
        case .files:
            let loaded = try FileCertificate.load(
                certificateFile: url.certificateFile ?? "",
                privateKeyFile: url.privateKeyFile ?? ""
            )
            (dataTLS, fingerprint) = (loaded.context, loaded.fingerprint)
        }
        self = .v2(
            V2(
                key: key,
                mode: .reverse,
                tls: url.effectiveDataTLS,
                dataTLS: dataTLS,
                dataFingerprint: fingerprint,
                transports: url.transports,
                resume: url.resume
            )
        )
    }

    /// What the tunnel carries at most: v1 TCP only.
    var transports: TunnelTransports {
        guard case .v2(let v2) = self else { return [.tcp] }
        return v2.transports
    }

    /// The ALPN protocols the control channel's TLS accepts, preferred first.
    static let alpn = V2Message.alpnNames

    /// Which side has the users: the client in v2 forward mode, else the server.
    var mode: TunnelMode {
        guard case .v2(let v2) = self else { return .reverse }
        return v2.mode
    }

    var isV2: Bool {
        if case .v2 = self { return true }
        return false
    }

    /// The server cannot listen for UDP: the tunnel carries TCP only.
    mutating func turnOffDatagrams() {
        guard case .v2(var v2) = self else { return }
        v2.transports.remove(.udp)
        self = .v2(v2)
    }

    /// The server dials its TARGET and clients have the users (v2 only: v1 stays in reverse mode).
    mutating func chooseForward() {
        guard case .v2(var v2) = self else { return }
        v2.mode = .forward
        self = .v2(v2)
    }
}

/// The protocol a client speaks, chosen once when it starts: v1 without a key, v2 with one.
enum ClientProtocol: Sendable {
    case v1
    /// v2: the stretched key, and the TLS client context of data connections (unless the server says `tls=0`).
    case v2(key: V2Key, dataTLS: NIOSSLContext)

    /// The protocol `url` selects.
    init(url: TunnelURL) throws {
        guard let keyText = url.key else {
            self = .v1
            return
        }
        self = .v2(key: try V2Key(keyText), dataTLS: try TLSClientContext.makeForPinning())
    }

    var isV2: Bool {
        if case .v2 = self { return true }
        return false
    }

    /// The ALPN protocols the client offers: v2 with UDP first, then v2; none for v1.
    var alpn: [String] { self.isV2 ? ServerProtocol.alpn : [] }

    /// v2: the TLS client context of data connections.
    var dataTLS: NIOSSLContext? {
        guard case .v2(_, let dataTLS) = self else { return nil }
        return dataTLS
    }
}
