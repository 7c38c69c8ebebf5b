import Crypto
import Foundation
import NIOCore
import NIOSSL
import NodePassCore
import SwiftASN1
import X509

/// A self-signed certificate and its key, made in memory at start; nothing touches the disk.
public struct InMemoryCertificate: Sendable {
    /// The certificate, as NIOSSL takes it.
    public let certificate: NIOSSLCertificate
    /// The private key, as NIOSSL takes it.
    public let privateKey: NIOSSLPrivateKey
    /// How long a closing TLS connection waits for the peer's close_notify (the control channel carries
    /// nothing that needs it, and a shutdown must not wait for a silent peer).
    static let closeNotifyWait = TimeAmount.milliseconds(250)

    /// SHA-256 of the certificate's DER bytes.
    public let fingerprint: [UInt8]

    /// Makes a fresh ECDSA P-256 certificate valid for one year, subject `O=nodepass-swift:VERSION`.
    public static func generate() throws(NodePassError) -> InMemoryCertificate {
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

    /// A TLS server context presenting this certificate (TLS 1.2 and 1.3).
    public func makeServerContext() throws(NodePassError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: [.certificate(self.certificate)],
            privateKey: .privateKey(self.privateKey)
        )
        configuration.minimumTLSVersion = .tlsv12
        configuration.shutdownTimeout = Self.closeNotifyWait
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw NodePassError(.tls, "cannot set up the TLS server", underlying: error)
        }
    }
}

/// TLS client contexts.
public enum TLSClientContext {
    /// A v1 client context: TLS 1.2 or 1.3, no certificate check (v1 has nothing to check it against).
    public static func makeUnverified() throws(NodePassError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.certificateVerification = .none
        configuration.shutdownTimeout = InMemoryCertificate.closeNotifyWait
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw NodePassError(.tls, "cannot set up the TLS client", underlying: error)
        }
    }
}
