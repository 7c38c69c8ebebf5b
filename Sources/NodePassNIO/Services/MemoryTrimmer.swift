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

    /// glibc's `mallopt`, looked up at run time for the same reason.
    #if canImport(Glibc)
    static let mallopt: (@convention(c) (Int32, Int32) -> Int32)? = {
        guard let symbol = dlsym(nil, "mallopt") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (Int32, Int32) -> Int32).self)
    }()
    #endif

    /// How much free memory a heap keeps at its top, and the size from which a block gets its own mapping.
    static let heapTop: Int32 = 1 << 20

    /// Lets each heap keep up to 1 MiB free at its top, and gives only blocks of 1 MiB or more a mapping of
    /// their own. By default glibc hands a heap's top back to the kernel on any free that leaves more than
    /// 128 KiB there (and maps blocks from 128 KiB on): a relay whose buffers come and go by more than that
    /// (sealed records: swift-crypto allocates each record's ciphertext twice) took a page fault per 4 KiB
    /// relayed, 635,000 a second in one test. What stays at the tops (at most 1 MiB per arena, and glibc
    /// makes up to eight arenas per core) is handed back by `run()` all the same. An operator's own setting
    /// (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`) is left as it is. Safe to call
    /// at any time (glibc takes its own lock); the command calls it as it starts its services. Elsewhere than
    /// glibc it does nothing.
    public static func keepHeapTops() {
        #if canImport(Glibc)
        let operatorSettings = ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"]
        guard operatorSettings.allSatisfy({ getenv($0) == nil }) else { return }
        let trimThreshold: Int32 = -1  // M_TRIM_THRESHOLD in glibc's malloc.h
        let mmapThreshold: Int32 = -3  // M_MMAP_THRESHOLD
        _ = Self.mallopt?(trimThreshold, Self.heapTop)
        _ = Self.mallopt?(mmapThreshold, Self.heapTop)
        #endif
    }

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
