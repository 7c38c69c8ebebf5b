import NIOCore
import NIOPosix
import Testing

@testable import NodePassNIO

/// Reads once; when that read has ended, moves the connection to `loop` with an `EchoHandler` and reports
/// what it read and the new channel.
private final class MoveAfterFirstRead: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let loop: any EventLoop
    private let moved: EventLoopPromise<(ByteBuffer, any Channel)>
    private var received = ByteBuffer()

    init(loop: any EventLoop, moved: EventLoopPromise<(ByteBuffer, any Channel)>) {
        self.loop = loop
        self.moved = moved
    }

    func channelActive(context: ChannelHandlerContext) {
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = self.unwrapInboundIn(data)
        self.received.writeBuffer(&buffer)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        let received = self.received
        let moved = self.moved
        SocketMove.move(context.channel, to: self.loop) { channel in
            try channel.pipeline.syncOperations.addHandler(EchoHandler())
        }.whenComplete { result in
            moved.completeWith(result.map { (received, $0) })
        }
    }
}

@Suite struct SocketMoveTests {
    @Test func aMovedConnectionCarriesOnOnTheOtherLoopWithoutLosingAByte() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let loops = Array(group.makeIterator())
        let moved = loops[0].makePromise(of: (ByteBuffer, any Channel).self)
        let listener = try await ServerBootstrap(group: loops[0])
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(MoveAfterFirstRead(loop: loops[1], moved: moved))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try #require(listener.localAddress?.port)
        let user = try await ClientBootstrap(group: loops[0])
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        try await user.executeThenClose { inbound, outbound in
            try await outbound.write(ByteBuffer(string: "before"))
            let (read, channel) = try await moved.futureResult.get()
            #expect(read == ByteBuffer(string: "before"))
            #expect(channel.eventLoop === loops[1])
            // The old channel is gone and the connection is not: what follows reaches the new channel, whose
            // echo comes back, and no end of stream came first.
            let payload = ByteBuffer(repeating: 0x61, count: 256 * 1024)
            try await outbound.write(payload)
            var echoed = ByteBuffer()
            var iterator = inbound.makeAsyncIterator()
            while echoed.readableBytes < payload.readableBytes, var chunk = try await iterator.next() {
                echoed.writeBuffer(&chunk)
            }
            #expect(echoed == payload)
            try await channel.close()
        }
        try await listener.close()
        try await group.shutdownGracefully()
    }
}
