import Crypto
import NIOCore

import struct Foundation.Data

/// Sealed pool connections (`nodepass/2.2`, `tls=1`): instead of a TLS handshake per pool connection, each
/// direction of the connection is a stream of AES-256-GCM records under a key derived from the session
/// secret and two nonces of this connection, one from each side.
///
/// A record is `length (2) || nonce (12) || ciphertext || tag (16)`: `length` counts what follows it and is the
/// record's additional authenticated data; the nonce is four zero bytes and the record's number in its
/// direction (8 bytes, from 0), and a receiver refuses any other. A record with an empty plaintext ends the
/// direction (the sender will write nothing more). After `recordsPerKey` records a direction's key is
/// replaced by `HMAC(key, "pool seal next key")`, so that no key seals more than about 2^40 bytes.
public enum V2PoolSeal {
    /// Length of the client's nonce, sent right after its proof.
    public static let clientNonceLength = 32
    /// Length of a record's length field.
    public static let headerLength = 2
    /// Length of a record's explicit nonce.
    public static let nonceLength = 12
    /// Length of a record's authentication tag.
    public static let tagLength = 16
    /// What a record adds to its plaintext, after the length field.
    public static let overhead = nonceLength + tagLength
    /// The largest plaintext of one record.
    public static let maximumPlaintext = Int(UInt16.max) - overhead
    /// How many records one key seals before the next key takes over.
    public static let recordsPerKey: UInt64 = 1 << 24

    static let clientLabel = Array("pool seal client".utf8)
    static let serverLabel = Array("pool seal server".utf8)
    static let nextKeyLabel = Array("pool seal next key".utf8)

    /// The key that follows `key` after `recordsPerKey` records.
    public static func nextKey(after key: [UInt8]) -> [UInt8] {
        var hmac = HMAC<SHA256>(key: SymmetricKey(data: key))
        hmac.update(data: Self.nextKeyLabel)
        return Array(hmac.finalize())
    }

    /// A record's length field, which is also its additional authenticated data.
    static func header(_ length: UInt16) -> [UInt8] {
        [UInt8(length >> 8), UInt8(truncatingIfNeeded: length)]
    }

    /// The nonce of record `number`.
    static func nonce(_ number: UInt64) -> [UInt8] {
        [0, 0, 0, 0] + (0..<8).map { UInt8(truncatingIfNeeded: number >> (56 - 8 * $0)) }
    }
}

/// The two keys of one sealed pool connection.
public struct V2PoolSealKeys: Hashable, Sendable {
    /// Seals what the client sends: HMAC(S, "pool seal client" || server nonce || client nonce).
    public var clientToServer: [UInt8]
    /// Seals what the server sends: HMAC(S, "pool seal server" || server nonce || client nonce).
    public var serverToClient: [UInt8]

    public init(clientToServer: [UInt8], serverToClient: [UInt8]) {
        self.clientToServer = clientToServer
        self.serverToClient = serverToClient
    }
}

/// What a receiver finds in a direction of a sealed pool connection.
public enum V2SealedRecord: Hashable, Sendable {
    /// Relayed bytes (never empty).
    case bytes(ByteBuffer)
    /// The sender ended its direction.
    case end
}

/// Seals one direction of a sealed pool connection (`V2PoolSeal`).
public struct V2RecordSealer {
    private var keys: V2SealKeySchedule
    /// The number of the next record.
    public var sequence: UInt64 { self.keys.sequence }

    /// Starts a direction at record `sequence` (0 but in tests) with the key of record 0.
    public init(key: [UInt8], sequence: UInt64 = 0) {
        self.keys = V2SealKeySchedule(key: key, sequence: sequence)
    }

    /// Appends `plaintext` to `output` as records of at most `V2PoolSeal.maximumPlaintext` bytes (none when
    /// it is empty: an empty record would end the direction).
    public mutating func seal(_ plaintext: UnsafeRawBufferPointer, into output: inout ByteBuffer) throws(NodePassError)
    {
        var start = 0
        while start < plaintext.count {
            let end = min(plaintext.count, start + V2PoolSeal.maximumPlaintext)
            try self.sealRecord(UnsafeRawBufferPointer(rebasing: plaintext[start..<end]), into: &output)
            start = end
        }
    }

    /// Appends the record that ends this direction.
    public mutating func sealEnd(into output: inout ByteBuffer) throws(NodePassError) {
        try self.sealRecord(UnsafeRawBufferPointer(start: nil, count: 0), into: &output)
    }

