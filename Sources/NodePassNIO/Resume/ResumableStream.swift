import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// One resumable relay (`V2Resume`): a user's or the target's connection (`local`) relayed over whichever
/// pool connection currently carries it. It outlives a pool connection that breaks: it keeps what it sent
/// until the other side acknowledges it, waits RESUME_GRACE for a new pool connection (the client dials
/// one, the server waits for it), sends again what the other side had not received, and goes on.
///
/// Reads from `local` are framed onto the pool connection and kept (`ResumeLedger`); reading pauses while
/// the relay keeps `ResumableRelays.keepLimit` bytes, or `keepFloor` while BUFFER_BUDGET is full. Frames from
/// the pool connection are written to `local`; the pool connection is read again once those writes are
/// done. Acks go out once `ackEvery` positions arrived in a read, else after `ackDelay`. The relay ends
/// when both directions ended and everything it sent was acknowledged; a `close` frame or a local
/// connection that closes before its end closes the other side too. Lives on its channels' event loop.
final class ResumableStream {
    /// A relay as other threads hold it.
    struct Handle: Sendable {
        let ticket: V2ResumeTicket
        let eventLoop: any EventLoop
        let stream: NIOLoopBound<ResumableStream>
    }

    /// What the end of the relay does to `local`.
    private enum LocalEnding {
        /// Close it (unless both of its directions are closed already).
        case close
        /// Reset it (SO_LINGER 0): bytes may have been lost.
        case reset
        /// Leave it: the caller closes it.
        case leave
    }

    private enum Phase {
        /// A pool connection carries the relay.
        case relaying(ResumePoolHandler)
        /// The pool connection broke; the relay waits for a new one until `grace` fires.
        case detached(grace: Scheduled<Void>?)
        case finished
    }

    let ticket: V2ResumeTicket
    let poolID: PoolID
    private let relays: ResumableRelays
    private let local: any Channel
    private let localHandler: ResumeLocalHandler
    private var phase: Phase = .detached(grace: nil)
    private var ledger = ResumeLedger()
    /// Local reads not yet written to the pool connection.
    private let localWindow: RelayReadWindow
    /// Pool reads not yet written to the local connection.
    private let poolWindow: RelayReadWindow
    private var localReadOwed = false
    private var poolReadOwed = false
    private var localInputEnded = false
    private var localOutputClosed = false
    private var localGone = false
    private var localBroken = false
    private var poolFlushOwed = false
    private var localFlushOwed = false
    /// The last bytes for `local` of this read, written when the read ends with the one promise that covers
    /// every write of the read (`localHeldCount` bytes).
    private var localHeld: ByteBuffer?
    private var localHeldCount = 0
    private var delayedAck: Scheduled<Void>?
    private var resumeAttempt: Scheduled<Void>?
    private var resumeDelay = TimeAmount.milliseconds(100)
    /// A resume connection is being opened (the client's).
    private var resumeInFlight = false
    private var brokenAt: NIODeadline?
    /// Counts the bytes read from `local`.
    private let bytes: Counter?
    /// Counts the bytes written to `local`.
    private let receivedBytes: Counter?
    /// Runs once when the relay ends.
    private var onFinish: [() -> Void] = []

    var eventLoop: any EventLoop { self.local.eventLoop }

    var handle: Handle {
        Handle(ticket: self.ticket, eventLoop: self.eventLoop, stream: NIOLoopBound(self, eventLoop: self.eventLoop))
    }

    /// Starts the relay of `local` (whose `ResumeLocalHandler` is `localHandler`) over `pool`, on their event
    /// loop. Returns nil when the pool connection cannot be handed off.
    static func start(
        ticket: V2ResumeTicket,
        local: any Channel,
        localHandler: ResumeLocalHandler,
        pool: PoolConnection,
        relays: ResumableRelays,
        bytes: Counter?,
        received: Counter?
    ) -> ResumableStream? {
        let stream = ResumableStream(
            ticket: ticket,
            poolID: pool.id,
            local: local,
            localHandler: localHandler,
            relays: relays,
            bytes: bytes,
            received: received
        )
        let poolHandler = ResumePoolHandler(stream: stream)
        localHandler.stream = stream
        // Relaying before the hand-off: the bytes the pool connection held come through it.
        stream.phase = .relaying(poolHandler)
        guard local.isActive, pool.handOff(toCarrier: poolHandler), poolHandler.isInPipeline else {
            stream.phase = .finished
            localHandler.stream = nil
            return nil
        }
        if relays.register(stream.handle, poolID: pool.id) {
            stream.onFinish.append { relays.unregister(ticket, poolID: pool.id) }
        } else {
            relays.logger.warning(
                "relay ID already live; this relay does not resume",
                metadata: ["np.pool.id": "\(pool.id)"]
            )
        }
        stream.attach(poolHandler, peerReceived: nil)
        return stream
    }

