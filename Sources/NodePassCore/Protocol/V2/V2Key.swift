import Crypto
import _CryptoExtras

/// The v2 authentication key, stretched from the URL's KEY, and the proofs made with it.
///
/// Every proof is an HMAC-SHA256 whose input starts with a distinct label, so that no proof made for one
/// purpose is valid for another. Every check is constant-time.
public struct V2Key: Sendable {
    /// The PBKDF2 salt (fixed: both sides must derive the same key without talking first).
    public static let salt = Array("nodepass/2 key".utf8)
    /// PBKDF2-HMAC-SHA256 rounds: done once at start; it slows down guessing a weak KEY offline.
    public static let rounds = 210_000
    /// Fewer characters than this get a warning at start.
    public static let recommendedLength = 16

    // Kept as bytes: `SymmetricKey` is not `Sendable` on every platform.
    private let bytes: [UInt8]
    private var key: SymmetricKey { SymmetricKey(data: self.bytes) }

    /// Derives the authentication key from the URL's KEY (PBKDF2-HMAC-SHA256, `rounds`, 32 bytes).
    public init(_ text: String) throws(NodePassError) {
        guard !text.isEmpty else {
            throw NodePassError(.invalidURL, "the key is empty")
        }
        do {
            let key = try KDF.Insecure.PBKDF2.deriveKey(
                from: Array(text.utf8),
                salt: Self.salt,
                using: .sha256,
                outputByteCount: 32,
                rounds: Self.rounds
            )
            self.bytes = key.withUnsafeBytes { Array($0) }
        } catch {
            throw NodePassError(.authenticationFailed, "cannot derive the key", underlying: error)
        }
    }

    /// Uses `bytes` as the authentication key directly (for test vectors).
    public init(derivedBytes bytes: [UInt8]) {
        self.bytes = bytes
    }

    /// The derived key's bytes (for test vectors).
    public var derivedBytes: [UInt8] { self.bytes }

    /// The handshake transcript: SHA-256 of `"nodepass/2"`, the client nonce, the server nonce and the
    /// SHA-256 fingerprint of the control channel's server certificate as the client saw it.
    public static func transcript(clientNonce: [UInt8], serverNonce: [UInt8], fingerprint: [UInt8]) -> [UInt8] {
        var hash = SHA256()
        hash.update(data: Array("nodepass/2".utf8))
        hash.update(data: clientNonce)
        hash.update(data: serverNonce)
        hash.update(data: fingerprint)
        return Array(hash.finalize())
    }

    /// The client's proof: HMAC(key, "client proof" || transcript).
    public func clientProof(transcript: [UInt8]) -> [UInt8] {
        Self.mac(self.key, "client proof", transcript)
    }

    /// Checks a client proof in constant time.
    public func isValidClientProof(_ proof: [UInt8], transcript: [UInt8]) -> Bool {
        Self.isValid(proof, self.key, "client proof", transcript)
    }

    /// The server's proof: HMAC(key, "server proof" || transcript || encoded parameters).
    public func serverProof(transcript: [UInt8], parameters: [UInt8]) -> [UInt8] {
        Self.mac(self.key, "server proof", transcript + parameters)
    }

    /// Checks a server proof in constant time.
    public func isValidServerProof(_ proof: [UInt8], transcript: [UInt8], parameters: [UInt8]) -> Bool {
        Self.isValid(proof, self.key, "server proof", transcript + parameters)
    }

    /// The secret of one client session: HMAC(key, "session secret" || transcript || session ID).
    public func sessionSecret(transcript: [UInt8], sessionID: [UInt8]) -> V2SessionSecret {
        V2SessionSecret(bytes: Self.mac(self.key, "session secret", transcript + sessionID))
    }

    /// The secret of the session that `parameters` describe, sealing its pool connections when they say so.
    public func sessionSecret(transcript: [UInt8], parameters: V2SessionParameters) -> V2SessionSecret {
        var secret = self.sessionSecret(transcript: transcript, sessionID: parameters.sessionID)
        secret.sealsPoolConnections = parameters.tls == .sealed
        secret.resumesRelays = parameters.resumes
        return secret
    }

    static func mac(_ key: SymmetricKey, _ label: String, _ data: [UInt8]) -> [UInt8] {
        var hmac = HMAC<SHA256>(key: key)
        hmac.update(data: Array(label.utf8))
        hmac.update(data: data)
        return Array(hmac.finalize())
    }

    /// Compares two byte strings in time that depends only on their lengths.
    public static func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in a.indices { difference |= a[index] ^ b[index] }
        return difference == 0
    }

    static func isValid(_ proof: [UInt8], _ key: SymmetricKey, _ label: String, _ data: [UInt8]) -> Bool {
        guard proof.count == SHA256.byteCount else { return false }
        return HMAC<SHA256>.isValidAuthenticationCode(proof, authenticating: Array(label.utf8) + data, using: key)
    }
}

