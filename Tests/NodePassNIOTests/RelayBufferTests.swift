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

    @Test func theBudgetCallsThoseWaitingOnceItIsUnderItsLimitAgain() {
        let budget = RelayBudget(limit: 1000)
        let calls = Locked(0)
        #expect(!budget.waitForRoom { calls.withLock { $0 += 1 } })  // room: nothing kept
        budget.take(600)
        budget.take(600)
        #expect(!budget.hasRoom)
        #expect(budget.waitForRoom { calls.withLock { $0 += 1 } })
        #expect(budget.waitForRoom { calls.withLock { $0 += 1 } })
        budget.give(100)  // 1100: still full
        #expect(calls.withLock { $0 } == 0)
        budget.give(200)  // 900
        #expect(calls.withLock { $0 } == 2)
        budget.give(900)
        #expect(calls.withLock { $0 } == 2)  // called once each
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

    @Test func aRelayWaitsForTheBudgetAndIsCalledBackWhenBytesAreWritten() throws {
        let budget = RelayBudget(limit: 8 * 1024)
        let (channel, partner, held, reads) = try Self.relay(window: 64 * 1024, budget: budget)
        try channel.writeInbound(ByteBuffer(repeating: 1, count: 1024))
        channel.pipeline.fireChannelReadComplete()
        held.complete(1)
        #expect(reads.reads == 2)  // written at once: read again
        budget.take(8 * 1024)  // another relay's bytes fill the budget
        try channel.writeInbound(ByteBuffer(repeating: 2, count: 1024))
        channel.pipeline.fireChannelReadComplete()
        held.complete(1)
        channel.embeddedEventLoop.run()
        #expect(reads.reads == 2)  // its window has room, the budget not
        budget.give(8 * 1024)
        channel.embeddedEventLoop.run()  // the budget's call comes through the event loop
        #expect(reads.reads == 3)
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
