import CNodePassLinux
import CoreMetrics
import Logging
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Two connected sockets relayed by a `SpliceEngine`: the descriptors (owned: the engine closes them), what
/// each direction still has to move, and what to do when the relay ends.
///
/// Made on an event loop, then touched only by its engine's thread.
final class SpliceRelay: @unchecked Sendable {
    private static let nextID = Atomic<UInt64>(1)

    /// Unique for the life of the process (never 0: token 0 is the engine's wake-up).
    let id: UInt64
    let sockets: (Int32, Int32)
    /// 0: first socket → second, 1: second → first.
    let directions: [SpliceDirection]
    /// The relay ends when nothing moved for this long (nil: never).
    let idleTimeout: TimeAmount?
    var lastActivity = NIODeadline.now()
    /// The relay ends when a direction whose source has ended holds bytes that did not move for this long.
    let flushTimeout: TimeAmount
    /// Whether the engine watches this relay's flush deadline (a direction's source has ended).
    var watchesFlush = false
    /// Set when a direction failed; the relay ends once the other one has delivered what it read.
    var failure: Errno?
    let logger: Logger
    /// The user's address, for log lines.
    let description: String
    /// Runs once on the engine thread when the relay has ended and its sockets are closed.
    let onEnd: @Sendable () -> Void

    /// A fresh relay ID.
    static func makeID() -> UInt64 {
        Self.nextID.wrappingAdd(1, ordering: .relaxed).oldValue
    }

    init(
        id: UInt64,
        sockets: (Int32, Int32),
        directions: (SpliceDirection, SpliceDirection),
        idleTimeout: TimeAmount?,
        flushTimeout: TimeAmount,
        logger: Logger,
        description: String,
        onEnd: @escaping @Sendable () -> Void
    ) {
        self.id = id
        self.sockets = sockets
        self.directions = [directions.0, directions.1]
        self.idleTimeout = idleTimeout
        self.flushTimeout = flushTimeout
        self.logger = logger
        self.description = description
        self.onEnd = onEnd
    }

    func touch() {
        if self.idleTimeout != nil { self.lastActivity = .now() }
    }
}

/// One direction of a spliced relay: source socket → pipe → destination socket, after the bytes that were
/// already read in user space (`prefix`) are written.
final class SpliceDirection {
    enum Progress {
        /// Waiting for the source to be readable or the destination writable.
        case waiting
        /// The turn's budget is spent; more may be ready.
        case again
        /// The source ended and the destination's write side is shut.
        case finished
        /// No pipe could be made (out of file descriptors): try again a little later.
        case noPipe
        /// A call on `socket` (this direction's source or destination) failed.
        case failed(Errno, socket: Int32)
    }

    let source: Int32
    let destination: Int32
    private var prefix: ByteBuffer
    var pipe: SplicePipe?
    private var bytesInPipe = 0
    private var sourceEnded: Bool
    /// The source ended its output (a hang-up seen, its end read, or a failure), perhaps with bytes still
    /// to read: from then on what this direction holds must keep moving (`isStuck`).
    private(set) var sourceGone: Bool
    /// When this direction last wrote to its destination, or its source went; kept once `sourceGone`.
    private var lastProgress = NIODeadline.uptimeNanoseconds(0)
    private(set) var finished = false
    private let bytes: Counter?

    /// `sourceEnded`: the source's end of input was already read (after `prefix`).
    init(source: Int32, destination: Int32, prefix: ByteBuffer, sourceEnded: Bool, bytes: Counter?) {
        self.source = source
        self.destination = destination
        self.prefix = prefix
        self.sourceEnded = sourceEnded
        self.sourceGone = sourceEnded
        if sourceEnded { self.lastProgress = .now() }
        self.bytes = bytes
    }

    /// The source hung up (its end may still be behind bytes not read yet).
    func sourceHungUp() {
        guard !self.sourceGone else { return }
        self.sourceGone = true
        self.lastProgress = .now()
    }

