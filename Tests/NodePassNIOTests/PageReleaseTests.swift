import NIOCore
import Testing

@testable import NodePassNIO

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

#if os(Linux)
@Suite struct PageReleaseTests {
    /// Which pages of `bytes` are in memory (`mincore`), one flag per page from the first whole page on.
    private static func residentPages(of bytes: UnsafeRawBufferPointer, page: Int) -> [Bool] {
        let base = Int(bitPattern: bytes.baseAddress)
        let start = (base + page - 1) / page * page
        let end = (base + bytes.count) / page * page
        guard end > start, let first = UnsafeMutableRawPointer(bitPattern: start) else { return [] }
        var flags = [UInt8](repeating: 0, count: (end - start) / page)
        let result = flags.withUnsafeMutableBufferPointer { mincore(first, end - start, $0.baseAddress) }
        #expect(result == 0)
        return flags.map { $0 & 1 == 1 }
    }

    @Test func thePagesPastTheWrittenBytesLeaveMemoryAndTheWrittenOnesStay() {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var buffer = ByteBufferAllocator().buffer(capacity: 16 * page)
        // Every byte of the storage written, as SwiftNIO's first read of a socket does.
        buffer.writeRepeatingByte(0xA5, count: buffer.capacity)
        buffer.moveWriterIndex(to: 3 * page + 100)
        let before = buffer.withVeryUnsafeBytes { Self.residentPages(of: $0, page: page) }
        #expect(before.count >= 15)
        #expect(before.allSatisfy { $0 })

        buffer.releasePagesPastWriterIndex()

        let after = buffer.withVeryUnsafeBytes { Self.residentPages(of: $0, page: page) }
        // The first whole pages hold written bytes (up to 3 pages and 100 bytes, less the unaligned start).
        let written = after.prefix(3)
        let released = after.dropFirst(4)
        #expect(written.allSatisfy { $0 })
        #expect(!released.isEmpty && released.allSatisfy { !$0 })
        // The written bytes are intact; the released ones read as zeros.
        #expect(buffer.readableBytesView.allSatisfy { $0 == 0xA5 })
        let tail = buffer.withVeryUnsafeBytes { $0[(5 * page)..<(15 * page)].allSatisfy { $0 == 0 } }
        #expect(tail)
    }
}
#endif
