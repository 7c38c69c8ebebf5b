import CoreMetrics
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Relays the bytes its channel reads to a partner channel, one half of a relay pair.
///
/// Each side of a relay has its own `GlueHandler` whose partner is the other channel. The handler is put
/// in the pipeline when the channel is set up and stays idle until `connect(to:context:)` names the partner.
/// The channel must have `autoRead` off: this handler reads again only once the partner has written every
/// byte it was handed, and a completed write asks for the next read (backpressure, never a dropped byte).
/// Its `RelayReadWindow` (RELAY_BUFFER) sizes every read of the channel once the relay is connected
/// (`RelayReadAllocator`); while the process' `RelayBudget` (BUFFER_BUDGET) is full, reads shrink to
/// `RelayReadWindow.minimumRead` instead of stopping, so that relays holding nothing never wait for
/// relays they have nothing to do with.
/// End of input is passed on as a half-close once every byte before it has been written; an error or an
/// abrupt close closes both channels. Either waits for the partner to take the bytes queued for it as
/// long as it makes progress: a partner whose queue has not shrunk for `flushTimeout` is closed with what
/// it did not take, so that a peer that stopped reading cannot hold the relay (and a user's slot) once
/// the other side has gone.
///
/// With a `SpliceSetup` on both sides, a pair of plain sockets on one event loop moves to a `SpliceEngine`
/// once one direction has relayed `spliceAfter` bytes or after `SpliceSetup.moveAfter`, at a moment when
/// neither side has output queued (see `SpliceUpgrade`); the channels are then closed without touching the
/// sockets.
final class GlueHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    /// Where this half stands with the move of its relay to the kernel.
    private enum Move {
        /// Relaying in user space; the move may come (`timer`: the attempt scheduled, if any).
        case possible(timer: Scheduled<Void>?)
        /// Relaying in user space for good: no splice set-up, or the move was tried once.
        case never
        /// The pair is moving: no reads, and what arrives is held for the engine to write first.
        case moving(SpliceUpgrade, held: ByteBuffer)
        /// The sockets belong to the splice engine; this channel's close means nothing to the relay.
        case spliced
    }

    private var partner: (any Channel)?
    /// This handler's context while it is in a pipeline.
    private var context: ChannelHandlerContext?
    /// Bytes read before the partner was known (a read the partner asked for may overtake `connect`).
    private var early: ByteBuffer?
    private var pendingFlush = false
    /// A read was held back while bytes were in flight; the next completed write asks again.
    private var awaitingRoom = false
    private let window: RelayReadWindow
    private var inputEnded = false
    private var inactive = false
    /// This half's connection broke (`PoolConnectionBroken`): the partner is reset, not closed cleanly.
    private var broken = false
    private let bytes: Counter?
    private let splice: SpliceSetup?
    private let flushTimeout: TimeAmount
    private var move: Move
    /// Bytes this handler relayed in user space.
    private var relayed = 0
    /// Bytes one direction relays before the relay moves to the splice engine (or after
    /// `SpliceSetup.moveAfter`, whichever comes first).
    static let spliceAfter = 64 * 1024

    /// How long the partner's queued bytes may stay unmoved after this side ended, unless told otherwise.
    static let defaultFlushTimeout = TimeAmount.seconds(30)

    /// The window of a handler made without one.
    static let defaultWindow = 64 * 1024

    /// Makes an unconnected handler; `bytes` counts every byte it reads. With `splice`, the relay may move
    /// to the kernel (only when the partner's handler has one too). `flushTimeout`: how long the bytes
    /// queued for the partner may stay unmoved once this side ended. `window`: the most bytes read and not
    /// yet written by the partner; `budget`: the process' bound on those bytes, over every relay.
    init(
        bytes: Counter? = nil,
        splice: SpliceSetup? = nil,
        flushTimeout: TimeAmount = GlueHandler.defaultFlushTimeout,
        window: Int = GlueHandler.defaultWindow,
        budget: RelayBudget? = nil
    ) {
        self.bytes = bytes
        self.splice = splice
        self.flushTimeout = flushTimeout
        self.window = RelayReadWindow(limit: window, budget: budget)
        self.move = splice == nil ? .never : .possible(timer: nil)
    }

    /// Not connected, and nothing read or ended yet (it may leave its pipeline without losing anything).
    var isUntouched: Bool {
        self.partner == nil && self.early == nil && !self.inputEnded && !self.inactive
    }

    private var isMoving: Bool {
        if case .moving = self.move { return true }
        return false
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Starts relaying to `partner`; false when the handler is not in a pipeline. Must run on this handler's
    /// event loop.
    @discardableResult
    func connect(to partner: any Channel) -> Bool {
        guard let context = self.context else { return false }
        self.connect(to: partner, context: context)
        return true
    }

    private func connect(to partner: any Channel, context: ChannelHandlerContext) {
        guard self.partner == nil else { return }
        self.partner = partner
        // The window sizes the relay's reads, one read per wake-up (the window is the batch). Set here, not
        // when the handler is added: a pool connection that becomes a UDP carrier is never connected.
        if let options = context.channel.syncOptions {
            try? options.setOption(.recvAllocator, value: RelayReadAllocator(window: self.window))
            try? options.setOption(.maxMessagesPerRead, value: 1)
        }
        if let early = self.early {
            self.early = nil
            self.forward(early, to: partner, eventLoop: context.eventLoop)
        }
        if self.inactive {
            self.flushPending()
            self.close(partner, mode: .all)
            return
        }
        if self.inputEnded {
            self.passOnEndOfInput(to: partner)
            return
        }
        self.flushPending()
        // A connection that lives on moves to the engine even when it carries little: its memory in the
        // engine is a small record instead of two channels. Short connections end first. One half of the
        // pair keeps the time.
        if self.splice?.schedulesMove == true {
            self.scheduleSpliceAttempt(context: context)
        }
        self.readIfRoom(context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = self.unwrapInboundIn(data)
        self.bytes?.increment(by: Int64(buffer.readableBytes))
        if case .moving(let upgrade, var held) = self.move {
            // Out of the enum while it grows, so that the write does not copy it.
            self.move = .never
            held.writeBuffer(&buffer)
            self.move = .moving(upgrade, held: held)
            return
        }
        guard let partner = self.partner else {
            if self.early == nil {
                self.early = buffer
            } else {
                self.early?.writeBuffer(&buffer)
            }
            return
        }
        self.relayed += buffer.readableBytes
        self.forward(buffer, to: partner, eventLoop: context.eventLoop)
    }

    /// Hands `buffer` to the partner, counted in the window and the budget until the partner has written it.
    private func forward(_ buffer: ByteBuffer, to partner: any Channel, eventLoop: any EventLoop) {
        let count = buffer.readableBytes
        self.window.sent(count)
        // Made on this loop, the promise runs its callback here even when the partner lives elsewhere.
        let promise = eventLoop.makePromise(of: Void.self)
        partner.write(buffer, promise: promise)
        self.pendingFlush = true
        promise.futureResult.assumeIsolated().whenComplete { _ in
            self.window.written(count)
            if self.awaitingRoom, let context = self.context {
                self.readIfRoom(context: context)
            }
        }
    }

    /// Asks for the next read when the relay may read: connected, input open, not moving, nothing in flight.
    /// Otherwise notes that a read is owed (`awaitingRoom`).
    private func readIfRoom(context: ChannelHandlerContext) {
        self.awaitingRoom = false
        guard self.partner != nil, !self.inputEnded, !self.inactive else { return }
        switch self.move {
        case .possible, .never: break
        case .moving, .spliced: return
        }
        guard self.window.hasRoom else {
            self.awaitingRoom = true
            return
        }
        context.read()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        guard self.partner != nil, !self.isMoving else { return }
        self.flushPending()
        // Only a relay that carries more than a few messages is worth the move at once (short request and
        // reply connections would pay for it and gain nothing).
        if self.relayed >= Self.spliceAfter && self.trySplice(context: context) { return }
        self.readIfRoom(context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is PoolConnectionBroken {
            self.broken = true
            return
        }
        guard case ChannelEvent.inputClosed = event else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        self.inputEnded = true
        guard let partner = self.partner, !self.isMoving else { return }
        self.passOnEndOfInput(to: partner)
    }

    private func passOnEndOfInput(to partner: any Channel) {
        self.flushPending()
        self.close(partner, mode: .output)
    }

    /// Closes `partner` (`mode`) once it has written every byte queued for it, or fully once its queue did
    /// not shrink in a whole `flushTimeout`.
    private func close(_ partner: any Channel, mode: CloseMode) {
        // The two halves share an event loop, except in tests; elsewhere the first period only takes the
        // measure.
        let queued = NIOLoopBoundBox.makeBoxSendingValue(
            partner.eventLoop.inEventLoop ? Self.queuedBytes(partner) : Int.max,
            eventLoop: partner.eventLoop
        )
        let timeout = self.flushTimeout
        let check = partner.eventLoop.scheduleRepeatedTask(initialDelay: timeout, delay: timeout) { task in
            let now = Self.queuedBytes(partner)
            if now < queued.value {
                queued.value = now
                return
            }
            task.cancel()
            partner.close(promise: nil)
        }
        // The empty write completes after every earlier write, so the close loses no byte it could send.
        partner.writeAndFlush(ByteBuffer()).whenComplete { _ in
            check.cancel()
            partner.close(mode: mode, promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.inactive = true
        switch self.move {
        case .spliced:
            context.fireChannelInactive()
            return
        case .possible(let timer):
            timer?.cancel()
            self.move = .never
        case .moving(let upgrade, _):
            upgrade.abort()
        case .never:
            break
        }
        // A partner that is closed already (the usual end: both halves shut) needs nothing more.
        if let partner = self.partner, partner.isActive {
            if self.broken {
                Self.reset(partner)
            } else {
                self.flushPending()
                self.close(partner, mode: .all)
            }
        }
        context.fireChannelInactive()
    }

    /// Closes `partner` with a reset (SO_LINGER 0), so that its application sees an error, not an end.
    static func reset(_ partner: any Channel) {
        guard let options = partner as? any SocketOptionProvider else {
            partner.close(promise: nil)
            return
        }
        options.unsafeSetSocketOption(level: .socket, name: .so_linger, value: linger(l_onoff: 1, l_linger: 0))
            .whenComplete { _ in partner.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// Starts the move to the splice engine, once; true when it started (reading then stops).
    @discardableResult
    private func trySplice(context: ChannelHandlerContext) -> Bool {
        guard case .possible(let timer) = self.move, !self.inactive, let partner = self.partner else { return false }
        // Both halves must share this event loop (the move is one event-loop turn); that never changes.
        guard partner.eventLoop.inEventLoop else {
            timer?.cancel()
            self.move = .never
            return false
        }
        // Only a quiet relay moves: with output still queued (a slow reader) the move would pause both
        // directions until it drains. Try again later.
        guard Self.isQuiet(context.channel), Self.isQuiet(partner) else {
            self.scheduleSpliceAttempt(context: context)
            return false
        }
        timer?.cancel()
        self.move = .never
        return SpliceUpgrade.begin(self, context: context)
    }

    /// Tries the move after `SpliceSetup.moveAfter`, unless an attempt is already scheduled.
    private func scheduleSpliceAttempt(context: ChannelHandlerContext) {
        guard let splice = self.splice, case .possible(nil) = self.move else { return }
        let timer = context.eventLoop.assumeIsolated().scheduleTask(in: splice.moveAfter) {
            if case .possible = self.move { self.move = .possible(timer: nil) }
            self.trySplice(context: context)
        }
        self.move = .possible(timer: timer)
    }

    /// The bytes queued for output in `channel`. Must run on the channel's event loop.
    private static func queuedBytes(_ channel: any Channel) -> Int {
        (try? channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
    }

    /// Writable, with nothing queued for output. Must run on the channel's event loop.
    private static func isQuiet(_ channel: any Channel) -> Bool {
        guard channel.isWritable, let options = channel.syncOptions,
            let queued = try? options.getOption(.bufferedWritableBytes)
        else { return false }
        return queued == 0
    }

    private func flushPending() {
        if self.pendingFlush {
            self.pendingFlush = false
            self.partner?.flush()
        }
    }
}

// MARK: - The move to the kernel, as `SpliceUpgrade` sees a half

extension GlueHandler {
    /// What this half brings to a move: its splice set-up and its partner; nil when it cannot move now (no
    /// set-up, not connected, ended, inactive, already moving or moved).
    var spliceCandidate: (setup: SpliceSetup, partner: any Channel)? {
        guard let splice = self.splice, let partner = self.partner, !self.inputEnded, !self.inactive else {
            return nil
        }
        switch self.move {
        case .possible, .never: return (splice, partner)
        case .moving, .spliced: return nil
        }
    }

    /// The move began: no more reads; what arrives is held.
    func moveBegan(_ upgrade: SpliceUpgrade) {
        if case .possible(let timer) = self.move { timer?.cancel() }
        self.move = .moving(upgrade, held: ByteBuffer())
    }

    /// The move completed: the sockets belong to the engine. Returns what arrived during the move (for the
    /// engine to write first), whether the input had ended before it, and the byte counter of this direction.
    func moveCompleted() -> (held: ByteBuffer, inputEnded: Bool, bytes: Counter?) {
        guard case .moving(_, let held) = self.move else { return (ByteBuffer(), self.inputEnded, self.bytes) }
        self.move = .spliced
        return (held, self.inputEnded, self.bytes)
    }

    /// The move was given up: relay in user space from where it stopped.
    func moveAbandoned(channel: any Channel) {
        guard case .moving(_, let held) = self.move else { return }
        self.move = .never
        guard let partner = self.partner else { return }
        if held.readableBytes > 0 {
            self.forward(held, to: partner, eventLoop: channel.eventLoop)
        }
        // An inactive channel finishes in `channelInactive`.
        guard !self.inactive else { return }
        if self.inputEnded {
            self.passOnEndOfInput(to: partner)
            return
        }
        self.flushPending()
        if let context = self.context {
            self.readIfRoom(context: context)
        }
    }
}

@available(*, unavailable)
extension GlueHandler: Sendable {}

extension GlueHandler {
    /// Connects the `GlueHandler` already in `channel`'s pipeline to `partner`, on `channel`'s event loop
    /// (a look-up by type: the tunnel hands its relay ends their handler instead; tests use this).
    static func connect(_ channel: any Channel, to partner: any Channel) {
        channel.eventLoop.execute {
            guard let glue = try? channel.pipeline.syncOperations.handler(type: GlueHandler.self),
                glue.connect(to: partner)
            else {
                channel.close(promise: nil)
                partner.close(promise: nil)
                return
            }
        }
    }
}

/// One end of a relay that is not a pool connection (a user's or the target's connection) with its
/// `GlueHandler`, so that the relay starts without looking the handler up.
struct RelayEnd: Sendable {
    let channel: any Channel
    private let glue: NIOLoopBound<GlueHandler>

    /// Made on the channel's event loop, once the handler is in its pipeline.
    init(channel: any Channel, glue: GlueHandler) {
        self.channel = channel
        self.glue = NIOLoopBound(glue, eventLoop: channel.eventLoop)
    }

    /// Starts relaying this end to `partner` (on this end's event loop); closes both when the handler is gone.
    func connect(to partner: any Channel) {
        if self.channel.eventLoop.inEventLoop {
            self.connectNow(to: partner)
        } else {
            self.channel.eventLoop.execute { self.connectNow(to: partner) }
        }
    }

    /// Takes this end's `GlueHandler` out of its pipeline and puts a `ResumeLocalHandler` in its place (a
    /// resumable relay); nil when the channel is closed or has already read. Runs on the channel's loop.
    func replaceGlue() -> ResumeLocalHandler? {
        let glue = self.glue.value
        guard self.channel.isActive, glue.isUntouched else { return nil }
        let handler = ResumeLocalHandler()
        do {
            try self.channel.pipeline.syncOperations.addHandler(handler, position: .after(glue))
        } catch {
            return nil
        }
        self.channel.pipeline.syncOperations.removeHandler(glue, promise: nil)
        return handler
    }

    private func connectNow(to partner: any Channel) {
        guard self.glue.value.connect(to: partner) else {
            self.channel.close(promise: nil)
            partner.close(promise: nil)
            return
        }
    }
}