    private init(
        ticket: V2ResumeTicket,
        poolID: PoolID,
        local: any Channel,
        localHandler: ResumeLocalHandler,
        relays: ResumableRelays,
        bytes: Counter?,
        received: Counter?
    ) {
        self.receivedBytes = received
        self.ticket = ticket
        self.poolID = poolID
        self.local = local
        self.localHandler = localHandler
        self.relays = relays
        self.bytes = bytes
        self.localWindow = RelayReadWindow(limit: relays.relayBuffer, budget: relays.budget)
        self.poolWindow = RelayReadWindow(limit: relays.relayBuffer, budget: relays.budget)
        if let options = local.syncOptions {
            try? options.setOption(.recvAllocator, value: RelayReadAllocator(window: self.localWindow))
            try? options.setOption(.maxMessagesPerRead, value: 1)
        }
    }

    private var isFinished: Bool {
        if case .finished = self.phase { return true }
        return false
    }

    private var current: ResumePoolHandler? {
        if case .relaying(let handler) = self.phase { return handler }
        return nil
    }

    // MARK: the local connection

    func localRead(_ buffer: ByteBuffer) {
        guard !self.isFinished else { return }
        let count = buffer.readableBytes
        self.bytes?.increment(by: Int64(count))
        self.ledger.sending(buffer)
        self.relays.budget.take(count)
        self.localWindow.sent(count)
        guard let pool = self.current else {
            self.localWindow.written(count)
            return
        }
        let promise = self.eventLoop.makePromise(of: Void.self)
        // What arrived so far is acknowledged with these bytes, in the same write.
        pool.writeData(buffer, ack: self.takeOwedAck(), promise: promise)
        self.poolFlushOwed = true
        promise.futureResult.assumeIsolated().whenComplete { _ in
            self.localWindow.written(count)
            if self.localReadOwed { self.readLocalIfRoom() }
        }
    }

    func localReadComplete() {
        self.flushPool()
        self.readLocalIfRoom()
    }

    func localEnded() {
        guard !self.localInputEnded, !self.isFinished else { return }
        self.localInputEnded = true
        self.ledger.sendingEnd()
        if let pool = self.current {
            // What arrived so far is acknowledged with the end, in the same write.
            if let count = self.takeOwedAck() { pool.writeAck(count) }
            pool.writeFrame(type: V2Resume.endType)
            self.poolFlushOwed = true
            self.flushPool()
        }
        self.closeLocalIfDone()
    }

    /// The local connection failed (a reset, an error): its end is not clean.
    func localFailed() {
        self.localBroken = true
    }

    func localInactive() {
        // SwiftNIO closes a connection whose output is closed at the end of its input without passing on
        // the end of input: that is a clean end unless an error came first.
        if self.localOutputClosed && !self.localBroken && !self.localInputEnded {
            self.localEnded()
        }
        self.localGone = true
        guard !self.isFinished else { return }
        if self.localInputEnded && self.localOutputClosed {
            // A clean end: the relay lives on until the other side acknowledged everything.
            self.finishIfComplete()
            return
        }
        // Gone before its end: the other side closes its end too.
        self.relays.logger.debug("relay closed by its local end", metadata: ["np.pool.id": "\(self.poolID)"])
        if let pool = self.current {
            pool.writeFrame(type: V2Resume.abortType)
            self.poolFlushOwed = true
        }
        self.finish(local: .close)
    }

    /// Reads from `local` when the relay may: nothing in flight to the pool connection, and less kept than
    /// the bound (or the floor while the budget is full).
    private func readLocalIfRoom() {
        self.localReadOwed = false
        guard !self.localInputEnded, !self.localGone, !self.isFinished else { return }
        let limit = self.relays.budget.hasRoom ? self.relays.keepLimit : ResumableRelays.keepFloor
        guard self.localWindow.hasRoom, self.ledger.keptBytes < limit else {
            self.localReadOwed = true
            return
        }
        self.localHandler.read()
    }

