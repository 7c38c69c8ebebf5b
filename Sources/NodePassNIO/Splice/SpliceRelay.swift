import CNodePassLinux
import CoreMetrics
import Logging
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
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
        logger: Logger,
        description: String,
        onEnd: @escaping @Sendable () -> Void
    ) {
        self.id = id
        self.sockets = sockets
        self.directions = [directions.0, directions.1]
        self.idleTimeout = idleTimeout
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
        case failed(Errno)
    }

    let source: Int32
    let destination: Int32
    private var prefix: ByteBuffer
    var pipe: SplicePipe?
    private var bytesInPipe = 0
    private var sourceEnded: Bool
    private(set) var finished = false
    private let bytes: Counter?

    /// `sourceEnded`: the source's end of input was already read (after `prefix`).
    init(source: Int32, destination: Int32, prefix: ByteBuffer, sourceEnded: Bool, bytes: Counter?) {
        self.source = source
        self.destination = destination
        self.prefix = prefix
        self.sourceEnded = sourceEnded
        self.bytes = bytes
    }

    /// Moves what can be moved now, at most `SpliceEngine.movesPerTurn` calls.
    func move(engine: SpliceEngine, relay: SpliceRelay) -> Progress {
        guard !self.finished else { return .finished }
        for _ in 0..<SpliceEngine.movesPerTurn {
            if self.prefix.readableBytes > 0 {
                let written = self.prefix.withUnsafeReadableBytes { np_send(self.destination, $0.baseAddress, $0.count) }
                if written > 0 {
                    self.prefix.moveReaderIndex(forwardBy: written)
                    relay.touch()
                    continue
                }
                if let stop = Self.stop(after: written) { return stop }
                continue
            }
            if self.bytesInPipe > 0, let pipe = self.pipe {
                let moved = np_splice(pipe.reader, self.destination, self.bytesInPipe)
                if moved > 0 {
                    self.bytesInPipe -= moved
                    continue
                }
                if let stop = Self.stop(after: moved) { return stop }
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
                guard let pipe = engine.takePipe() else { return .failed(Errno.current) }
                self.pipe = pipe
            }
            guard let pipe = self.pipe else { return .failed(Errno(code: EBADF)) }
            let moved = np_splice(self.source, pipe.writer, pipe.capacity)
            if moved > 0 {
                self.bytesInPipe = moved
                self.bytes?.increment(by: Int64(moved))
                relay.touch()
                continue
            }
            if moved == 0 {
                self.sourceEnded = true
                continue
            }
            if let stop = Self.stop(after: moved) {
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

    /// What a failed call means: wait for readiness, retry (nil), or give up.
    private static func stop(after result: Int) -> Progress? {
        let code = errno
        if result == 0 { return .failed(Errno(code: EIO)) }
        switch code {
        case EAGAIN, EWOULDBLOCK: return .waiting
        case EINTR: return nil
        default: return .failed(Errno(code: code))
        }
    }
}
