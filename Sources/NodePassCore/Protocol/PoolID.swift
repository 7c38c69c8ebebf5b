import NIOCore

/// The ID of a pool connection: 4 random bytes, written on the wire as 8 lowercase hex characters.
public struct PoolID: Hashable, Sendable, CustomStringConvertible {
    /// The number of bytes the ID takes on the wire.
    public static let wireLength = 8

    /// The ID as a number.
    public let value: UInt32

    /// Makes the ID of `value`.
    public init(_ value: UInt32) {
        self.value = value
    }

    /// A fresh random ID.
    public static func random() -> PoolID {
        var generator = SystemRandomNumberGenerator()
        return PoolID(generator.next())
    }

    /// The 8 lowercase hex characters.
    public var description: String {
        let digits = String(self.value, radix: 16)
        return String(repeating: "0", count: 8 - digits.count) + digits
    }

    /// Parses exactly 8 lowercase hex characters.
    public init(parsing text: some Collection<UInt8>) throws(NodePassError) {
        guard text.count == Self.wireLength else {
            throw NodePassError(
                .malformedPoolID,
                "pool ID must be \(Self.wireLength) hex characters, got \(text.count)"
            )
        }
        var value: UInt32 = 0
        for byte in text {
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            default:
                throw NodePassError(.malformedPoolID, "pool ID has a byte that is not a lowercase hex digit")
            }
            value = value << 4 | UInt32(digit)
        }
        self.value = value
    }

    /// Parses exactly 8 lowercase hex characters from a string.
    public init(parsing text: String) throws(NodePassError) {
        try self.init(parsing: Array(text.utf8))
    }

    /// Writes the 8 characters into `buffer`.
    public func write(to buffer: inout ByteBuffer) {
        buffer.writeString(self.description)
    }
}
