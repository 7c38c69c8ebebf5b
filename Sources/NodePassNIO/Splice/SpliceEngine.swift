import CNodePassLinux
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Relays pairs of plain TCP sockets in the kernel with splice(2): socket → pipe → socket, so that relayed
/// bytes are never copied through user space.
///
/// Each engine is one thread waiting on its own epoll instance (edge-triggered). A relay, once added, is
/// touched only by that thread; other threads reach it through `close(_:)`, which queues a command and wakes
/// the thread through an eventfd. Pipes are taken from a small pool while a direction has bytes in flight
/// and given back as soon as it is drained, so an idle relay holds no pipe.
///
/// The engines of the process are shared by its tunnels through `SpliceEngines`, which starts them for the
/// first tunnel and stops them (the threads end, every descriptor is closed) after the last.
final class SpliceEngine: @unchecked Sendable {

    /// Bytes a pipe is asked to hold; the kernel may grant less. In the benchmark, 1 MiB against 256 KiB moved
    /// 1.16× the bytes of 8 streams for 0.8× the CPU per GiB. A pipe's size counts against the user's pipe
    /// budget (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default) for as long as the pipe exists (memory
    /// is only used while it holds bytes); past that budget an unprivileged process gets smaller pipes, which
    /// still work, more slowly.
    static let pipeCapacity = 1024 * 1024
    /// Drained pipes kept for reuse by each engine, 16 in all; beyond this they are closed (kept small: see
    /// `pipeCapacity`).
    static let pipePoolLimit = max(1, 16 / max(1, System.coreCount))
    /// Moves per relay direction before the engine turns to other relays.
    static let movesPerTurn = 32
    /// How often a relay that could not get a pipe tries again.
    static let pipeRetryInterval: TimeAmount = .milliseconds(50)
    /// How often idle relays are looked for, when any relay has an idle timeout.
    static let idleSweepInterval: TimeAmount = .seconds(1)

    private enum Command {
        case add(SpliceRelay)
        case close(UInt64)
        case stop
    }

    private let epoll: Int32
    private let wakeup: Int32
    private let commands = Locked<[Command]>([])
    private let threadPool: NIOThreadPool

    // Engine thread only.
    private var relays: [UInt64: SpliceRelay] = [:]
    private var pipes: [SplicePipe] = []
    private var pendingTurns: [UInt64] = []
    /// The relay IDs being turned from `pendingTurns` or `waitingForPipes`; kept, with its capacity, so that a
    /// turn of the loop allocates nothing.
    private var turning: [UInt64] = []
    /// Relays that could not get a pipe (out of file descriptors), retried every `pipeRetryInterval`.
    private var waitingForPipes: [UInt64] = []
    private var lastPipeWarning = NIODeadline.distantPast
    private var lastPipeError = Errno(code: 0)
    private var relaysWithIdleTimeout = 0
    /// Relays with a direction whose source has ended: the sweep checks their flush deadline.
    private var relaysWatchingFlush = 0
    private var lastSweep = NIODeadline.now()

    /// Starts an engine thread; nil when splice(2) is not available (not Linux, or no epoll or eventfd).
    init?() {
        let epoll = np_epoll_create()
        guard epoll >= 0 else { return nil }
        let wakeup = np_eventfd()
        guard wakeup >= 0, np_epoll_add_readable(epoll, wakeup, 0) == 0 else {
            closeDescriptor(epoll)
            if wakeup >= 0 { closeDescriptor(wakeup) }
            return nil
        }
        self.epoll = epoll
        self.wakeup = wakeup
        self.threadPool = NIOThreadPool(numberOfThreads: 1)
        self.threadPool.start()
        self.threadPool.submit { state in
            guard case .active = state else { return }
            self.run()
        }
    }

    /// Hands `relay` to the engine thread, which starts moving bytes at once.
    func add(_ relay: SpliceRelay) {
        self.send(.add(relay))
    }

    /// Closes the relay `id` (both sockets) if it is still running; its `onEnd` runs on the engine thread.
    func close(_ id: UInt64) {
        self.send(.close(id))
    }

    /// Ends every relay still running, closes the engine's descriptors and ends its thread.
    func stop() async {
        self.send(.stop)
        try? await self.threadPool.shutdownGracefully()
    }

    private func send(_ command: Command) {
        let first = self.commands.withLock { commands -> Bool in
            commands.append(command)
            return commands.count == 1
        }
        if first { _ = np_eventfd_signal(self.wakeup) }
    }

    // MARK: - Engine thread