    /// Whether the source has gone and what this direction holds has not moved for `timeout`.
    func isStuck(now: NIODeadline, timeout: TimeAmount) -> Bool {
        self.sourceGone && !self.finished && now - self.lastProgress >= timeout
    }

    private func progressed(_ relay: SpliceRelay) {
        relay.touch()
        if self.sourceGone { self.lastProgress = .now() }
    }

    /// Moves what can be moved now, at most `SpliceEngine.movesPerTurn` calls.
    func move(engine: SpliceEngine, relay: SpliceRelay) -> Progress {
        guard !self.finished else { return .finished }
        for _ in 0..<SpliceEngine.movesPerTurn {
            if self.prefix.readableBytes > 0 {
                let written = self.prefix.withUnsafeReadableBytes {
                    np_send(self.destination, $0.baseAddress, $0.count)
                }
                if written > 0 {
                    self.prefix.moveReaderIndex(forwardBy: written)
                    self.progressed(relay)
                    continue
                }
                if let stop = Self.stop(after: written, socket: self.destination) { return stop }
                continue
            }
            if self.bytesInPipe > 0, let pipe = self.pipe {
                let moved = np_splice(pipe.reader, self.destination, self.bytesInPipe)
                if moved > 0 {
                    self.bytesInPipe -= moved
                    self.progressed(relay)
                    continue
                }
                if let stop = Self.stop(after: moved, socket: self.destination) { return stop }
                continue
            }
            if self.sourceEnded {
                if let pipe = self.pipe {
                    self.pipe = nil
                    engine.recycle(pipe)
                }
                // An error here (the peer already gone) is the other direction's to report.
                _ = np_shutdown_write(self.destination)
                self.finished = true
                return .finished
            }
            if self.pipe == nil {
                guard let pipe = engine.takePipe() else { return .noPipe }
                self.pipe = pipe
            }
            guard let pipe = self.pipe else { return .noPipe }
            let moved = np_splice(self.source, pipe.writer, pipe.capacity)
            if moved > 0 {
                self.bytesInPipe = moved
                self.bytes?.increment(by: Int64(moved))
                relay.touch()
                continue
            }
            if moved == 0 {
                self.sourceEnded = true
                self.sourceHungUp()
                continue
            }
            if let stop = Self.stop(after: moved, socket: self.source) {
                if case .waiting = stop {
                    // Drained: an idle direction holds no pipe.
                    self.pipe = nil
                    engine.recycle(pipe)
                }
                return stop
            }
        }
        return .again
    }

    /// The source failed: read nothing more, deliver what was already read, then shut the destination's
    /// write side (the relay then ends), as a user-space relay flushes before it closes.
    func stopReading() {
        self.sourceEnded = true
        self.sourceHungUp()
    }

    /// The destination failed: what this direction still held is dropped.
    func abandon() {
        self.finished = true
        self.prefix = ByteBuffer()
        self.bytesInPipe = 0
        if let pipe = self.pipe {
            self.pipe = nil
            pipe.close()
        }
    }

    /// What a failed call on `socket` (`result` is 0 or -errno) means: wait for readiness, retry (nil), or
    /// give up.
    private static func stop(after result: Int, socket: Int32) -> Progress? {
        let code = Int32(truncatingIfNeeded: -result)
        switch code {
        case 0: return .failed(Errno(code: EIO), socket: socket)
        case EAGAIN, EWOULDBLOCK: return .waiting
        case EINTR: return nil
        default: return .failed(Errno(code: code), socket: socket)
        }
    }
}

/// Closes a descriptor the splice relay owns (named apart from the `close` methods of the types here; the
/// splice(2) and epoll calls themselves are in CNodePassLinux, which reports ENOSYS off Linux, so that no
/// engine starts there).
func closeDescriptor(_ descriptor: Int32) {
    _ = close(descriptor)
}
