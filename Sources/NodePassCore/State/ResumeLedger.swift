import NIOCore

/// The positions of one resumable relay (`V2Resume`), as one side counts them: what it sent and what the
/// other side acknowledged (with the bytes kept for a resend in between), what it received and what it has
/// acknowledged in turn. A position is a relayed byte or a direction's end.
///
/// Pure bookkeeping on one event loop: the caller writes the frames, and calls `acknowledged(_:)` with the
/// other side's count from an ack frame or from a resume exchange; after a resume, `unacknowledged` is what
/// to send again.
public struct ResumeLedger: Sendable {
    /// Positions sent: bytes, and one for the end once sent.
    public private(set) var sent: UInt64 = 0
    /// Positions the other side said it received.
    public private(set) var acknowledged: UInt64 = 0
    /// Positions received.
    public private(set) var received: UInt64 = 0
    /// The count in this side's last ack (or resume exchange).
    public private(set) var receivedAcknowledged: UInt64 = 0
    /// This direction's end was sent.
    public private(set) var endSent = false
    /// The other direction's end was received.
    public private(set) var endReceived = false
    /// The bytes from `acknowledged` to `sent` (less the end).
    private var kept = CircularBuffer<ByteBuffer>()
    /// How many bytes `kept` holds.
    public private(set) var keptBytes = 0

    public init() {}

    /// `buffer` is sent (and kept until acknowledged). Nothing may be sent after the end.
    public mutating func sending(_ buffer: ByteBuffer) {
        guard !self.endSent, buffer.readableBytes > 0 else { return }
        self.kept.append(buffer)
        self.keptBytes += buffer.readableBytes
        self.sent += UInt64(buffer.readableBytes)
    }

    /// This direction's end is sent.
    public mutating func sendingEnd() {
        guard !self.endSent else { return }
        self.endSent = true
        self.sent += 1
    }

    /// The other side received `count` positions: the bytes before it are no longer kept. Returns how many
    /// bytes were released. Throws when `count` goes back or past what was sent.
    @discardableResult
    public mutating func acknowledged(_ count: UInt64) throws(NodePassError) -> Int {
        guard count >= self.acknowledged else {
            throw NodePassError(
                .protocolViolation,
                "the other side acknowledged \(count) positions after \(self.acknowledged)"
            )
        }
        guard count <= self.sent else {
            throw NodePassError(
                .protocolViolation,
                "the other side acknowledged \(count) positions of \(self.sent) sent"
            )
        }
        let byteCount = self.sent - (self.endSent ? 1 : 0)
        var release = Int(min(count, byteCount) - min(self.acknowledged, byteCount))
        self.acknowledged = count
        let released = release
        while release > 0, var first = self.kept.first {
            if first.readableBytes <= release {
                release -= first.readableBytes
                self.kept.removeFirst()
            } else {
                first.moveReaderIndex(forwardBy: release)
                self.kept[self.kept.startIndex] = first
                release = 0
            }
        }
        self.keptBytes -= released
        return released
    }

    /// What the other side has not acknowledged, to send again after a resume: the bytes kept, and whether
    /// the end must follow them.
    public var unacknowledged: (bytes: [ByteBuffer], end: Bool) {
        (Array(self.kept), self.endSent && self.acknowledged < self.sent)
    }

    /// `count` bytes arrived. Throws when they come after the other direction's end.
    public mutating func receivedBytes(_ count: Int) throws(NodePassError) {
        guard !self.endReceived else {
            throw NodePassError(.protocolViolation, "bytes after the end of a resumable relay's direction")
        }
        self.received += UInt64(count)
    }

    /// The other direction's end arrived. Throws when it came already.
    public mutating func receivedEnd() throws(NodePassError) {
        guard !self.endReceived else {
            throw NodePassError(.protocolViolation, "a second end on a resumable relay's direction")
        }
        self.endReceived = true
        self.received += 1
    }

    /// Positions received since this side's last acknowledgement.
    public var unacknowledgedReceived: UInt64 {
        self.received - self.receivedAcknowledged
    }

    /// This side acknowledges everything received (an ack frame, or its count in a resume exchange);
    /// returns the count to send.
    public mutating func acknowledgingReceived() -> UInt64 {
        self.receivedAcknowledged = self.received
        return self.received
    }

    /// Both directions ended, and the other side acknowledged everything this side sent.
    public var isComplete: Bool {
        self.endSent && self.endReceived && self.acknowledged == self.sent
    }
}
