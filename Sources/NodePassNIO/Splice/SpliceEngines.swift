import NIOCore
import NIOPosix
import Synchronization

/// The splice engines of the process, shared by its tunnels: one per core, started when the first tunnel
/// acquires them and stopped when the last one releases them (after its relays have ended), so that a
/// process that stops its tunnels keeps no engine thread.
final class SpliceEngines: Sendable {
    /// The engines of this process.
    static let shared = SpliceEngines()

    private struct State {
        var holders = 0
        var engines: [SpliceEngine] = []
    }

    private let state = Locked(State())
    private let nextEngine = Atomic<Int>(0)

    /// A tunnel starts: the engines run until it calls `release()`.
    func acquire() {
        self.state.withLock { state in
            state.holders += 1
            guard state.engines.isEmpty else { return }
            for _ in 0..<max(1, System.coreCount) {
                guard let engine = SpliceEngine() else { break }
                state.engines.append(engine)
            }
        }
    }

    /// A tunnel that called `acquire()` has stopped and its relays have ended; the last one stops the engines.
    func release() async {
        let stopping = self.state.withLock { state -> [SpliceEngine] in
            state.holders = max(0, state.holders - 1)
            guard state.holders == 0 else { return [] }
            defer { state.engines = [] }
            return state.engines
        }
        for engine in stopping { await engine.stop() }
    }

    /// Runs `body` with the engines held when `enabled` (see `acquire()`), and lets them go after it, however
    /// it ends.
    func holding(if enabled: Bool, _ body: () async throws -> Void) async throws {
        guard enabled else { return try await body() }
        self.acquire()
        do {
            try await body()
        } catch {
            await self.release()
            throw error
        }
        await self.release()
    }

    /// Whether engines run (splice(2) is available and a tunnel holds them).
    var isRunning: Bool { self.state.withLock { !$0.engines.isEmpty } }

    /// The engine for the next relay (round robin), nil when none runs.
    func next() -> SpliceEngine? {
        let engines = self.state.withLock { $0.engines }
        guard !engines.isEmpty else { return nil }
        let index = self.nextEngine.wrappingAdd(1, ordering: .relaxed).oldValue
        return engines[index % engines.count]
    }
}
