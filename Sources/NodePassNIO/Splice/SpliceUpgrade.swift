import CoreMetrics
import Logging
import NIOCore
import NIOSSL

/// What a `GlueHandler` needs to move its relay to a `SpliceEngine`.
struct SpliceSetup: Sendable {
    let sessions: SessionTracker
    /// The relay ends when nothing moved for this long (nil: never); the shorter of the two sides wins.
    let idleTimeout: TimeAmount?
    let logger: Logger
    /// A relay that carries little moves after this long (one that carries more moves sooner).
    let moveAfter: TimeAmount
    /// Once a side's input has ended, the bytes the relay holds for the other side may stay unmoved this
    /// long (as `GlueHandler`'s flush deadline).
    let flushTimeout: TimeAmount
    /// Whether this half starts the `moveAfter` timer when the relay connects. One half of a pair is enough
    /// (either half moves both): the pool connection's half leaves it to the other, sparing every relay a
    /// timer.
    let schedulesMove: Bool

    init(
        sessions: SessionTracker,
        idleTimeout: TimeAmount? = nil,
        logger: Logger,
        moveAfter: TimeAmount = .seconds(1),
        flushTimeout: TimeAmount = GlueHandler.defaultFlushTimeout,
        schedulesMove: Bool = true
    ) {
        self.sessions = sessions
        self.idleTimeout = idleTimeout
        self.logger = logger
        self.flushTimeout = flushTimeout
        self.moveAfter = moveAfter
        self.schedulesMove = schedulesMove
    }
}

/// Moves a connected pair of `GlueHandler`s to a `SpliceEngine`, on their shared event loop:
///
/// 1. Both handlers stop reading; whatever NIO still delivers (a read already asked for, or the bytes
///    before an end of input) is held.
/// 2. An empty write on each channel completes once every earlier write is on the wire.
/// 3. In one event-loop turn: both sockets are duplicated, the sessions move to the relay, the channels are
///    closed (the duplicates keep the connections open, and nothing is sent), and the engine takes the
///    duplicates with the held bytes and ends of input.
///
/// If anything fails on the way (a channel closes, a duplicate cannot be made), both handlers resume relaying
/// in user space from where they stopped, and no byte is lost.
final class SpliceUpgrade {
    private struct Side {
        let handler: GlueHandler
        let channel: any Channel
        let setup: SpliceSetup
    }

    /// How long earlier writes may take to finish before the move is given up.
    static let flushLimit: TimeAmount = .seconds(2)

    private let first: Side
    private let second: Side
    private let engine: SpliceEngine
    private var settled = false

    private init(first: Side, second: Side, engine: SpliceEngine) {
        self.first = first
        self.second = second
        self.engine = engine
    }

    /// Starts the move when `handler` (just connected) and its partner's handler can be spliced; returns
    /// whether it started (the caller then must not read).
    static func begin(_ handler: GlueHandler, context: ChannelHandlerContext) -> Bool {
        guard let mine = handler.spliceCandidate, mine.partner.eventLoop.inEventLoop,
            let other = try? mine.partner.pipeline.syncOperations.handler(type: GlueHandler.self),
            let theirs = other.spliceCandidate, theirs.partner === context.channel,
            Self.isPlain(context.channel), Self.isPlain(mine.partner),
            let engine = SpliceEngines.shared.next()
        else { return false }
        let partner = mine.partner
        let upgrade = SpliceUpgrade(
            first: Side(handler: handler, channel: context.channel, setup: mine.setup),
            second: Side(handler: other, channel: partner, setup: theirs.setup),
            engine: engine
        )
        handler.moveBegan(upgrade)
        other.moveBegan(upgrade)
        // Earlier writes that cannot finish (a peer that reads only once its own bytes move) must not stall
        // both directions: past the limit, relaying goes on in user space.
        let limit = context.eventLoop.assumeIsolated().scheduleTask(in: Self.flushLimit) { upgrade.abort() }
        let flushed = context.channel.writeAndFlush(ByteBuffer())
        flushed.and(partner.writeAndFlush(ByteBuffer())).assumeIsolated().whenComplete { result in
            limit.cancel()
            switch result {
            case .success: upgrade.complete()
            case .failure: upgrade.abort()
            }
        }
        return true
    }

    /// No TLS and no seal in the pipeline: the socket carries the relayed bytes as they are.
    private static func isPlain(_ channel: any Channel) -> Bool {
        let operations = channel.pipeline.syncOperations
        return (try? operations.handler(type: NIOSSLHandler.self)) == nil
            && (try? operations.handler(type: SealedRecordHandler.self)) == nil
    }

    /// Gives up the move: both handlers relay in user space again.
    func abort() {
        guard !self.settled else { return }
        self.settled = true
        self.first.handler.moveAbandoned(channel: self.first.channel)
        self.second.handler.moveAbandoned(channel: self.second.channel)
    }

    private func complete() {
        guard !self.settled else { return }
        guard self.first.channel.isActive, self.second.channel.isActive else { return self.abort() }
        guard let firstSocket = SocketMove.duplicate(self.first.channel) else { return self.abort() }
        guard let secondSocket = SocketMove.duplicate(self.second.channel) else {
            closeDescriptor(firstSocket)
            return self.abort()
        }
        self.settled = true
        let timeouts = [self.first.setup.idleTimeout, self.second.setup.idleTimeout].compactMap { $0 }
        let setup = self.first.setup
        let sessions = setup.sessions
        let id = SpliceRelay.makeID()
        let engine = self.engine
        let keys = sessions.transfer([self.first.channel, self.second.channel]) { engine.close(id) }
        let firstPart = self.first.handler.moveCompleted()
        let secondPart = self.second.handler.moveCompleted()
        let relay = SpliceRelay(
            id: id,
            sockets: (firstSocket, secondSocket),
            directions: (
                Self.direction(firstPart, from: firstSocket, to: secondSocket),
                Self.direction(secondPart, from: secondSocket, to: firstSocket)
            ),
            idleTimeout: timeouts.min(),
            flushTimeout: min(self.first.setup.flushTimeout, self.second.setup.flushTimeout),
            logger: setup.logger,
            description: Self.describe(self.first.channel, self.second.channel),
            onEnd: { sessions.end(keys) }
        )
        self.first.channel.close(promise: nil)
        self.second.channel.close(promise: nil)
        engine.add(relay)
        if sessions.isClosing { engine.close(id) }
        setup.logger.debug("relay moved to the kernel (splice)", metadata: ["np.peer": "\(relay.description)"])
    }

    /// The direction reading `source`, with what its half held and whether its input had ended.
    private static func direction(
        _ part: (held: ByteBuffer, inputEnded: Bool, bytes: Counter?),
        from source: Int32,
        to destination: Int32
    ) -> SpliceDirection {
        SpliceDirection(
            source: source,
            destination: destination,
            prefix: part.held,
            sourceEnded: part.inputEnded,
            bytes: part.bytes
        )
    }

    private static func describe(_ first: any Channel, _ second: any Channel) -> String {
        let peers = [first, second].map { $0.remoteAddress.map { "\($0)" } ?? "?" }
        return peers.joined(separator: " <-> ")
    }
}
