import Testing

@testable import NodePassCore

@Suite struct ClientPoolStateMachineTests {
    @Test func startsAtTheMinimum() {
        var machine = ClientPoolStateMachine(minimum: 4, maximum: 64)
        let result1 = machine.started()
        #expect(result1 == .init(open: 4))
        let result2 = machine.started()
        #expect(result2 == .none)
        #expect(machine.opening == 4)
    }

    @Test func aRefusedConnectionIsNotIdleAndIsReplacedOnTheNextPeriod() {
        var machine = ClientPoolStateMachine(minimum: 2, maximum: 64)
        _ = machine.started()
        machine.connectionEstablished()
        machine.connectionEstablished()
        machine.connectionRefused()
        #expect(machine.idle == 1 && machine.opening == 0)
        let replaced = machine.periodElapsed()
        #expect(replaced == .init(open: 1))
    }

    @Test func refillsAsSoonAsAConnectionIsTaken() {
        var machine = ClientPoolStateMachine(minimum: 8, maximum: 64)
        _ = machine.started()
        for _ in 0..<8 { machine.connectionEstablished() }
        #expect(machine.idle == 8)
        let result3 = machine.connectionTaken(now: 0)
        #expect(result3 == .init(open: 1))
        #expect(machine.capacity == 8)
    }

    @Test func growsWhenRunningLowAndNeverExceedsTheMaximum() {
        var machine = ClientPoolStateMachine(minimum: 4, maximum: 10)
        _ = machine.started()
        for _ in 0..<4 { machine.connectionEstablished() }
        var opened = 0
        for take in 0..<4 { opened += machine.connectionTaken(now: UInt64(take) * machine.growthInterval).open }
        #expect(machine.capacity == 10)
        #expect(machine.idle + machine.opening <= 10)
        #expect(opened == 10)
    }

    @Test func aBurstOfTakesGrowsTheCapacityOncePerInterval() {
        var machine = ClientPoolStateMachine(minimum: 4, maximum: 1024, growthInterval: 100)
        _ = machine.started()
        for _ in 0..<4 { machine.connectionEstablished() }
        // Every take of the burst finds the pool low; only the first, then one per interval, doubles it.
        var opened = 0
        for _ in 0..<4 { opened += machine.connectionTaken(now: 1_000).open }
        #expect(machine.capacity == 8)
        #expect(opened == 8)
        for _ in 0..<machine.opening { machine.connectionEstablished() }
        for _ in 0..<7 { _ = machine.connectionTaken(now: 1_099) }
        #expect(machine.capacity == 8)
        _ = machine.connectionTaken(now: 1_100)
        #expect(machine.capacity == 16)
        #expect(machine.idle + machine.opening == 16)
    }

    @Test func shrinksWhenUnusedDownToTheMinimumWithoutClosingIdleConnections() {
        var machine = ClientPoolStateMachine(minimum: 4, maximum: 64)
        _ = machine.started()
        for _ in 0..<4 { machine.connectionEstablished() }
        for _ in 0..<3 { _ = machine.connectionTaken(now: 0) }
        for _ in 0..<machine.opening { machine.connectionEstablished() }
        #expect(machine.capacity == 8)
        #expect(machine.idle == 8)
        for _ in 0..<20 { #expect(machine.periodElapsed() == .none) }
        #expect(machine.capacity == 4)
        #expect(machine.idle == 8)
        // The surplus is used up without being replaced, then the pool refills to the new capacity.
        for _ in 0..<4 { #expect(machine.connectionTaken(now: 0) == .none) }
        #expect(machine.idle == 4)
        let refill = machine.connectionTaken(now: 0)
        #expect(refill == .init(open: 1))
    }

    @Test func failedDialsAreRetriedOnTheNextPeriod() {
        var machine = ClientPoolStateMachine(minimum: 3, maximum: 3)
        _ = machine.started()
        machine.connectionFailed()
        machine.connectionFailed()
        machine.connectionEstablished()
        let result4 = machine.periodElapsed()
        #expect(result4 == .init(open: 2))
    }

    @Test func aPoolPortThatFailsEveryDialIsProbedOnceAtLongerIntervals() {
        var machine = ClientPoolStateMachine(minimum: 8, maximum: 8)
        #expect(machine.started() == .init(open: 8))
        for _ in 0..<8 { machine.connectionFailed() }
        // Period by period: a probe (one dial) after 0, 1, 3, 7, 15, 31, 31 quiet periods.
        var probes: [Int] = []
        for period in 1...120 {
            let adjustment = machine.periodElapsed()
            #expect(adjustment.open <= 1)
            if adjustment.open == 1 {
                probes.append(period)
                machine.connectionFailed()
            }
        }
        #expect(probes == [1, 3, 7, 15, 31, 63, 95])
        // The first dials' period and each failed probe's.
        #expect(machine.failingPeriods == 8)
    }

    @Test func aConnectionThatGetsItsIDEndsTheStreakAndTheNextPeriodRefillsAll() {
        var machine = ClientPoolStateMachine(minimum: 4, maximum: 4)
        _ = machine.started()
        for _ in 0..<4 { machine.connectionFailed() }
        #expect(machine.periodElapsed() == .init(open: 1))
        machine.connectionFailed()
        #expect(machine.periodElapsed() == .none)
        #expect(machine.periodElapsed() == .init(open: 1))
        machine.connectionEstablished()
        #expect(machine.failingPeriods == 0)
        #expect(machine.periodElapsed() == .init(open: 3))
    }

    @Test func failuresBesideASuccessInOnePeriodStartNoStreak() {
        var machine = ClientPoolStateMachine(minimum: 4, maximum: 4)
        _ = machine.started()
        machine.connectionFailed()
        machine.connectionEstablished()
        #expect(machine.periodElapsed() == .init(open: 1))
        #expect(machine.failingPeriods == 0)
    }

    @Test func lostIdleConnectionIsReplaced() {
        var machine = ClientPoolStateMachine(minimum: 2, maximum: 2)
        _ = machine.started()
        machine.connectionEstablished()
        machine.connectionEstablished()
        let result5 = machine.connectionLost()
        #expect(result5 == .init(open: 1))
    }

    @Test func resetReturnsToTheMinimum() {
        var machine = ClientPoolStateMachine(minimum: 2, maximum: 8)
        _ = machine.started()
        machine.reset()
        #expect(machine.idle == 0 && machine.opening == 0 && machine.capacity == 2)
        let result6 = machine.started()
        #expect(result6 == .init(open: 2))
    }

    @Test func swappedBoundsAreRepaired() {
        let machine = ClientPoolStateMachine(minimum: 10, maximum: 2)
        #expect(machine.minimum <= machine.maximum)
    }
}
