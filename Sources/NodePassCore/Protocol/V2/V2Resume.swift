import Crypto
import NIOCore

/// Resumable relays (`nodepass/2.3` with the server's `resume=1`): what a relay's pool connection carries
/// once launched, and how a relay whose pool connection broke continues on a new one.
///
/// Each direction of a resumable relay is a stream of *positions*: one per relayed byte, then one for the
/// end of input. Its pool connection carries frames instead of raw bytes:
///
/// - `data`: `0x01 || length (2) || bytes` (1 to 65,535 bytes), the next positions of this direction;
/// - `end`: `0x02`, the last position of this direction;
/// - `ack`: `0x03 || count (8)`, how many positions of the other direction the sender has received;
/// - `abort`: `0x04`, the relay is over with an error (a connection reset): the receiver resets its end.
///
/// Each side keeps what it sent until the other acknowledges it, so that after a break it can send again
/// whatever the other side had not received. The client resumes a relay on a new pool connection whose
/// opening carries `pool resume` instead of `pool client`: it sends a request naming the relay and its own
/// count, the server answers with its count, both proved with the relay's key (`V2ResumeTicket`).
public enum V2Resume {
    /// The frame types.
    public static let dataType: UInt8 = 0x01
    public static let endType: UInt8 = 0x02
    public static let ackType: UInt8 = 0x03
    public static let abortType: UInt8 = 0x04
    /// Length of a data frame's header (type and length).
    public static let dataHeaderLength = 3
    /// Length of an ack frame.
    public static let ackLength = 9
    /// The most bytes of one data frame.
    public static let maximumDataLength = Int(UInt16.max)

    /// Length of a relay's ID: its session's ID (16) and its first pool connection's ID (4).
    public static let streamIDLength = V2SessionParameters.sessionIDLength + 4
    /// Length of the client's request: relay ID, count (8), proof (32).
    public static let requestLength = streamIDLength + 8 + V2Message.proofLength
    /// Length of the server's answer: status (1), count (8), proof (32).
    public static let replyLength = 1 + 8 + V2Message.proofLength

    static let poolResumeLabel = Array("pool resume".utf8)
    static let keyLabel = Array("resume key".utf8)
    static let requestLabel = Array("resume client".utf8)
    static let replyLabel = Array("resume server".utf8)

    /// The header of a data frame of `length` bytes (1 to `maximumDataLength`).
    public static func writeDataHeader(length: Int, to buffer: inout ByteBuffer) {
        buffer.writeInteger(Self.dataType)
        buffer.writeInteger(UInt16(truncatingIfNeeded: length))
    }

    /// An ack frame for `count` positions.
    public static func writeAck(_ count: UInt64, to buffer: inout ByteBuffer) {
        buffer.writeInteger(Self.ackType)
        buffer.writeInteger(count)
    }

    static func bytes(of value: UInt64) -> [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) }
    }

    static func value(of bytes: ArraySlice<UInt8>) -> UInt64 {
        bytes.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }
}

/// What the server answers to a resume request.
public enum V2ResumeStatus: UInt8, Hashable, Sendable {
    /// The relay goes on: the count and the proof are valid.
    case resumed = 0
    /// The server has no such relay (it ended, its grace period passed, the server restarted) or the proof
    /// is not valid: the client closes its end. The count and the proof are zero.
    case unknown = 1
}

/// One resumable relay as both sides know it: its ID and its key, `HMAC(S, "resume key" || Np || ID)` with
/// the session secret, the server nonce and the pool ID of the pool connection that launched it.
public struct V2ResumeTicket: Hashable, Sendable {
    /// The session's ID (16) and the first pool connection's ID (4).
    public let streamID: [UInt8]
    /// The relay's key; only the two sides of its session can compute it.
    public let key: [UInt8]

    /// The ticket of the relay launched on pool connection `id` whose opening had `nonce`, in the session
    /// `sessionID` with `secret`.
    public init(secret: V2SessionSecret, sessionID: [UInt8], nonce: [UInt8], id: PoolID) {
        let idBytes = V2SessionSecret.bytes(of: id)
        self.streamID = sessionID + idBytes
        self.key = secret.resumeKey(nonce: nonce, id: idBytes)
    }

    /// A ticket from its parts (test vectors).
    public init(streamID: [UInt8], key: [UInt8]) {
        self.streamID = streamID
        self.key = key
    }

    private func mac(_ label: [UInt8], _ parts: [UInt8]...) -> [UInt8] {
        var hmac = HMAC<SHA256>(key: SymmetricKey(data: self.key))
        hmac.update(data: label)
        for part in parts { hmac.update(data: part) }
        return Array(hmac.finalize())
    }

    /// The client's request on a resume connection whose server nonce is `nonce`, saying it received
    /// `count` positions: ID || count || HMAC(key, "resume client" || nonce || ID || count).
    public func request(nonce: [UInt8], count: UInt64) -> [UInt8] {
        let countBytes = V2Resume.bytes(of: count)
        return self.streamID + countBytes + self.mac(V2Resume.requestLabel, nonce, self.streamID, countBytes)
    }

    /// The relay ID a request names, or nil when it has the wrong length.
    public static func streamID(ofRequest request: [UInt8]) -> [UInt8]? {
        guard request.count == V2Resume.requestLength else { return nil }
        return Array(request[..<V2Resume.streamIDLength])
    }

