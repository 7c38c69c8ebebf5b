import Crypto
import Logging
import NIOCore
import NIOSSL
import NodePassCore

/// The nonce of one v2 pool connection, shared by the two handlers of that connection on its event loop:
/// the authentication handler learns it, the pool-connection handler checks the server's answer with it.
final class V2PoolNonce {
    var bytes: [UInt8] = []
    /// Called once the opening is answered and the seal or TLS is in place (a resume connection then sends
    /// its request).
    var onAnswered: (() -> Void)?
}

@available(*, unavailable)
extension V2PoolNonce: Sendable {}

/// The first handler of a v2 client pool connection: reads the server's nonce, answers with the session ID
/// and the proof (and, for a sealed session, its own nonce), then adds the seal (`SealedRecordHandler`) or
/// TLS pinned to the fingerprint from `welcome` (`tls=1` before `nodepass/2.2`, `tls=2`) and passes
/// everything through. The channel must have `autoRead` off.
final class ClientPoolAuthenticationHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private enum State {
        case awaitingNonce(ByteBuffer)
        case answered
    }

    private var state: State = .awaitingNonce(ByteBuffer())
    private let settings: V2PoolSettings
    private let nonce: V2PoolNonce
    /// Called on the channel's event loop when the certificate is not the pinned one.
    private let onMismatch: (any Channel) -> Void
    private let logger: Logger
    /// The connection resumes a relay: the proof says `pool resume`.
    private let resume: Bool

    init(
        settings: V2PoolSettings,
        nonce: V2PoolNonce,
        resume: Bool = false,
        logger: Logger,
        onMismatch: @escaping (any Channel) -> Void
    ) {
        self.resume = resume
        self.settings = settings
        self.logger = logger
        self.nonce = nonce
        self.onMismatch = onMismatch
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .awaitingNonce(var received) = self.state else {
            context.fireChannelRead(data)
            return
        }
        var buffer = self.unwrapInboundIn(data)
        received.writeBuffer(&buffer)
        guard received.readableBytes >= V2PoolOpening.nonceLength else {
            self.state = .awaitingNonce(received)
            return
        }
        // The server says nothing more until it has our answer: extra bytes break the protocol.
        guard received.readableBytes == V2PoolOpening.nonceLength,
            let nonce = received.readBytes(length: V2PoolOpening.nonceLength)
        else {
            context.close(promise: nil)
            return
        }
        self.state = .answered
        self.nonce.bytes = nonce
        let secret = self.settings.secret
        var answer = context.channel.allocator.buffer(
            capacity: V2PoolOpening.clientMessageLength + V2PoolSeal.clientNonceLength
        )
        answer.writeBytes(
            V2PoolOpening.clientMessage(
                sessionID: self.settings.sessionID,
                secret: secret,
                nonce: nonce,
                resume: self.resume
            )
        )
        // A sealed connection: the client's own nonce follows, and everything after is records.
        let clientNonce = secret.sealsPoolConnections ? SecureRandom.bytes(V2PoolSeal.clientNonceLength) : nil
        if let clientNonce {
            answer.writeBytes(clientNonce)
        }
        context.writeAndFlush(NIOAny(answer), promise: nil)
        if let clientNonce {
            let keys = secret.poolSealKeys(serverNonce: nonce, clientNonce: clientNonce)
            do {
                try context.pipeline.syncOperations.addHandler(
                    SealedRecordHandler(keys: keys, isClient: true, logger: self.logger),
                    position: .after(self)
                )
            } catch {
                context.close(promise: nil)
            }
        } else if let tls = self.settings.tls {
            do {
                let fingerprint = self.settings.fingerprint
                let (channel, onMismatch) = (context.channel, self.onMismatch)
                let handler = try NIOSSLClientHandler(context: tls, serverHostname: nil) { certificates, promise in
                    guard Self.matches(certificates.first, fingerprint) else {
                        onMismatch(channel)
                        promise.succeed(.failed)
                        return
                    }
                    promise.succeed(.certificateVerified)
                }
                try context.pipeline.syncOperations.addHandler(handler, position: .after(self))
            } catch {
                context.close(promise: nil)
            }
        }
        self.nonce.onAnswered?()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        switch self.state {
        case .awaitingNonce: context.read()
        case .answered: context.fireChannelReadComplete()
        }
    }

    /// True when `certificate`'s SHA-256 fingerprint is `fingerprint`.
    static func matches(_ certificate: NIOSSLCertificate?, _ fingerprint: [UInt8]) -> Bool {
        guard let der = try? certificate?.toDERBytes() else { return false }
        return Array(SHA256.hash(data: der)) == fingerprint
    }
}

@available(*, unavailable)
extension ClientPoolAuthenticationHandler: Sendable {}

/// What a v2 client needs to open pool connections of one session.
struct V2PoolSettings: Sendable {
    var sessionID: [UInt8]
    var secret: V2SessionSecret
    /// The TLS client context for data connections, nil with `tls=0`.
    var tls: NIOSSLContext?
    /// The pinned fingerprint of the data connections' certificate.
    var fingerprint: [UInt8]
}