    private func run() {
        let capacity = 256
        let tokens = UnsafeMutablePointer<UInt64>.allocate(capacity: capacity)
        let flags = UnsafeMutablePointer<UInt32>.allocate(capacity: capacity)
        defer {
            tokens.deallocate()
            flags.deallocate()
        }
        var running = true
        while running {
            let timeout: Int32
            if !self.pendingTurns.isEmpty {
                timeout = 0
            } else if !self.waitingForPipes.isEmpty {
                timeout = Int32(Self.pipeRetryInterval.nanoseconds / 1_000_000)
            } else if self.relaysWithIdleTimeout > 0 || self.relaysWatchingFlush > 0 {
                timeout = Int32(Self.idleSweepInterval.nanoseconds / 1_000_000)
            } else {
                timeout = -1
            }
            let count = np_epoll_wait(self.epoll, tokens, flags, Int32(capacity), timeout)
            if count < 0 && errno != EINTR {
                // Cannot happen with a valid epoll descriptor; back off rather than spin.
                usleep(10_000)
                continue
            }
            for index in 0..<Int(max(0, count)) {
                let token = tokens[index]
                if token == 0 {
                    np_eventfd_drain(self.wakeup)
                    running = self.runCommands()
                } else {
                    self.handle(id: token >> 1, side: Int(token & 1), flags: flags[index])
                }
            }
            self.runPendingTurns()
            self.retryPipes()
            self.sweepTimeouts()
        }
        for relay in self.relays.values { self.end(relay, reason: nil) }
        for pipe in self.pipes { pipe.close() }
        self.pipes.removeAll()
        closeDescriptor(self.epoll)
        closeDescriptor(self.wakeup)
    }

    /// Runs the commands queued by other threads; false after `stop`.
    private func runCommands() -> Bool {
        let commands = self.commands.withLock { commands -> [Command] in
            defer { commands = [] }
            return commands
        }
        var running = true
        for command in commands {
            switch command {
            case .add(let relay):
                if running {
                    self.start(relay)
                } else {
                    self.finish(relay)
                }
            case .close(let id):
                if let relay = self.relays[id] { self.end(relay, reason: nil) }
            case .stop:
                running = false
            }
        }
        return running
    }

    private func start(_ relay: SpliceRelay) {
        guard np_epoll_add(self.epoll, relay.sockets.0, relay.id << 1) == 0,
            np_epoll_add(self.epoll, relay.sockets.1, relay.id << 1 | 1) == 0
        else {
            relay.logger.warning(
                "cannot watch a relayed connection; closed",
                metadata: ["np.error": "\(Errno.current)"]
            )
            self.finish(relay)
            return
        }
        self.relays[relay.id] = relay
        if relay.idleTimeout != nil { self.relaysWithIdleTimeout += 1 }
        relay.lastActivity = .now()
        // Bytes may be waiting already (and the prefixes must go out): move them now.
        self.turn(relay, 0, then: 1)
    }

    /// `side` 0 is the relay's first socket: readable moves direction 0 (first → second), writable moves
    /// direction 1 (second → first).
    private func handle(id: UInt64, side: Int, flags: UInt32) {
        guard let relay = self.relays[id] else { return }
        if flags & UInt32(NP_HANGUP | NP_ERROR) != 0 {
            // The peer ended its output or the connection: what this side's direction still holds must move
            // within the flush deadline (its end may wait behind bytes that a stalled destination never takes).
            relay.directions[side].sourceHungUp()
        }
        if flags & UInt32(NP_ERROR) != 0 {
            // Reading the socket surfaces its error after the bytes that came before it. When its reading
            // direction is already done (a half-closed user), nothing would read it: ask for the error.
            let socket = side == 0 ? relay.sockets.0 : relay.sockets.1
            if relay.directions[side].finished {
                let code = np_socket_error(socket)
                if code != 0 {
                    self.fail(relay, socket: socket, error: Errno(code: code))
                    return
                }
            }
            self.turn(relay, side, then: 1 - side)
            return
        }
        let reading: Int? = flags & UInt32(NP_READABLE | NP_HANGUP) != 0 ? side : nil
        let writing: Int? = flags & UInt32(NP_WRITABLE) != 0 ? 1 - side : nil
        self.turn(relay, reading ?? writing, then: reading == nil ? nil : writing)
    }

    /// Moves direction `first`, then `second` (either may be nil), then ends the relay if both are finished.
    /// Two parameters rather than a list: this runs for every readiness event, and allocates nothing.
    private func turn(_ relay: SpliceRelay, _ first: Int?, then second: Int? = nil) {
        var again = false
        var noPipe = false
        var next = first
        var following = second
        while let index = next {
            next = following
            following = nil
            switch relay.directions[index].move(engine: self, relay: relay) {
            case .waiting, .finished:
                break
            case .again:
                again = true
            case .noPipe:
                noPipe = true
            case .failed(let error, let socket):
                self.fail(relay, socket: socket, error: error)
                return
            }
        }
        if relay.directions[0].finished && relay.directions[1].finished {
            self.end(relay, reason: relay.failure)
            return
        }
        if !relay.watchesFlush && (relay.directions[0].sourceGone || relay.directions[1].sourceGone) {
            relay.watchesFlush = true
            self.relaysWatchingFlush += 1
        }
        if again { self.pendingTurns.append(relay.id) }
        if noPipe { self.waitingForPipes.append(relay.id) }
    }