    private func flushPool() {
        guard self.poolFlushOwed else { return }
        self.poolFlushOwed = false
        self.current?.flush()
    }

    private func flushLocal() {
        guard self.localFlushOwed else { return }
        self.localFlushOwed = false
        if let held = self.localHeld {
            let count = self.localHeldCount
            self.localHeld = nil
            self.localHeldCount = 0
            let promise = self.eventLoop.makePromise(of: Void.self)
            self.local.write(held, promise: promise)
            promise.futureResult.assumeIsolated().whenComplete { _ in
                self.poolWindow.written(count)
                if self.poolReadOwed { self.readPoolIfRoom() }
            }
        }
        self.local.flush()
    }

    // MARK: the pool connection

    func poolFrame(_ frame: V2ResumeFrameDecoder.Frame, from handler: ResumePoolHandler) {
        guard handler === self.current else { return }
        do {
            switch frame {
            case .data(let buffer):
                try self.ledger.receivedBytes(buffer.readableBytes)
                self.writeLocal(buffer)
            case .ack(let count):
                self.relays.budget.give(try self.ledger.acknowledged(count))
                if self.localReadOwed { self.readLocalIfRoom() }
                self.finishIfComplete()
            case .end:
                try self.ledger.receivedEnd()
                // The other side needs the ack of its end to finish; once this side's end was sent, it is
                // the last frame either side waits for. Until then it goes with this side's next frame (its
                // end, most often), or after `ackDelay`.
                if self.localInputEnded { self.sendAck() }
                self.flushLocal()
                self.localOutputClosed = true
                let local = self.local
                local.writeAndFlush(ByteBuffer()).assumeIsolated().whenComplete { _ in
                    local.close(mode: .output, promise: nil)
                    self.closeLocalIfDone()
                }
            case .abort:
                self.flushLocal()
                let local = self.local
                local.writeAndFlush(ByteBuffer()).whenComplete { _ in local.close(promise: nil) }
                self.finish(local: .leave)
            }
        } catch {
            self.poolViolated(error, from: handler)
        }
    }

    /// Writes `buffer` to `local`: the one before it goes out now, this one is held for `flushLocal`.
    private func writeLocal(_ buffer: ByteBuffer) {
        let count = buffer.readableBytes
        self.receivedBytes?.increment(by: Int64(count))
        self.poolWindow.sent(count)
        if let previous = self.localHeld {
            self.local.write(previous, promise: nil)
        }
        self.localHeld = buffer
        self.localHeldCount += count
        self.localFlushOwed = true
    }

    func poolReadComplete(from handler: ResumePoolHandler) {
        guard handler === self.current else { return }
        self.flushLocal()
        let unacknowledged = self.ledger.unacknowledgedReceived
        if unacknowledged >= ResumableRelays.ackEvery {
            self.sendAck()
        } else if unacknowledged > 0, self.delayedAck == nil {
            self.delayedAck = self.eventLoop.assumeIsolated().scheduleTask(in: ResumableRelays.ackDelay) {
                self.delayedAck = nil
                self.sendAck()
            }
        }
        self.flushPool()
        self.readPoolIfRoom()
    }

    /// Acknowledges everything received, at once.
    private func sendAck() {
        guard let pool = self.current, let count = self.takeOwedAck() else { return }
        pool.writeAck(count)
        self.poolFlushOwed = true
        self.flushPool()
    }

    /// The count to acknowledge when anything arrived since the last ack (the delayed ack is then not
    /// needed), else nil.
    private func takeOwedAck() -> UInt64? {
        guard self.current != nil, self.ledger.unacknowledgedReceived > 0 else { return nil }
        self.delayedAck?.cancel()
        self.delayedAck = nil
        return self.ledger.acknowledgingReceived()
    }

    private func readPoolIfRoom() {
        self.poolReadOwed = false
        guard let pool = self.current else { return }
        guard self.poolWindow.hasRoom else {
            self.poolReadOwed = true
            return
        }
        pool.read()
    }

