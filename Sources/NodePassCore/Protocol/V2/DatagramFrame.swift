import NIOCore

/// A frame on a datagram carrier (`nodepass/2.1`): `kind (1) || flow (4) || length (2) || payload`.
public enum DatagramFrame: Hashable, Sendable {
    /// One UDP datagram of `flow`, byte for byte.
    case datagram(flow: UInt32, payload: ByteBuffer)
    /// The sender has forgotten `flow`.
    case end(flow: UInt32)

    /// Bytes before the payload.
    public static let headerLength = 7
    /// The largest datagram carried: the largest UDP payload over IPv6 (65,535 less the 8-byte UDP header).
    public static let maximumPayload = 65_527

    /// The frame kinds.
    public enum Kind: UInt8, Sendable {
        /// `datagram`
        case datagram = 0x01
        /// `end`
        case end = 0x02
    }

    /// Writes the header of a `datagram` frame whose payload of `length` bytes follows (written apart, so
    /// that the payload is not copied).
    public static func writeDatagramHeader(flow: UInt32, length: Int, to buffer: inout ByteBuffer) {
        buffer.writeInteger(Kind.datagram.rawValue)
        buffer.writeInteger(flow)
        buffer.writeInteger(UInt16(truncatingIfNeeded: length))
    }

    /// Writes the whole frame into `buffer`.
    public func write(to buffer: inout ByteBuffer) {
        switch self {
        case .datagram(let flow, var payload):
            Self.writeDatagramHeader(flow: flow, length: payload.readableBytes, to: &buffer)
            buffer.writeBuffer(&payload)
        case .end(let flow):
            buffer.writeInteger(Kind.end.rawValue)
            buffer.writeInteger(flow)
            buffer.writeInteger(UInt16(0))
        }
    }

    /// Reads one frame from the front of `buffer`: nil while it holds less than a whole frame (nothing is
    /// consumed then); throws `.protocolViolation` for an unknown kind, a payload longer than
    /// `maximumPayload` or an `end` with a payload, as soon as the header shows it.
    public static func read(from buffer: inout ByteBuffer) throws(NodePassError) -> DatagramFrame? {
        guard let (kindByte, flow, length) = buffer.peekMultipleIntegers(as: (UInt8, UInt32, UInt16).self) else {
            return nil
        }
        guard let kind = Kind(rawValue: kindByte) else {
            throw NodePassError(.protocolViolation, "datagram carrier frame of unknown kind \(kindByte)")
        }
        switch kind {
        case .datagram:
            guard Int(length) <= Self.maximumPayload else {
                throw NodePassError(.protocolViolation, "datagram of \(length) bytes on a carrier")
            }
            guard buffer.readableBytes >= Self.headerLength + Int(length) else { return nil }
            buffer.moveReaderIndex(forwardBy: Self.headerLength)
            guard let payload = buffer.readSlice(length: Int(length)) else { return nil }
            return .datagram(flow: flow, payload: payload)
        case .end:
            guard length == 0 else {
                throw NodePassError(.protocolViolation, "end frame with a payload of \(length) bytes")
            }
            buffer.moveReaderIndex(forwardBy: Self.headerLength)
            return .end(flow: flow)
        }
    }
}
