import Testing

@testable import NodePassNIO

#if canImport(Glibc)
import Glibc
#endif

@Suite struct MemoryTrimmerTests {
    #if canImport(Glibc)
    @Test func findsGlibcMallocTrim() throws {
        let trim = try #require(MemoryTrimmer.mallocTrim)
        // The result is 1 when memory was released, 0 when there was none to release: either is a real call.
        #expect([0, 1].contains(trim(0)))
    }

    /// Minor page faults of this thread.
    private static func minorFaults() -> Int {
        var usage = rusage()
        getrusage(__rusage_who_t(1), &usage)  // RUSAGE_THREAD
        return usage.ru_minflt
    }

    @Test func blocksFreedAndTakenAgainAreNotFaultedInAgain() throws {
        MemoryTrimmer.keepHeapTops()
        // Two blocks of 96 KiB, freed: by default glibc hands the heap's top back once more than 128 KiB is
        // free there, so each round would fault their 48 pages in again.
        let size = 96 * 1024
        let before = Self.minorFaults()
        for round in 0..<100 {
            let first = try #require(malloc(size))
            let second = try #require(malloc(size))
            memset(first, Int32(round), size)
            memset(second, Int32(round), size)
            free(second)
            free(first)
        }
        let faults = Self.minorFaults() - before
        #expect(faults < 500, "\(faults) page faults for 100 rounds of 48 pages")
    }
    #endif
}
