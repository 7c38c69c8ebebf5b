import NIOCore

/// One frame of the v2 control channel: a type byte, a 16-bit big-endian payload length, the payload.
///
/// Frames travel inside TLS, which protects them; the frame layer only delimits them and bounds their size.
public struct V2Frame: Hashable, Sendable {
    /// The largest payload accepted; a longer frame is a protocol error.
    public static let maximumPayloadLength = 1024
    /// Bytes before the payload: type (1) and length (2).
    public static let headerLength = 3

    /// The frame type (see `V2Message.Kind` for the known ones).
    public var type: UInt8
    /// The payload bytes.
    public var payload: ByteBuffer

    /// Makes a frame.
    public init(type: UInt8, payload: ByteBuffer) {
        self.type = type
        self.payload = payload
    }

    /// Writes the frame into `buffer`.
    public func write(to buffer: inout ByteBuffer) {
        buffer.writeInteger(self.type)
        buffer.writeInteger(UInt16(truncatingIfNeeded: self.payload.readableBytes))
        buffer.writeImmutableBuffer(self.payload)
    }

    /// What `read(from:)` found.
    public enum ReadResult: Hashable, Sendable {
        /// A whole frame; its bytes were consumed.
        case frame(V2Frame)
        /// Not enough bytes yet; nothing was consumed.
        case needMoreData
    }

    /// Reads one frame from the front of `buffer`.
    ///
    /// Throws `.protocolViolation` when the announced length is over `maximumPayloadLength`, before any of
    /// the payload is buffered.
    public static func read(from buffer: inout ByteBuffer) throws(NodePassError) -> ReadResult {
        guard let type = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self),
            let length = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt16.self)
        else { return .needMoreData }
        guard Int(length) <= Self.maximumPayloadLength else {
            throw NodePassError(
                .protocolViolation,
                "frame of type \(type) announces \(length) bytes (at most \(Self.maximumPayloadLength))"
            )
        }
        guard buffer.readableBytes >= Self.headerLength + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: Self.headerLength)
        let payload = buffer.readSlice(length: Int(length)) ?? ByteBuffer()
        return .frame(V2Frame(type: type, payload: payload))
    }
}
