import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// Hands memory that the allocator holds but no longer uses back to the system, every `period`.
///
/// Relayed connections allocate and free many buffers of a few KiB to a few tens of KiB (TLS records above
/// all); glibc keeps the freed pages in its arenas, so a long churn of connections made RSS creep up while
/// the memory in use stayed flat (seen in the soak run). `malloc_trim(0)` returns those pages; it runs on a
/// task of its own, never on an event loop. Elsewhere than glibc it does nothing.
public struct MemoryTrimmer: Service {
    /// How often memory is trimmed.
    public let period: Duration

    /// Makes a trimmer running every `period`.
    public init(period: Duration = .seconds(30)) {
        self.period = period
    }

    /// glibc's `malloc_trim`, looked up at run time (its header is not in the Glibc module).
    #if canImport(Glibc)
    static let mallocTrim: (@convention(c) (Int) -> Int32)? = {
        guard let symbol = dlsym(nil, "malloc_trim") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (Int) -> Int32).self)
    }()
    #endif

    public func run() async throws {
        #if canImport(Glibc)
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                try await cancelWhenGracefulShutdown {
                    try await Task.sleep(for: self.period)
                }
            } catch {
                return
            }
            _ = Self.mallocTrim?(0)
        }
        #else
        try? await gracefulShutdown()
        #endif
    }
}
