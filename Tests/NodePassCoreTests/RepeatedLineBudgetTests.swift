import NIOCore
import Testing

@testable import NodePassCore

@Suite struct RepeatedLineBudgetTests {
    static let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func aFloodIsCutToTheBurstAndTheNextWindowCountsWhatWasLeftOut() {
        var budget = RepeatedLineBudget(burst: 3, window: .seconds(10))
        let written = (0..<1000).compactMap {
            budget.lineArrived("client refused", now: Self.start + .milliseconds($0))
        }
        #expect(written == [0, 0, 0])
        // Another kind has its own budget.
        #expect(budget.lineArrived("launch ignored", now: Self.start + .seconds(1)) == 0)
        // The next window: the first line says how many were left out, the rest of the burst says nothing.
        #expect(budget.lineArrived("client refused", now: Self.start + .seconds(10)) == 997)
        #expect(budget.lineArrived("client refused", now: Self.start + .seconds(10)) == 0)
        #expect(budget.lineArrived("client refused", now: Self.start + .seconds(11)) == 0)
        #expect(budget.lineArrived("client refused", now: Self.start + .seconds(11)) == nil)
        #expect(budget.lineArrived("client refused", now: Self.start + .seconds(21)) == 1)
    }

    @Test func kindsAreBoundedAndNeverLoseALine() {
        var budget = RepeatedLineBudget(burst: 1, window: .seconds(10), maximumKinds: 4)
        for index in 0..<4 { #expect(budget.lineArrived("kind \(index)", now: Self.start) == 0) }
        #expect(budget.lineArrived("kind 0", now: Self.start) == nil)
        // Full: a new kind is written without a budget; once the windows passed, room is made.
        #expect(budget.lineArrived("kind 9", now: Self.start) == 0)
        #expect(budget.lineArrived("kind 9", now: Self.start) == 0)
        #expect(budget.lineArrived("kind 8", now: Self.start + .seconds(10)) == 0)
        #expect(budget.lineArrived("kind 8", now: Self.start + .seconds(10)) == nil)
        // The kind with a count left out was kept, and says it.
        #expect(budget.lineArrived("kind 0", now: Self.start + .seconds(10)) == 1)
    }
}