    /// The count of `request` when it names this relay and its proof is valid for `nonce`; nil otherwise.
    public func verifyRequest(_ request: [UInt8], nonce: [UInt8]) -> UInt64? {
        guard request.count == V2Resume.requestLength,
            V2Key.constantTimeEquals(Array(request[..<V2Resume.streamIDLength]), self.streamID)
        else { return nil }
        let countBytes = Array(request[V2Resume.streamIDLength..<(V2Resume.streamIDLength + 8)])
        let proof = Array(request[(V2Resume.streamIDLength + 8)...])
        let expected = self.mac(V2Resume.requestLabel, nonce, self.streamID, countBytes)
        guard V2Key.constantTimeEquals(proof, expected) else { return nil }
        return V2Resume.value(of: countBytes[...])
    }

    /// The server's answer that the relay goes on, having received `count` positions:
    /// 0 || count || HMAC(key, "resume server" || nonce || ID || count).
    public func reply(nonce: [UInt8], count: UInt64) -> [UInt8] {
        let countBytes = V2Resume.bytes(of: count)
        return [V2ResumeStatus.resumed.rawValue] + countBytes
            + self.mac(V2Resume.replyLabel, nonce, self.streamID, countBytes)
    }

    /// The server's answer that it has no such relay.
    public static var unknownReply: [UInt8] {
        [V2ResumeStatus.unknown.rawValue] + [UInt8](repeating: 0, count: V2Resume.replyLength - 1)
    }

    /// What a server's answer says: `.resumed` with the server's count when its proof is valid for
    /// `nonce`, `.unknown` for a refusal; nil for anything else (a protocol violation).
    public func verifyReply(_ reply: [UInt8], nonce: [UInt8]) -> (V2ResumeStatus, UInt64)? {
        guard reply.count == V2Resume.replyLength, let status = V2ResumeStatus(rawValue: reply[0]) else { return nil }
        guard status == .resumed else { return (.unknown, 0) }
        let countBytes = Array(reply[1..<9])
        let expected = self.mac(V2Resume.replyLabel, nonce, self.streamID, countBytes)
        guard V2Key.constantTimeEquals(Array(reply[9...]), expected) else { return nil }
        return (.resumed, V2Resume.value(of: countBytes[...]))
    }
}

/// Reads the frames of a resumable relay's pool connection as they arrive; a data frame's bytes come out as
/// soon as they are read (never held until the frame is whole), so that nothing is copied.
public struct V2ResumeFrameDecoder: Sendable {
    /// One frame, or the part of a data frame read so far.
    public enum Frame: Hashable, Sendable {
        case data(ByteBuffer)
        case end
        case ack(UInt64)
        case abort
    }

    private var input = ByteBuffer()
    /// The first bytes of a frame header that a read cut (at most an ack's 9).
    private var header: [UInt8] = []
    /// Bytes of the current data frame still to come.
    private var dataRemaining = 0

    public init() {}

    /// Adds what the connection read.
    public mutating func feed(_ buffer: ByteBuffer) {
        if self.input.readableBytes == 0 {
            self.input = buffer
        } else {
            var buffer = buffer
            self.input.writeBuffer(&buffer)
        }
    }

    /// The next frame (or part of a data frame); nil when more bytes are needed. Throws on an unknown
    /// frame type or an empty data frame.
    public mutating func next() throws(NodePassError) -> Frame? {
        if self.dataRemaining > 0 {
            let count = min(self.dataRemaining, self.input.readableBytes)
            guard count > 0, let slice = self.input.readSlice(length: count) else { return nil }
            self.dataRemaining -= count
            return .data(slice)
        }
        guard let header = try self.readHeader() else { return nil }
        switch header[0] {
        case V2Resume.dataType:
            let length = Int(header[1]) << 8 | Int(header[2])
            guard length > 0 else {
                throw NodePassError(.protocolViolation, "empty data frame on a resumable relay")
            }
            self.dataRemaining = length
            return try self.next()
        case V2Resume.endType:
            return .end
        case V2Resume.abortType:
            return .abort
        default:
            return .ack(V2Resume.value(of: header[1...]))
        }
    }

    /// The whole header of the next frame, taken from the bytes kept and the input; nil when incomplete.
    private mutating func readHeader() throws(NodePassError) -> [UInt8]? {
        let type: UInt8
        if let first = self.header.first {
            type = first
        } else {
            guard let first = self.input.readInteger(as: UInt8.self) else { return nil }
            type = first
            self.header = [first]
        }
        let length: Int
        switch type {
        case V2Resume.dataType: length = V2Resume.dataHeaderLength
        case V2Resume.ackType: length = V2Resume.ackLength
        case V2Resume.endType, V2Resume.abortType: length = 1
        default:
            throw NodePassError(.protocolViolation, "unknown frame type \(type) on a resumable relay")
        }
        let missing = length - self.header.count
        let available = min(missing, self.input.readableBytes)
        if available > 0, let bytes = self.input.readBytes(length: available) {
            self.header += bytes
        }
        guard self.header.count == length else { return nil }
        defer { self.header = [] }
        return self.header
    }
}