    /// A call on `socket` failed: the direction writing to it is dropped, the direction reading from it
    /// delivers what it already read to the other socket, then the relay ends. A second failure ends the
    /// relay at once.
    private func fail(_ relay: SpliceRelay, socket: Int32, error: Errno) {
        guard relay.failure == nil else {
            self.end(relay, reason: error)
            return
        }
        relay.failure = error
        let reading = relay.directions[0].source == socket ? 0 : 1
        relay.directions[1 - reading].abandon()
        relay.directions[reading].stopReading()
        self.turn(relay, reading)
    }

    private func runPendingTurns() {
        guard !self.pendingTurns.isEmpty else { return }
        swap(&self.pendingTurns, &self.turning)
        self.turnBothWays()
    }

    /// Moves both directions of each relay still running among `turning`, then empties it (keeping its
    /// storage). Turns that need another go are queued again meanwhile.
    private func turnBothWays() {
        for id in self.turning {
            guard let relay = self.relays[id] else { continue }
            self.turn(relay, 0, then: 1)
        }
        self.turning.removeAll(keepingCapacity: true)
    }

    private func retryPipes() {
        guard !self.waitingForPipes.isEmpty else { return }
        let now = NIODeadline.now()
        if now - self.lastPipeWarning >= .seconds(1), let relay = self.relays[self.waitingForPipes[0]] {
            self.lastPipeWarning = now
            relay.logger.warning(
                "cannot make a pipe for a spliced relay; retrying",
                metadata: ["np.error": "\(self.lastPipeError)", "np.relays": "\(self.waitingForPipes.count)"]
            )
        }
        swap(&self.waitingForPipes, &self.turning)
        self.turnBothWays()
    }

    private func sweepTimeouts() {
        guard self.relaysWithIdleTimeout > 0 || self.relaysWatchingFlush > 0 else { return }
        let now = NIODeadline.now()
        guard now - self.lastSweep >= Self.idleSweepInterval else { return }
        self.lastSweep = now
        for relay in self.relays.values {
            if let timeout = relay.idleTimeout, now - relay.lastActivity >= timeout {
                relay.logger.debug("idle relay closed", metadata: ["np.peer": "\(relay.description)"])
                self.end(relay, reason: nil)
            } else if relay.watchesFlush,
                relay.directions.contains(where: { $0.isStuck(now: now, timeout: relay.flushTimeout) })
            {
                relay.logger.debug(
                    "relay closed: one side ended and the other took none of its bytes for the flush deadline",
                    metadata: ["np.peer": "\(relay.description)", "np.deadline": "\(relay.flushTimeout)"]
                )
                self.end(relay, reason: nil)
            }
        }
    }

    private func end(_ relay: SpliceRelay, reason: Errno?) {
        guard self.relays.removeValue(forKey: relay.id) != nil else { return }
        if relay.idleTimeout != nil { self.relaysWithIdleTimeout -= 1 }
        if relay.watchesFlush { self.relaysWatchingFlush -= 1 }
        _ = np_epoll_remove(self.epoll, relay.sockets.0)
        _ = np_epoll_remove(self.epoll, relay.sockets.1)
        if let reason {
            relay.logger.debug(
                "relay ended by an error",
                metadata: ["np.peer": "\(relay.description)", "np.error": "\(reason)"]
            )
        }
        self.finish(relay)
    }

    /// Closes the relay's sockets and pipes and reports its end.
    private func finish(_ relay: SpliceRelay) {
        for index in 0..<2 {
            if let pipe = relay.directions[index].pipe {
                relay.directions[index].pipe = nil
                // Bytes still in the pipe belong to no one now.
                pipe.close()
            }
        }
        closeDescriptor(relay.sockets.0)
        closeDescriptor(relay.sockets.1)
        relay.onEnd()
    }

    func takePipe() -> SplicePipe? {
        if let pipe = self.pipes.popLast() { return pipe }
        guard let pipe = SplicePipe(capacity: Self.pipeCapacity) else {
            self.lastPipeError = Errno.current
            return nil
        }
        return pipe
    }

    /// Takes back an empty pipe.
    func recycle(_ pipe: SplicePipe) {
        if self.pipes.count < Self.pipePoolLimit {
            self.pipes.append(pipe)
        } else {
            pipe.close()
        }
    }
}

/// A non-blocking pipe used as the kernel buffer between two sockets.
struct SplicePipe {
    let reader: Int32
    let writer: Int32
    /// Bytes the pipe can hold.
    let capacity: Int

    init?(capacity: Int) {
        var fds: [Int32] = [-1, -1]
        guard np_pipe(&fds) == 0 else { return nil }
        self.reader = fds[0]
        self.writer = fds[1]
        let granted = np_pipe_set_size(fds[1], Int32(capacity))
        // Without a larger pipe the default (16 pages) still works.
        self.capacity = granted > 0 ? Int(granted) : 16 * 4096
    }

    func close() {
        closeDescriptor(self.reader)
        closeDescriptor(self.writer)
    }
}

/// An errno value with its name, for log lines.
struct Errno: Error, CustomStringConvertible, Sendable {
    let code: Int32

    static var current: Errno { Errno(code: errno) }

    var description: String {
        guard let message = strerror(self.code) else { return "errno \(self.code)" }
        return "\(String(cString: message)) (errno \(self.code))"
    }
}