/// The secret a client and the server share for one control session; it authenticates pool connections.
///
/// Every pool connection takes three MACs under this secret on each side, so the HMAC is keyed once: each
/// MAC starts from a copy of the keyed state instead of hashing the key again.
public struct V2SessionSecret: Sendable {
    /// The secret's bytes.
    public let bytes: [UInt8]
    /// Whether the session's pool connections are sealed (`nodepass/2.2` with `tls=1`, `V2PoolSeal`).
    public var sealsPoolConnections = false
    /// Whether the session's relays resume on a new pool connection after a break (`nodepass/2.3` with the
    /// server's `resume=1`, `V2Resume`).
    public var resumesRelays = false
    private let keyed: KeyedHMAC

    private static let poolClient = Array("pool client".utf8)
    private static let poolServer = Array("pool server".utf8)
    private static let poolConfirm = Array("pool confirm".utf8)

    /// Makes the secret from its 32 bytes.
    public init(bytes: [UInt8]) {
        self.bytes = bytes
        self.keyed = KeyedHMAC(key: SymmetricKey(data: bytes))
    }

    /// The client's pool-connection proof: HMAC(secret, "pool client" || server nonce).
    public func poolClientProof(nonce: [UInt8]) -> [UInt8] {
        self.keyed.mac(Self.poolClient, nonce)
    }

    /// Checks a client's pool-connection proof in constant time.
    public func isValidPoolClientProof(_ proof: [UInt8], nonce: [UInt8]) -> Bool {
        V2Key.constantTimeEquals(proof, self.poolClientProof(nonce: nonce))
    }

    /// The server's pool-connection proof: HMAC(secret, "pool server" || server nonce || ID, 4 bytes big-endian).
    public func poolServerProof(nonce: [UInt8], id: PoolID) -> [UInt8] {
        self.keyed.mac(Self.poolServer, nonce, Self.bytes(of: id))
    }

    /// Checks the server's pool-connection proof in constant time.
    public func isValidPoolServerProof(_ proof: [UInt8], nonce: [UInt8], id: PoolID) -> Bool {
        V2Key.constantTimeEquals(proof, self.poolServerProof(nonce: nonce, id: id))
    }

    /// The client's confirmation, sent inside TLS (if any) after the server's message:
    /// HMAC(secret, "pool confirm" || server nonce || ID). It binds the connection to the client that holds
    /// the session secret at the far end of this very TLS session.
    public func poolConfirmation(nonce: [UInt8], id: PoolID) -> [UInt8] {
        self.keyed.mac(Self.poolConfirm, nonce, Self.bytes(of: id))
    }

    /// The client's proof on a pool connection that resumes a relay: HMAC(secret, "pool resume" || server
    /// nonce). Its own label: such a connection never joins the pool.
    public func poolResumeProof(nonce: [UInt8]) -> [UInt8] {
        self.keyed.mac(V2Resume.poolResumeLabel, nonce)
    }

    /// Checks a client's resume-connection proof in constant time.
    public func isValidPoolResumeProof(_ proof: [UInt8], nonce: [UInt8]) -> Bool {
        V2Key.constantTimeEquals(proof, self.poolResumeProof(nonce: nonce))
    }

    /// The key of the relay launched on pool connection `id` (4 bytes) whose opening had `nonce`:
    /// HMAC(secret, "resume key" || nonce || ID).
    func resumeKey(nonce: [UInt8], id: [UInt8]) -> [UInt8] {
        self.keyed.mac(V2Resume.keyLabel, nonce, id)
    }

    /// The keys of a sealed pool connection with the server's `serverNonce` and the client's `clientNonce`.
    public func poolSealKeys(serverNonce: [UInt8], clientNonce: [UInt8]) -> V2PoolSealKeys {
        V2PoolSealKeys(
            clientToServer: self.keyed.mac(V2PoolSeal.clientLabel, serverNonce, clientNonce),
            serverToClient: self.keyed.mac(V2PoolSeal.serverLabel, serverNonce, clientNonce)
        )
    }

    static func bytes(of id: PoolID) -> [UInt8] {
        [
            UInt8(id.value >> 24), UInt8(truncatingIfNeeded: id.value >> 16), UInt8(truncatingIfNeeded: id.value >> 8),
            UInt8(truncatingIfNeeded: id.value),
        ]
    }
}

/// An HMAC-SHA256 keyed once. Immutable after `init`: every MAC works on its own copy of the keyed state
/// (the hash contexts are copied on first write), so one instance serves every thread.
private final class KeyedHMAC: @unchecked Sendable {
    private let keyed: HMAC<SHA256>

    init(key: SymmetricKey) {
        self.keyed = HMAC<SHA256>(key: key)
    }

    /// HMAC over the concatenation of `parts` (joined first: each `update` of swift-crypto's generic HMAC
    /// costs more than copying a few dozen bytes).
    func mac(_ parts: [UInt8]...) -> [UInt8] {
        var message: [UInt8] = []
        message.reserveCapacity(parts.reduce(0) { $0 + $1.count })
        for part in parts { message += part }
        var hmac = self.keyed
        hmac.update(data: message)
        return hmac.finalize().withUnsafeBytes { Array($0) }
    }
}