    /// The pool connection broke the protocol: the relay cannot go on.
    func poolViolated(_ error: any Error, from handler: ResumePoolHandler) {
        guard handler === self.current else { return }
        self.relays.logger.warning(
            "resumable relay closed: its pool connection broke the protocol",
            metadata: ["np.pool.id": "\(self.poolID)", "np.error": "\(UserFacingError.describe(error))"]
        )
        self.finish(local: .reset)
    }

    /// The pool connection closed or failed: wait for a new one (the client dials it).
    func poolLost(_ handler: ResumePoolHandler) {
        guard handler === self.current else { return }
        self.flushLocal()
        if self.finishIfComplete() { return }
        self.brokenAt = .now()
        let grace = self.eventLoop.assumeIsolated().scheduleTask(in: self.relays.grace) {
            self.graceExpired()
        }
        self.phase = .detached(grace: grace)
        self.delayedAck?.cancel()
        self.delayedAck = nil
        self.relays.logger.info(
            "relay's pool connection broke; waiting to resume",
            metadata: [
                "np.pool.id": "\(self.poolID)", "np.resume.kept": "\(self.ledger.keptBytes)",
                "np.resume.grace": "\(DurationParser.format(self.relays.grace))",
            ]
        )
        if self.relays.isClient {
            self.resumeDelay = .milliseconds(100)
            self.attemptResume()
        }
    }

    private func graceExpired() {
        guard case .detached = self.phase else { return }
        self.relays.metrics.failedExpired.increment()
        self.relays.logger.warning(
            "relay closed: its pool connection did not come back within RESUME_GRACE",
            metadata: [
                "np.pool.id": "\(self.poolID)", "np.resume.grace": "\(DurationParser.format(self.relays.grace))",
            ]
        )
        self.finish(local: .reset)
    }

    // MARK: resuming

    /// The client dials a resume connection, again and again (from 100 ms to 2 s apart) until one works or
    /// the grace period ends.
    private func attemptResume() {
        // One attempt at a time: a second request would carry a count that the first one's answer may
        // overtake, and the server would send again what already arrived.
        guard case .detached = self.phase, !self.resumeInFlight, let connector = self.relays.connector else { return }
        self.resumeInFlight = true
        self.relays.metrics.attempted.increment()
        connector.openResumeConnection(for: self.handle).assumeIsolated().whenComplete { result in
            self.resumeInFlight = false
            // Still waiting (the attempt failed, or the connection it made broke at once): try again later.
            guard case .detached = self.phase, self.resumeAttempt == nil else { return }
            if case .failure(let error) = result {
                self.relays.logger.debug(
                    "resume attempt failed",
                    metadata: ["np.pool.id": "\(self.poolID)", "np.error": "\(UserFacingError.describe(error))"]
                )
            }
            let delay = self.resumeDelay
            self.resumeDelay = min(self.resumeDelay * 2, .seconds(2))
            self.resumeAttempt = self.eventLoop.assumeIsolated().scheduleTask(in: delay) {
                self.resumeAttempt = nil
                self.attemptResume()
            }
        }
    }

    /// The client's control channel reconnected (a new session): a path that broke the control channel may
    /// have broken this relay's pool connection too without either end noticing yet, so the relay resumes
    /// on a new one now (what the old one still carried is sent again).
    func sessionRestarted() {
        switch self.phase {
        case .finished:
            return
        case .relaying(let old):
            // Detached first, so that its close reports nothing; still the current one for `poolLost`.
            old.detach()
            old.close()
            self.poolLost(old)
        case .detached:
            self.resumeAttempt?.cancel()
            self.resumeAttempt = nil
            self.resumeDelay = .milliseconds(100)
            self.attemptResume()
        }
    }

    /// A resume connection is about to take over: detaches the current pool connection if any (the server
    /// may not have seen the old one break) and returns this side's count of received positions, which goes
    /// in the request or the answer. Nil when the relay has ended.
    func prepareResume() -> UInt64? {
        switch self.phase {
        case .finished:
            return nil
        case .relaying(let old):
            self.flushLocal()
            old.detach()
            old.close()
            self.phase = .detached(grace: nil)
        case .detached:
            break
        }
        return self.ledger.acknowledgingReceived()
    }

