import Logging
import NIOCore
import NIOPosix
import Testing

@testable import NodePassNIO

/// Makes `channel`'s close a reset (SO_LINGER 0).
private func resetOnClose(_ channel: any Channel) async throws {
    let options = try #require(channel as? any SocketOptionProvider)
    try await options.unsafeSetSocketOption(level: .socket, name: .so_linger, value: linger(l_onoff: 1, l_linger: 0))
        .get()
}

/// A service that answers once its client has ended its output: after `delay`, it sends back what it read,
/// then closes.
private final class LateAnswerHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let delay: TimeAmount
    private var received = ByteBuffer()

    init(delay: TimeAmount) {
        self.delay = delay
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = self.unwrapInboundIn(data)
        self.received.writeBuffer(&buffer)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard case ChannelEvent.inputClosed = event else { return context.fireUserInboundEventTriggered(event) }
        let answer = self.received
        let channel = context.channel
        context.eventLoop.scheduleTask(in: self.delay) {
            channel.writeAndFlush(answer).whenComplete { _ in channel.close(promise: nil) }
        }
    }
}

/// A one-hop relay in front of an echo service, built like the tunnel's: each accepted connection dials the
/// service on its own event loop, and the two `GlueHandler`s (with a `SpliceSetup`) are connected.
private struct SplicedRelay {
    let echo: any Channel
    let listener: any Channel
    let sessions: SessionTracker

    /// What the service behind the relay does.
    enum Service {
        case echo
        /// Reads nothing and never closes.
        case silent
        /// Reads nothing and never closes, with a small receive buffer (what is sent to it soon stays on the way).
        case silentAndSmall
        /// Sends this many bytes of 0x62 at once, then half-closes.
        case flood(Int)
        /// Answers `LateAnswerHandler`'s way, after this long.
        case lateAnswer(TimeAmount)
    }

    /// `userSendBuffer`: the relay's send buffer towards the user (small: output queues up in NIO).
    static func start(
        idleTimeout: TimeAmount? = nil,
        moveAfter: TimeAmount = .milliseconds(100),
        flushTimeout: TimeAmount = GlueHandler.defaultFlushTimeout,
        service: Service = .echo,
        userSendBuffer: Int? = nil
    ) async throws -> SplicedRelay {
        SpliceEngines.shared.acquire()
        try #require(SpliceEngines.shared.isRunning, "splice(2) is available on Linux")
        let group = MultiThreadedEventLoopGroup.singleton
        let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        let echo: any Channel
        switch service {
        case .echo:
            echo = try await EchoHandler.listen(group: group)
        case .silent, .silentAndSmall:
            var bootstrap = ServerBootstrap(group: group)
            if case .silentAndSmall = service {
                bootstrap = bootstrap.serverChannelOption(.socketOption(.so_rcvbuf), value: 4096)
            }
            echo =
                try await bootstrap
                .childChannelOption(.autoRead, value: false)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .bind(host: "127.0.0.1", port: 0).get()
        case .lateAnswer(let delay):
            echo = try await ServerBootstrap(group: group)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(LateAnswerHandler(delay: delay))
                    }
                }
                .bind(host: "127.0.0.1", port: 0).get()
        case .flood(let count):
            echo = try await ServerBootstrap(group: group)
                .childChannelOption(.autoRead, value: false)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            ChannelActiveHandler { channel in
                                channel.writeAndFlush(ByteBuffer(repeating: 0x62, count: count)).whenSuccess {
                                    channel.close(mode: .output, promise: nil)
                                }
                            }
                        )
                    }
                }
                .bind(host: "127.0.0.1", port: 0).get()
        }
        let echoPort = try #require(echo.localAddress?.port)
        let sessions = SessionTracker(limit: 16)
        var bootstrap = ServerBootstrap(group: group)
        if let userSendBuffer {
            bootstrap = bootstrap.childChannelOption(.socketOption(.so_sndbuf), value: userSendBuffer)
        }
        let listener =
            try await bootstrap
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { user in
                guard sessions.add(user) else { return user.close() }
                let setup = SpliceSetup(
                    sessions: sessions,
                    idleTimeout: idleTimeout,
                    logger: logger,
                    moveAfter: moveAfter,
                    flushTimeout: flushTimeout
                )
                // Relaying starts once the user's channel is active (as in the tunnel).
                let dial: @Sendable (any Channel) -> Void = { user in
                    ClientBootstrap(group: user.eventLoop)
                        .channelOption(.autoRead, value: false)
                        .channelOption(.allowRemoteHalfClosure, value: true)
                        .channelInitializer { target in
                            target.eventLoop.makeCompletedFuture {
                                try target.pipeline.syncOperations.addHandler(GlueHandler(splice: setup))
                            }
                        }
                        .connect(host: "127.0.0.1", port: echoPort)
                        .whenComplete { result in
                            guard case .success(let target) = result else { return user.close(promise: nil) }
                            GlueHandler.connect(user, to: target)
                            GlueHandler.connect(target, to: user)
                        }
                }
                return user.eventLoop.makeCompletedFuture {
                    try user.pipeline.syncOperations.addHandlers([
                        ChannelActiveHandler(onActive: dial), GlueHandler(splice: setup),
                    ])
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return SplicedRelay(echo: echo, listener: listener, sessions: sessions)
    }

    /// `receiveBuffer`: the user's socket receive buffer (small: a slow reader).
    func connectUser(receiveBuffer: Int? = nil) async throws -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
        let port = try #require(self.listener.localAddress?.port)
        var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        if let receiveBuffer {
            bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: receiveBuffer)
        }
        return
            try await bootstrap
            .channelOption(.allowRemoteHalfClosure, value: true)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(
                        wrappingChannelSynchronously: channel,
                        configuration: .init(isOutboundHalfClosureEnabled: true)
                    )
                }
            }
    }

    /// Waits for the relay's session to end (under the suite's time limit), then stops the relay and the service.
    func finish() async throws {
        await self.sessions.waitUntilEmpty()
        try await self.stop()
    }

    /// Stops the relay and the service, and lets the splice engines go.
    func stop() async throws {
        try await self.listener.close()
        try await self.echo.close()
        await SpliceEngines.shared.release()
    }
}

