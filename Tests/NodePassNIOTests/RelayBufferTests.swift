import NIOCore
import NIOEmbedded
import Testing

@testable import NodePassNIO

/// Holds every write that reaches it, as a socket whose peer stopped reading: its promises complete only
/// when the test says so (`complete`).
private final class HeldWrites: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer

    private(set) var held: [(bytes: Int, promise: EventLoopPromise<Void>?)] = []

    var heldBytes: Int { self.held.reduce(0) { $0 + $1.bytes } }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        self.held.append((self.unwrapOutboundIn(data).readableBytes, promise))
    }

    func flush(context: ChannelHandlerContext) {}

    /// Completes the oldest held writes, `count` of them.
    func complete(_ count: Int) {
        for _ in 0..<count {
            let (_, promise) = self.held.removeFirst()
            promise?.succeed()
        }
    }
}

/// Counts the reads the handlers after it ask for.
private final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = Any

    private(set) var reads = 0

    func read(context: ChannelHandlerContext) {
        self.reads += 1
        context.read()
    }
}

@available(*, unavailable)
extension HeldWrites: Sendable {}

@available(*, unavailable)
extension ReadCounter: Sendable {}

@Suite struct RelayBufferTests {
    // MARK: the window

    @Test func readsGrowWhileTheyFillTheirBufferAndShrinkAfterTwoShortOnes() {
        let window = RelayReadWindow(limit: 64 * 1024)
        #expect(window.readSize() == 2048)
        window.recorded(2048)
        #expect(window.readSize() == 4096)
        window.recorded(4096)
        #expect(window.readSize() == 8192)
        window.recorded(100)
        #expect(window.readSize() == 8192)  // one short read keeps the size
        window.recorded(100)
        #expect(window.readSize() == 4096)
        for _ in 0..<10 {
            window.recorded(window.readSize())
        }
        // Never above the window, less the room TLS framing takes.
        #expect(window.readSize() == 64 * 1024 - 256)
    }

    @Test func aReadAsksForNoMoreThanTheRoomLeftAndNeverForNothing() {
        let window = RelayReadWindow(limit: 16 * 1024)
        for _ in 0..<4 {
            window.recorded(window.readSize())
        }
        #expect(window.readSize() == 16 * 1024 - 64)
        #expect(window.hasRoom)
        window.sent(10 * 1024)
        #expect(!window.hasRoom)  // the next read waits for every byte in flight to be written
        #expect(window.readSize() == 16 * 1024 - 64 - 10 * 1024)
        window.sent(6 * 1024)
        #expect(window.readSize() == RelayReadWindow.minimumRead)
        window.written(8 * 1024)
        #expect(!window.hasRoom)
        #expect(window.readSize() == 8 * 1024 - 64)
        window.written(8 * 1024)
        #expect(window.hasRoom)
    }

    // MARK: the budget

    @Test func whileTheBudgetIsFullReadsShrinkToTheMinimum() {
        let budget = RelayBudget(limit: 8 * 1024)
        let window = RelayReadWindow(limit: 64 * 1024, budget: budget)
        for _ in 0..<4 {
            window.recorded(window.readSize())
        }
        #expect(window.readSize() == 32 * 1024)
        budget.take(6 * 1024)
        #expect(window.readSize() == 32 * 1024)  // room left
        budget.take(2 * 1024)
        #expect(!budget.hasRoom)
        #expect(window.readSize() == RelayReadWindow.minimumRead)
        budget.give(1)
        #expect(window.readSize() == 32 * 1024)
        budget.give(8 * 1024 - 1)
        #expect(budget.used == 0)
    }

    // MARK: a relay whose partner stopped taking bytes

    /// A connected relay end: `channel` reads into a `GlueHandler` whose partner holds its writes.
    private static func relay(
        window: Int,
        budget: RelayBudget? = nil
    ) throws -> (channel: EmbeddedChannel, partner: EmbeddedChannel, held: HeldWrites, reads: ReadCounter) {
        let reads = ReadCounter()
        let glue = GlueHandler(window: window, budget: budget)
        let channel = EmbeddedChannel(handlers: [reads, glue])
        let held = HeldWrites()
        let partner = EmbeddedChannel(handler: held, loop: channel.embeddedEventLoop)
        #expect(glue.connect(to: partner))
        return (channel, partner, held, reads)
    }

    @Test func aRelayReadsAgainOnlyOnceThePartnerWroteWhatItRead() throws {
        let (channel, partner, held, reads) = try Self.relay(window: 16 * 1024)
        #expect(reads.reads == 1)
        try channel.writeInbound(ByteBuffer(repeating: 1, count: 8 * 1024))
        channel.pipeline.fireChannelReadComplete()
        #expect(reads.reads == 1)  // in flight: no read
        // A read that comes anyway (TLS asks for more of a record) is taken, and still counted.
        try channel.writeInbound(ByteBuffer(repeating: 2, count: 4 * 1024))
        channel.pipeline.fireChannelReadComplete()
        #expect(reads.reads == 1)
        #expect(held.heldBytes == 12 * 1024)
        held.complete(1)
        #expect(reads.reads == 1)  // 4 KiB still in flight
        held.complete(1)
        #expect(reads.reads == 2)  // all written: the owed read
        #expect(try channel.finish().isClean)
        _ = try partner.finish()
    }

    @Test func aRelayHoldingNothingKeepsReadingWhenOthersFillTheBudget() throws {
        let budget = RelayBudget(limit: 8 * 1024)
        let (channel, partner, held, reads) = try Self.relay(window: 64 * 1024, budget: budget)
        budget.take(8 * 1024)  // other relays' bytes fill the budget (and may wait for this one)
        try channel.writeInbound(ByteBuffer(repeating: 1, count: 1024))
        channel.pipeline.fireChannelReadComplete()
        #expect(budget.used == 9 * 1024)
        #expect(reads.reads == 1)  // its own byte is in flight
        held.complete(1)
        #expect(reads.reads == 2)  // written: it reads again, budget or not
        budget.give(8 * 1024)
        #expect(budget.used == 0)
        #expect(try channel.finish().isClean)
        _ = try partner.finish()
    }

    @Test func writesDroppedWithAClosedPartnerGiveTheirBytesBack() throws {
        let budget = RelayBudget(limit: 1024 * 1024)
        let (channel, partner, held, _) = try Self.relay(window: 64 * 1024, budget: budget)
        try channel.writeInbound(ByteBuffer(repeating: 1, count: 20 * 1024))
        channel.pipeline.fireChannelReadComplete()
        #expect(budget.used == 20 * 1024)
        for (_, promise) in held.held { promise?.fail(ChannelError.ioOnClosedChannel) }
        #expect(budget.used == 0)
        _ = try channel.finish()
        _ = try partner.finish()
    }
}