    /// The other side refused the resume (it no longer has the relay): the relay ends with a reset.
    func resumeRefused() {
        guard case .detached = self.phase else { return }
        self.relays.metrics.failedUnknown.increment()
        self.relays.logger.warning(
            "relay closed: the server no longer has it (it ended, its grace period passed, or it restarted)",
            metadata: ["np.pool.id": "\(self.poolID)"]
        )
        self.finish(local: .reset)
    }

    /// `handler`'s pool connection carries the relay from now on; the other side received `peerReceived`
    /// positions (nil at the start). What it has not received is sent again. False when the relay has
    /// ended or the count is impossible.
    @discardableResult
    func attach(_ handler: ResumePoolHandler, peerReceived: UInt64?) -> Bool {
        var previousGrace: Scheduled<Void>?
        switch self.phase {
        case .finished:
            return false
        case .relaying(let old) where old !== handler:
            self.flushLocal()
            old.detach()
            old.close()
        case .relaying:
            break
        case .detached(let grace):
            previousGrace = grace
        }
        previousGrace?.cancel()
        self.resumeAttempt?.cancel()
        self.resumeAttempt = nil
        self.phase = .relaying(handler)
        handler.prepareChannel(window: self.poolWindow)
        if let peerReceived {
            do {
                self.relays.budget.give(try self.ledger.acknowledged(peerReceived))
            } catch {
                self.poolViolated(error, from: handler)
                return false
            }
            let (resend, end) = self.ledger.unacknowledged
            var resent = 0
            for buffer in resend {
                resent += buffer.readableBytes
                handler.writeData(buffer, promise: nil)
            }
            if end { handler.writeFrame(type: V2Resume.endType) }
            self.poolFlushOwed = true
            self.relays.metrics.succeeded.increment()
            self.relays.metrics.bytesResent.increment(by: Int64(resent))
            let pause = self.brokenAt.map { NIODeadline.now() - $0 } ?? .zero
            let milliseconds = TimeAmount.milliseconds(pause.nanoseconds / 1_000_000)
            self.relays.logger.info(
                "relay resumed",
                metadata: [
                    "np.pool.id": "\(self.poolID)", "np.resume.resent": "\(resent)",
                    "np.resume.pause": "\(DurationParser.format(milliseconds))",
                ]
            )
        }
        self.flushPool()
        self.readPoolIfRoom()
        self.readLocalIfRoom()
        // The counts of a resume may complete the relay (both ends were sent and acknowledged before the break).
        self.finishIfComplete()
        return true
    }

    // MARK: the end

    /// Closes `local` once both of its directions are done.
    private func closeLocalIfDone() {
        guard self.localInputEnded, self.localOutputClosed, !self.localGone else { return }
        self.local.close(promise: nil)
    }

    /// Ends the relay when it is complete; true when it did.
    @discardableResult
    private func finishIfComplete() -> Bool {
        guard self.ledger.isComplete, self.localInputEnded, self.localOutputClosed else { return false }
        self.finish(local: .close)
        return true
    }

    /// Ends the relay: the pool connection closes once what was written to it is flushed, `local` closes
    /// (with a reset when bytes may have been lost).
    private func finish(local ending: LocalEnding) {
        let phase = self.phase
        self.phase = .finished
        self.delayedAck?.cancel()
        self.resumeAttempt?.cancel()
        switch phase {
        case .relaying(let pool):
            pool.detach()
            self.poolFlushOwed = false
            pool.flushAndClose()
        case .detached(let grace):
            grace?.cancel()
        case .finished:
            return
        }
        self.relays.budget.give(self.ledger.keptBytes)
        // Bytes held for `local` at an end that resets it are dropped; the budget gets them back.
        if self.localHeld != nil {
            self.localHeld = nil
            self.poolWindow.written(self.localHeldCount)
            self.localHeldCount = 0
        }
        if !self.localGone {
            switch ending {
            case .reset: GlueHandler.reset(self.local)
            case .close where !(self.localInputEnded && self.localOutputClosed): self.local.close(promise: nil)
            case .close, .leave: break
            }
        }
        // The local handler and this stream refer to each other: the cycle ends here.
        self.localHandler.stream = nil
        let onFinish = self.onFinish
        self.onFinish = []
        for body in onFinish { body() }
    }
}

@available(*, unavailable)
extension ResumableStream: Sendable {}