// Serialized: under ThreadSanitizer, with the other suites running at once, these tests are slow enough
// that running them side by side made the idle test's timing unreliable.
@Suite(.serialized, .timeLimit(.minutes(1))) struct SpliceRelayTests {
    @Test func splicedRelayKeepsEveryByteAndPassesOnTheHalfClose() async throws {
        let relay = try await SplicedRelay.start()
        // 2 MiB of a pattern that shows reordering or loss, written in uneven pieces.
        let payload = {
            var payload = ByteBuffer()
            for index in 0..<(2 * 1024 * 1024 / 4) {
                payload.writeInteger(UInt32(truncatingIfNeeded: index &* 2_654_435_761))
            }
            return payload
        }()
        let user = try await relay.connectUser()
        var received = ByteBuffer()
        try await user.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            // The first piece goes through before the move; the rest after it.
            var rest = payload
            let first = rest.readSlice(length: 4) ?? ByteBuffer()
            try await outbound.write(first)
            while received.readableBytes < 4, let chunk = try await iterator.next() {
                received.writeImmutableBuffer(chunk)
            }
            await relay.sessions.waitUntilSpliced(1)
            try await withThrowingTaskGroup(of: Void.self) { io in
                io.addTask { [rest] in
                    var rest = rest
                    var size = 1
                    while let piece = rest.readSlice(length: min(size, rest.readableBytes)), piece.readableBytes > 0 {
                        try await outbound.write(piece)
                        size = size * 7 % 300_007 + 1
                    }
                    outbound.finish()
                }
                while let chunk = try await iterator.next() { received.writeImmutableBuffer(chunk) }
                try await io.waitForAll()
            }
        }
        #expect(received == payload)
        // Both ends half-closed: the relay ends and its session with it.
        try await relay.finish()
    }

    @Test func closingTheSessionsCutsASplicedRelay() async throws {
        let relay = try await SplicedRelay.start()
        let user = try await relay.connectUser()
        try await user.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            try await outbound.write(ByteBuffer(string: "ping"))
            #expect(try await iterator.next() == ByteBuffer(string: "ping"))
            await relay.sessions.waitUntilSpliced(1)
            relay.sessions.closeAll()
            // The user sees the end of the stream, not a hang.
            #expect(try await iterator.next() == nil)
        }
        try await relay.finish()
    }

    @Test func idleTimeoutEndsASplicedRelay() async throws {
        // Long enough for the first round trip on a loaded machine, short enough for the test.
        let relay = try await SplicedRelay.start(idleTimeout: .seconds(2))
        let user = try await relay.connectUser()
        try await user.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            try await outbound.write(ByteBuffer(string: "ping"))
            #expect(try await iterator.next() == ByteBuffer(string: "ping"))
            await relay.sessions.waitUntilSpliced(1)
            let quiet = ContinuousClock.now
            // Nothing moves: the sweep (every second) ends the relay, and the user sees the end of the stream.
            #expect(try await iterator.next() == nil)
            // Generous: the bound is for a sweep that never runs, not for speed (ThreadSanitizer is slow).
            #expect(ContinuousClock.now - quiet < .seconds(30))
        }
        try await relay.finish()
    }

    @Test func aResetFromAHalfClosedUserEndsTheRelay() async throws {
        let relay = try await SplicedRelay.start(service: .silent)
        let port = try #require(relay.listener.localAddress?.port)
        let user = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .connect(host: "127.0.0.1", port: port).get()
        try await resetOnClose(user)
        await relay.sessions.waitUntilSpliced(1)
        // The user half-closes (the relay's reading of it is done), then resets.
        try await user.close(mode: .output).get()
        try await Task.sleep(for: .milliseconds(100))
        try await user.close().get()
        // The silent service never writes: only the reset can end the relay.
        await relay.sessions.waitUntilEmpty()
        try await relay.stop()
    }

    @Test func aSplicedRelayWhoseUserLeftEndsWhenItsBytesStopMoving() async throws {
        // No idle timeout: only the flush deadline can end this relay.
        let relay = try await SplicedRelay.start(flushTimeout: .seconds(1), service: .silentAndSmall)
        let port = try #require(relay.listener.localAddress?.port)
        let user = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port).get()
        await relay.sessions.waitUntilSpliced(1)
        // Far more than the way to the service holds: the relay keeps bytes it cannot deliver. Then the user
        // leaves with a reset.
        user.writeAndFlush(ByteBuffer(repeating: 0x61, count: 8 * 1024 * 1024), promise: nil)
        // Time for the bytes to reach the relay (nothing to await: the write never completes).
        try await Task.sleep(for: .milliseconds(300))
        try await resetOnClose(user)
        try await user.close().get()
        // Generous for ThreadSanitizer; without the deadline the relay would stay for ever.
        let cut = await relay.sessions.drain(timeout: .seconds(20))
        #expect(cut == 0, "the relay outlived its flush deadline")
        try await relay.stop()
    }

    @Test func aHalfClosedUserWaitsLongerThanTheFlushDeadlineForItsAnswer() async throws {
        // The deadline is for bytes that stop moving, not for a user who has said everything and waits.
        let relay = try await SplicedRelay.start(flushTimeout: .seconds(1), service: .lateAnswer(.seconds(3)))
        let user = try await relay.connectUser()
        try await user.executeThenClose { inbound, outbound in
            await relay.sessions.waitUntilSpliced(1)
            try await outbound.write(ByteBuffer(string: "question"))
            outbound.finish()
            var answer = ByteBuffer()
            for try await var chunk in inbound { answer.writeBuffer(&chunk) }
            #expect(answer == ByteBuffer(string: "question"))
        }
        try await relay.finish()
    }

    @Test func aRelayCarryingBytesMovesWithoutWaitingForTheTimer() async throws {
        let relay = try await SplicedRelay.start(moveAfter: .seconds(3600))
        let user = try await relay.connectUser()
        try await user.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            var received = 0
            // A short exchange stays in user space.
            try await outbound.write(ByteBuffer(string: "ping"))
            while received < 4, let chunk = try await iterator.next() { received += chunk.readableBytes }
            #expect(relay.sessions.splicedCount == 0)
            // Past 64 KiB in one direction, the relay moves.
            try await outbound.write(ByteBuffer(repeating: 0x61, count: 256 * 1024))
            while received < 4 + 256 * 1024, let chunk = try await iterator.next() { received += chunk.readableBytes }
            await relay.sessions.waitUntilSpliced(1)
            outbound.finish()
            while let chunk = try await iterator.next() { received += chunk.readableBytes }
            #expect(received == 4 + 256 * 1024)
        }
        try await relay.finish()
    }

    @Test func aRelayWithOutputQueuedForASlowReaderMovesOnlyOnceItDrained() async throws {
        let size = 4 * 1024 * 1024
        // The service sends 4 MiB at once; the user reads nothing yet, with small socket buffers on the way,
        // so the relay's output towards the user queues up in NIO.
        let relay = try await SplicedRelay.start(
            moveAfter: .milliseconds(100),
            service: .flood(size),
            userSendBuffer: 16384
        )
        let user = try await relay.connectUser(receiveBuffer: 16384)
        try await user.executeThenClose { inbound, _ in
            var iterator = inbound.makeAsyncIterator()
            var unmoved = 0
            for _ in 0..<10 {
                try await Task.sleep(for: .milliseconds(100))
                if relay.sessions.count == 1 && relay.sessions.splicedCount == 0 { unmoved += 1 }
            }
            #expect(unmoved == 10, "the relay moved while output was queued")
            var received = 0
            while let chunk = try await iterator.next() {
                #expect(chunk.readableBytesView.allSatisfy { $0 == 0x62 })
                received += chunk.readableBytes
            }
            #expect(received == size)
        }
        try await relay.finish()
    }
}
