import Crypto
import Foundation
import NIOCore
import NIOSSL
import NodePassCore
import SwiftASN1
import X509

/// A self-signed certificate and its key, made in memory at start; nothing touches the disk.
struct InMemoryCertificate: Sendable {
    /// The certificate, as NIOSSL takes it.
    let certificate: NIOSSLCertificate
    /// The private key, as NIOSSL takes it.
    let privateKey: NIOSSLPrivateKey
    /// How long a closing TLS connection waits for the peer's close_notify (the control channel carries
    /// nothing that needs it, and a shutdown must not wait for a silent peer).
    static let closeNotifyWait = TimeAmount.milliseconds(250)

    /// SHA-256 of the certificate's DER bytes.
    let fingerprint: [UInt8]

    /// Makes a fresh ECDSA P-256 certificate valid for one year, subject `O=nodepass-swift:VERSION`.
    static func generate() throws(NodePassError) -> InMemoryCertificate {
        do {
            let key = P256.Signing.PrivateKey()
            let name = try DistinguishedName {
                OrganizationName("nodepass-swift:\(NodePassVersion.current)")
            }
            let now = Date()
            let certificate = try Certificate(
                version: .v3,
                serialNumber: Certificate.SerialNumber(),
                publicKey: Certificate.PublicKey(key.publicKey),
                notValidBefore: now.addingTimeInterval(-3600),
                notValidAfter: now.addingTimeInterval(365 * 24 * 3600),
                issuer: name,
                subject: name,
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.notCertificateAuthority)
                },
                issuerPrivateKey: Certificate.PrivateKey(key)
            )
            var serializer = DER.Serializer()
            try serializer.serialize(certificate)
            let der = serializer.serializedBytes
            return InMemoryCertificate(
                certificate: try NIOSSLCertificate(bytes: der, format: .der),
                privateKey: try NIOSSLPrivateKey(bytes: Array(key.derRepresentation), format: .der),
                fingerprint: Array(SHA256.hash(data: der))
            )
        } catch {
            throw NodePassError(.tls, "cannot make the in-memory TLS certificate", underlying: error)
        }
    }

    /// A TLS server context presenting this certificate (TLS 1.2 and 1.3), offering `applicationProtocols`
    /// by ALPN (the control channel offers `nodepass/2`, so that both v1 and v2 servers recognise a v2 client).
    func makeServerContext(applicationProtocols: [String] = []) throws(NodePassError) -> NIOSSLContext {
        try Self.makeServerContext(
            chain: [.certificate(self.certificate)],
            key: .privateKey(self.privateKey),
            applicationProtocols: applicationProtocols
        )
    }

    static func makeServerContext(
        chain: [NIOSSLCertificateSource],
        key: NIOSSLPrivateKeySource,
        applicationProtocols: [String] = []
    ) throws(NodePassError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: key)
        configuration.minimumTLSVersion = .tlsv12
        configuration.shutdownTimeout = Self.closeNotifyWait
        configuration.applicationProtocols = applicationProtocols
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw NodePassError(.tls, "cannot set up the TLS server", underlying: error)
        }
    }
}

/// The certificate of v2 data connections with `tls=2`, read from the `crt=` and `key=` PEM files.
struct FileCertificate: Sendable {
    /// The certificate chain and the private key, as read.
    let chain: [NIOSSLCertificate]
    let key: NIOSSLPrivateKey
    /// A TLS server context presenting the chain.
    let context: NIOSSLContext
    /// SHA-256 of the leaf certificate's DER bytes (the client pins it).
    let fingerprint: [UInt8]

    /// Reads and checks both files; a missing, unreadable or mismatched file is an error naming it.
    static func load(certificateFile: String, privateKeyFile: String) throws(NodePassError) -> FileCertificate {
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificateFile)
        } catch {
            throw NodePassError(
                .fileUnreadable,
                "cannot read the certificate file crt=\(certificateFile)",
                underlying: error
            )
        }
        guard let leaf = chain.first, let der = try? leaf.toDERBytes() else {
            throw NodePassError(.fileUnreadable, "the certificate file crt=\(certificateFile) holds no certificate")
        }
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(file: privateKeyFile, format: .pem)
        } catch {
            throw NodePassError(
                .fileUnreadable,
                "cannot read the private key file key=\(privateKeyFile)",
                underlying: error
            )
        }
        let context: NIOSSLContext
        do {
            context = try InMemoryCertificate.makeServerContext(
                chain: chain.map { .certificate($0) },
                key: .privateKey(key)
            )
        } catch {
            throw NodePassError(
                .fileUnreadable,
                "the certificate crt=\(certificateFile) and the key key=\(privateKeyFile) do not make a TLS server",
                underlying: error
            )
        }
        return FileCertificate(chain: chain, key: key, context: context, fingerprint: Array(SHA256.hash(data: der)))
    }
}

/// TLS client contexts.
enum TLSClientContext {
    /// A control-channel client context: TLS 1.2 or 1.3, no certificate check (v1 has nothing to check it
    /// against; v2 binds its handshake to the certificate instead), offering `applicationProtocols` by ALPN.
    static func makeUnverified(applicationProtocols: [String] = []) throws(NodePassError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.certificateVerification = .none
        configuration.applicationProtocols = applicationProtocols
        configuration.shutdownTimeout = InMemoryCertificate.closeNotifyWait
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw NodePassError(.tls, "cannot set up the TLS client", underlying: error)
        }
    }

    /// A v2 data-connection client context: the handler's verification callback pins the certificate's
    /// fingerprint (verification must not be `.none`, or the callback is never called).
    static func makeForPinning() throws(NodePassError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.certificateVerification = .noHostnameVerification
        configuration.trustRoots = .certificates([])
        configuration.shutdownTimeout = InMemoryCertificate.closeNotifyWait
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw NodePassError(.tls, "cannot set up the TLS client", underlying: error)
        }
    }
}

/// The TLS of a master's API: `tls=1` a certificate made in memory at start, `tls=2` the `crt=` and `key=`
/// files. `fingerprint` (SHA-256 of the certificate, as `openssl x509 -fingerprint -sha256` prints it) is
/// for the start-up log, so that an operator can check what a client is shown.
public struct APITLS: Sendable {
    public let configuration: TLSConfiguration
    public let fingerprint: String

    public static func make(
        mode: DataTLSMode,
        certificateFile: String?,
        privateKeyFile: String?
    ) throws(NodePassError) -> APITLS? {
        let chain: [NIOSSLCertificate]
        let key: NIOSSLPrivateKey
        let digest: [UInt8]
        switch mode {
        case .plain, .sealed:
            return nil
        case .inMemory:
            let certificate = try InMemoryCertificate.generate()
            (chain, key, digest) = ([certificate.certificate], certificate.privateKey, certificate.fingerprint)
        case .files:
            guard let certificateFile, let privateKeyFile else {
                throw NodePassError(.invalidURL, "tls=2 needs both crt=CERTIFICATE.pem and key=PRIVATE_KEY.pem")
            }
            // Read and checked as a tunnel server reads them, with the same messages.
            let file = try FileCertificate.load(certificateFile: certificateFile, privateKeyFile: privateKeyFile)
            (chain, key, digest) = (file.chain, file.key, file.fingerprint)
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) },
            privateKey: .privateKey(key)
        )
        configuration.minimumTLSVersion = .tlsv12
        let fingerprint = digest.map { byte in
            let digits = Array("0123456789ABCDEF")
            return String([digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]])
        }
        return APITLS(configuration: configuration, fingerprint: fingerprint.joined(separator: ":"))
    }
}
