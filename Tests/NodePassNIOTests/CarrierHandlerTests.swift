import Logging
import NIOCore
import NIOEmbedded
import NodePassCore
import Testing

@testable import NodePassNIO

/// Records what a carrier reports.
private final class RecordingSide: CarrierDelegate {
    var frames: [DatagramFrame] = []
    var readsCompleted = 0
    var closed = false

    func carrier(_ id: UInt64, received frame: DatagramFrame) { self.frames.append(frame) }
    func carrierReadComplete(_ id: UInt64) { self.readsCompleted += 1 }
    func carrierClosed(_ id: UInt64) { self.closed = true }
}

@Suite struct CarrierHandlerTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    private func carrier() throws -> (EmbeddedChannel, CarrierHandler, RecordingSide) {
        let side = RecordingSide()
        let handler = CarrierHandler(id: 1, delegate: side, logger: Self.logger)
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandler(handler)
        return (channel, handler, side)
    }

    @Test func framesSplitAcrossReadsArriveWholeAndInOrder() throws {
        let (channel, _, side) = try self.carrier()
        var stream = ByteBuffer()
        let big = ByteBuffer(bytes: (0..<65_507).map { UInt8(truncatingIfNeeded: $0) })
        DatagramFrame.datagram(flow: 1, payload: ByteBuffer(string: "a")).write(to: &stream)
        DatagramFrame.datagram(flow: 2, payload: big).write(to: &stream)
        DatagramFrame.datagram(flow: 3, payload: ByteBuffer()).write(to: &stream)
        DatagramFrame.end(flow: 1).write(to: &stream)
        // Cut at every awkward place: inside a header, inside the big payload, between frames.
        for cut in [3, 10, 9_000, 40_000, stream.readableBytes] {
            let slice = stream.readSlice(length: min(cut, stream.readableBytes)) ?? ByteBuffer()
            try channel.writeInbound(slice)
        }
        #expect(
            side.frames == [
                .datagram(flow: 1, payload: ByteBuffer(string: "a")), .datagram(flow: 2, payload: big),
                .datagram(flow: 3, payload: ByteBuffer()), .end(flow: 1),
            ]
        )
        #expect(side.readsCompleted == 5)
        #expect(channel.isActive)
        _ = try channel.finish()
        #expect(side.closed)
    }

    @Test func aBrokenFrameClosesTheCarrier() throws {
        let (channel, _, side) = try self.carrier()
        var buffer = ByteBuffer()
        DatagramFrame.datagram(flow: 1, payload: ByteBuffer(string: "ok")).write(to: &buffer)
        buffer.writeBytes([0x09, 0, 0, 0, 1, 0, 0])
        try channel.writeInbound(buffer)
        #expect(side.frames.count == 1)
        #expect(!channel.isActive)
        #expect(side.closed)
    }

    @Test func writesAreFramedAndAFullCarrierRefusesADatagram() throws {
        let (channel, handler, _) = try self.carrier()
        #expect(handler.write(flow: 7, payload: ByteBuffer(string: "pong")))
        handler.writeEnd(flow: 7)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "nothing leaves before the flush")
        handler.flush()
        var written = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { written.writeBuffer(&part) }
        #expect(try DatagramFrame.read(from: &written) == .datagram(flow: 7, payload: ByteBuffer(string: "pong")))
        #expect(try DatagramFrame.read(from: &written) == .end(flow: 7))
        // A carrier that stays unwritable after a flush refuses the datagram instead of queueing it.
        channel.isWritable = false
        #expect(!handler.write(flow: 1, payload: ByteBuffer(string: "dropped")))
        channel.isWritable = true
        #expect(handler.write(flow: 1, payload: ByteBuffer(string: "sent")))
        _ = try? channel.finish()
    }

    @Test func aBatchOfFramesLeavesAsOneWriteAndALargeBatchLeavesBeforeTheFlush() throws {
        let (channel, handler, _) = try self.carrier()
        for flow in UInt32(0)..<10 {
            #expect(handler.write(flow: flow, payload: ByteBuffer(repeating: UInt8(flow), count: 100)))
        }
        handler.flush()
        var batch = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "ten datagrams, one write")
        for flow in UInt32(0)..<10 {
            let payload = ByteBuffer(repeating: UInt8(flow), count: 100)
            #expect(try DatagramFrame.read(from: &batch) == .datagram(flow: flow, payload: payload))
        }
        #expect(batch.readableBytes == 0)

        // Past `batchLimit` the frames go to the channel unflushed, where its write buffer counts them; the
        // frames after them start a new batch.
        let large = ByteBuffer(repeating: 1, count: 60_000)
        #expect(handler.write(flow: 1, payload: large))
        #expect(handler.write(flow: 2, payload: large))
        #expect(handler.write(flow: 3, payload: ByteBuffer(string: "after")))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "nothing leaves before the flush")
        handler.flush()
        var handedOver = try #require(try channel.readOutbound(as: ByteBuffer.self))
        var rest = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(handedOver.readableBytes >= CarrierHandler.batchLimit)
        #expect(try DatagramFrame.read(from: &handedOver) == .datagram(flow: 1, payload: large))
        #expect(try DatagramFrame.read(from: &handedOver) == .datagram(flow: 2, payload: large))
        #expect(handedOver.readableBytes == 0)
        #expect(try DatagramFrame.read(from: &rest) == .datagram(flow: 3, payload: ByteBuffer(string: "after")))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        _ = try? channel.finish()
    }

    @Test func aBatchTheChannelStillHoldsLeavesTheNextBatchAFreshSmallBuffer() throws {
        let (channel, handler, _) = try self.carrier()
        // The embedded channel keeps what was flushed until it is read, like a carrier the kernel is slow to
        // take from: the next batch must not get a buffer of the large batch's capacity.
        #expect(handler.write(flow: 1, payload: ByteBuffer(repeating: 1, count: 60_000)))
        handler.flush()
        #expect(handler.write(flow: 2, payload: ByteBuffer(string: "small")))
        handler.flush()
        let large = try #require(try channel.readOutbound(as: ByteBuffer.self))
        var small = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(large.readableBytes == DatagramFrame.headerLength + 60_000)
        #expect(small.capacity < 1024)
        #expect(try DatagramFrame.read(from: &small) == .datagram(flow: 2, payload: ByteBuffer(string: "small")))
        _ = try? channel.finish()
    }

    @Test func theFlowBudgetBoundsEveryCarrierTogether() async {
        let budget = DatagramFlowBudget(maximum: 100)
        // Two carriers' threads take flows at once: exactly the bound is granted.
        let granted = await withTaskGroup(of: Int.self) { group in
            for _ in 0..<2 {
                group.addTask { (0..<80).reduce(0) { count, _ in count + (budget.take() ? 1 : 0) } }
            }
            return await group.reduce(0, +)
        }
        #expect(granted == 100)
        #expect(!budget.take())
        budget.give(3)
        #expect(budget.take() && budget.take() && budget.take())
        #expect(!budget.take())
    }
}
