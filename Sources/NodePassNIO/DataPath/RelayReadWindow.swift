import NIOCore

/// How much one direction of a relay may hold in user space: the bytes it read from its channel and has
/// not yet seen written to the partner (`inFlight`) stay within `limit` (RELAY_BUFFER).
///
/// The channel's reads are sized here (`RelayReadAllocator`): a read never asks for more than the room
/// left, and the size adapts to what the socket delivers (it doubles after a read that filled its buffer
/// and halves after two reads that used less than half), so that a connection carrying little keeps small
/// buffers. The relay reads again only once everything in flight is written (`hasRoom`): the kernel's
/// send buffer still holds what keeps the connection busy meanwhile, and the bytes a stalled relay holds
/// are then one read's buffer (TLS encrypts a whole read into one buffer, which a second read while it is
/// queued would duplicate). A read leaves 1/256 of the window for the framing that TLS adds, so that the
/// encrypted read still fits a buffer of the window's size. While the process' `RelayBudget` is full, reads
/// ask for `minimumRead` only: relays slow down instead of stopping, so that none waits for bytes that
/// other relays hold (which could wait for it in turn). Lives on the channel's event loop.
final class RelayReadWindow {
    /// The smallest read asked for, even when less room is left (a read of zero bytes would be taken for the
    /// end of the input).
    static let minimumRead = 1024
    /// The first read's size.
    static let initialRead = 2048

    /// The most bytes in flight (plus at most one `minimumRead`).
    let limit: Int
    /// The most bytes one read asks for: the window less the room left for TLS framing.
    private let maximumRead: Int
    /// Bytes read and handed to the partner, not yet written by it.
    private(set) var inFlight = 0
    private var nextRead: Int
    private var lastRead = 0
    private var shortReads = 0
    private let budget: RelayBudget?

    /// Makes a window of `limit` bytes (at least `minimumRead`), its reads shrinking while `budget` is full.
    init(limit: Int, budget: RelayBudget? = nil) {
        self.budget = budget
        self.limit = max(limit, Self.minimumRead)
        self.maximumRead = self.limit - self.limit / 256
        self.nextRead = min(Self.initialRead, self.maximumRead)
    }

    /// Whether the relay may read: nothing is in flight.
    var hasRoom: Bool {
        self.inFlight == 0
    }

    /// The size of the next read: the adapted size, within the room left, never below `minimumRead`, and
    /// `minimumRead` while the budget is full.
    func readSize() -> Int {
        var size = max(Self.minimumRead, min(self.nextRead, self.maximumRead - self.inFlight))
        if let budget = self.budget, !budget.hasRoom {
            size = Self.minimumRead
        }
        self.lastRead = size
        return size
    }

    /// A read of `size` bytes (as asked by `readSize()`) returned `count` bytes.
    func recorded(_ count: Int) {
        if count >= self.lastRead {
            self.shortReads = 0
            self.nextRead = min(self.nextRead * 2, self.maximumRead)
        } else if count < self.lastRead / 2 {
            self.shortReads += 1
            if self.shortReads >= 2 {
                self.shortReads = 0
                self.nextRead = max(self.nextRead / 2, Self.minimumRead)
            }
        } else {
            self.shortReads = 0
        }
    }

    /// `count` bytes were handed to the partner (counted in the budget too).
    func sent(_ count: Int) {
        self.inFlight += count
        self.budget?.take(count)
    }

    /// `count` bytes handed to the partner were written (or dropped with it).
    func written(_ count: Int) {
        self.inFlight -= count
        self.budget?.give(count)
    }
}

@available(*, unavailable)
extension RelayReadWindow: Sendable {}

/// The receive allocator of a relayed channel: every read gets a fresh buffer of the size its
/// `RelayReadWindow` allows.
///
/// SwiftNIO pools receive buffers per channel and reuses one whenever it is no longer referenced, at the
/// largest capacity it ever reached; answering no `nextBufferSize()` and "may grow" after every read
/// keeps it from reusing any, so a read never exceeds the window and an idle connection keeps no large
/// buffer. (The pool keeps the channel's first buffer, `initialRead` bytes.)
struct RelayReadAllocator: RecvByteBufferAllocator, @unchecked Sendable {
    // Unchecked: SwiftNIO calls a channel's receive allocator only on the channel's event loop, where the
    // window lives, and the allocator is made there and set as the option of that one channel.
    let window: RelayReadWindow

    func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
        allocator.buffer(capacity: self.window.readSize())
    }

    func nextBufferSize() -> Int? {
        nil
    }

    mutating func record(actualReadBytes: Int) -> Bool {
        self.window.recorded(actualReadBytes)
        return true
    }
}
