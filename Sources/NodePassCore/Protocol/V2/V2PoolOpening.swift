import NIOCore

/// The opening of a v2 pool connection, before any TLS and any relayed byte:
///
/// 1. server → client: a fresh 32-byte nonce, in one write, as soon as the connection is accepted;
/// 2. client → server: the session ID (16 bytes) and `poolClientProof(nonce)` (32 bytes);
/// 3. with `tls=1` or `tls=2`, a TLS handshake (the client pins the fingerprint from `welcome`);
/// 4. server → client (inside TLS if any): the pool ID (4 bytes big-endian) and `poolServerProof(nonce, id)`;
/// 5. client → server (inside TLS if any): `poolConfirmation(nonce, id)`; only then is the connection idle.
public enum V2PoolOpening {
    /// Length of the server's nonce.
    public static let nonceLength = 32
    /// Length of the client's message.
    public static let clientMessageLength = V2SessionParameters.sessionIDLength + V2Message.proofLength
    /// Length of the server's message.
    public static let serverMessageLength = 4 + V2Message.proofLength
    /// Length of the client's confirmation.
    public static let confirmationLength = V2Message.proofLength

    /// The client's message for `nonce`; with `resume`, the connection resumes a relay (`V2Resume`) instead
    /// of joining the pool.
    public static func clientMessage(
        sessionID: [UInt8],
        secret: V2SessionSecret,
        nonce: [UInt8],
        resume: Bool = false
    ) -> [UInt8] {
        sessionID + (resume ? secret.poolResumeProof(nonce: nonce) : secret.poolClientProof(nonce: nonce))
    }

    /// Splits a client's message into session ID and proof; nil when the length is wrong.
    public static func splitClientMessage(_ bytes: [UInt8]) -> (sessionID: [UInt8], proof: [UInt8])? {
        guard bytes.count == Self.clientMessageLength else { return nil }
        let cut = V2SessionParameters.sessionIDLength
        return (Array(bytes[..<cut]), Array(bytes[cut...]))
    }

    /// The server's message giving `id`.
    public static func serverMessage(id: PoolID, secret: V2SessionSecret, nonce: [UInt8]) -> [UInt8] {
        V2SessionSecret.bytes(of: id) + secret.poolServerProof(nonce: nonce, id: id)
    }

    /// The ID in a server's message, when its proof is valid for `nonce`; nil otherwise.
    public static func verifyServerMessage(_ bytes: [UInt8], secret: V2SessionSecret, nonce: [UInt8]) -> PoolID? {
        guard bytes.count == Self.serverMessageLength else { return nil }
        let value = bytes[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let id = PoolID(value)
        guard secret.isValidPoolServerProof(Array(bytes[4...]), nonce: nonce, id: id) else { return nil }
        return id
    }
}