    private mutating func sealRecord(
        _ plaintext: UnsafeRawBufferPointer,
        into output: inout ByteBuffer
    )
        throws(NodePassError)
    {
        let header = V2PoolSeal.header(UInt16(plaintext.count + V2PoolSeal.overhead))
        do {
            let nonce = try AES.GCM.Nonce(data: V2PoolSeal.nonce(self.keys.sequence))
            let box = try AES.GCM.seal(plaintext, using: self.keys.current, nonce: nonce, authenticating: header)
            guard let combined = box.combined else {
                throw NodePassError(.protocolViolation, "a sealed record has no combined form")
            }
            output.writeBytes(header)
            _ = combined.withUnsafeBytes { output.writeBytes($0) }
        } catch let error as NodePassError {
            throw error
        } catch {
            throw NodePassError(.protocolViolation, "sealing a record failed: \(error)")
        }
        self.keys.advance()
    }
}

/// Opens one direction of a sealed pool connection (`V2PoolSeal`).
public struct V2RecordOpener {
    private var keys: V2SealKeySchedule
    /// The number of the next record.
    public var sequence: UInt64 { self.keys.sequence }

    /// Starts a direction at record `sequence` (0 but in tests) with the key of record 0.
    public init(key: [UInt8], sequence: UInt64 = 0) {
        self.keys = V2SealKeySchedule(key: key, sequence: sequence)
    }

    /// The bytes still needed before the record at the start of `buffer` is whole (0 when it is), when at
    /// least its length field is there.
    public static func missingBytes(in buffer: ByteBuffer) -> Int? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self) else { return nil }
        return max(0, V2PoolSeal.headerLength + Int(length) - buffer.readableBytes)
    }

    /// Reads and opens the record at the start of `buffer`; nil while it is incomplete. Throws
    /// `.protocolViolation` for a record that is too short, out of sequence or does not authenticate.
    public mutating func next(from buffer: inout ByteBuffer) throws(NodePassError) -> V2SealedRecord? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self) else { return nil }
        guard Int(length) >= V2PoolSeal.overhead else {
            throw NodePassError(.protocolViolation, "a sealed record of \(length) bytes is too short")
        }
        guard buffer.readableBytes >= V2PoolSeal.headerLength + Int(length) else { return nil }
        let header = V2PoolSeal.header(length)
        buffer.moveReaderIndex(forwardBy: V2PoolSeal.headerLength)
        let expected = V2PoolSeal.nonce(self.keys.sequence)
        let key = self.keys.current
        let opened: Data? = buffer.readWithUnsafeReadableBytes { pointer in
            let combined = UnsafeRawBufferPointer(rebasing: pointer[..<Int(length)])
            guard combined.prefix(V2PoolSeal.nonceLength).elementsEqual(expected), let base = combined.baseAddress
            else {
                return (Int(length), nil)
            }
            // The box reads the bytes where they are: they are not copied before they are opened.
            let view = Data(
                bytesNoCopy: UnsafeMutableRawPointer(mutating: base),
                count: combined.count,
                deallocator: .none
            )
            guard let box = try? AES.GCM.SealedBox(combined: view),
                let plaintext = try? AES.GCM.open(box, using: key, authenticating: header)
            else {
                return (Int(length), nil)
            }
            return (Int(length), plaintext)
        }
        guard let opened else {
            throw NodePassError(
                .protocolViolation,
                "a sealed record did not authenticate (record \(self.keys.sequence))"
            )
        }
        self.keys.advance()
        guard !opened.isEmpty else { return .end }
        return .bytes(opened.withUnsafeBytes { ByteBuffer(bytes: $0) })
    }
}

/// The key and the record number of one direction: the key changes every `V2PoolSeal.recordsPerKey` records.
struct V2SealKeySchedule {
    private var key: [UInt8]
    private(set) var current: SymmetricKey
    private(set) var sequence: UInt64

    init(key: [UInt8], sequence: UInt64) {
        var key = key
        for _ in 0..<(sequence / V2PoolSeal.recordsPerKey) { key = V2PoolSeal.nextKey(after: key) }
        self.key = key
        self.current = SymmetricKey(data: key)
        self.sequence = sequence
    }

    mutating func advance() {
        self.sequence &+= 1
        if self.sequence % V2PoolSeal.recordsPerKey == 0 {
            self.key = V2PoolSeal.nextKey(after: self.key)
            self.current = SymmetricKey(data: self.key)
        }
    }
}
