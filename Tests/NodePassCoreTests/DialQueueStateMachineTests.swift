import Testing

@testable import NodePassCore

@Suite struct DialQueueStateMachineTests {
    typealias Machine = DialQueueStateMachine<String>

    private func dialled(_ action: Machine.LaunchAction) -> (String, Bool)? {
        if case .dial(let connection, let wasClaimed) = action { return (connection, wasClaimed) }
        return nil
    }

    private func isKeep(_ action: Machine.ReadyAction) -> Bool {
        if case .keep = action { return true }
        return false
    }

    @Test func aLaunchTakesOnlyTheSendersIdleConnection() {
        var machine = Machine(maximumIdle: 8, maximumAwaited: 8)
        _ = machine.connectionReady(id: PoolID(1), owner: 1, connection: "a1")
        _ = machine.connectionReady(id: PoolID(2), owner: 2, connection: "b1")
        let stolen = machine.launchReceived(id: PoolID(2), owner: 1)
        #expect(self.dialled(stolen) == nil)
        let taken = machine.launchReceived(id: PoolID(2), owner: 2)
        #expect(self.dialled(taken)?.0 == "b1")
        #expect(machine.idleCount == 1 && !machine.isInUse(PoolID(2)))
    }

    @Test func aLaunchBeforeItsConnectionWaitsForIt() {
        var machine = Machine(maximumIdle: 8, maximumAwaited: 8)
        guard case .awaitConnection = machine.launchReceived(id: PoolID(3), owner: 1) else {
            Issue.record("an early launch waits")
            return
        }
        guard case .dial(let connection, .stream) = machine.connectionReady(id: PoolID(3), owner: 1, connection: "c")
        else {
            Issue.record("the awaited connection is dialled at once")
            return
        }
        #expect(connection == "c")
        #expect(machine.awaitedCount == 0 && machine.idleCount == 0)
        let expiredAfterDial = machine.launchExpired(id: PoolID(3), owner: 1)
        #expect(!expiredAfterDial)
    }

    @Test func anAwaitedLaunchExpiresOnceAndOnlyForItsOwner() {
        var machine = Machine(maximumIdle: 8, maximumAwaited: 8)
        _ = machine.launchReceived(id: PoolID(4), owner: 1)
        let expiredForOther = machine.launchExpired(id: PoolID(4), owner: 2)
        #expect(!expiredForOther)
        let expired = machine.launchExpired(id: PoolID(4), owner: 1)
        #expect(expired)
        let expiredTwice = machine.launchExpired(id: PoolID(4), owner: 1)
        #expect(!expiredTwice)
        // Another owner's connection with that ID does not answer the launch.
        _ = machine.launchReceived(id: PoolID(5), owner: 1)
        let readyForOther = machine.connectionReady(id: PoolID(5), owner: 2, connection: "x")
        #expect(self.isKeep(readyForOther))
    }

    @Test func earlyLaunchesAreBounded() {
        var machine = Machine(maximumIdle: 8, maximumAwaited: 2)
        _ = machine.launchReceived(id: PoolID(1), owner: 1)
        _ = machine.launchReceived(id: PoolID(2), owner: 1)
        guard case .unknown = machine.launchReceived(id: PoolID(3), owner: 1) else {
            Issue.record("a third early launch is refused")
            return
        }
        guard case .unknown = machine.launchReceived(id: PoolID(1), owner: 1) else {
            Issue.record("a repeated early launch is refused")
            return
        }
    }

    @Test func aDuplicateIDOrAFullPoolClosesTheNewConnection() {
        var machine = Machine(maximumIdle: 2, maximumAwaited: 2)
        let first = machine.connectionReady(id: PoolID(1), owner: 1, connection: "a")
        #expect(self.isKeep(first))
        guard case .close("b") = machine.connectionReady(id: PoolID(1), owner: 1, connection: "b") else {
            Issue.record("a duplicate ID is closed")
            return
        }
        // The refused duplicate's close does not forget the idle connection with its ID.
        let duplicateClosed = machine.connectionClosed(id: PoolID(1), where: { $0 == "b" })
        #expect(duplicateClosed == nil)
        #expect(machine.isInUse(PoolID(1)))
        _ = machine.connectionReady(id: PoolID(2), owner: 1, connection: "c")
        #expect(machine.isFull)
        guard case .close("d") = machine.connectionReady(id: PoolID(3), owner: 1, connection: "d") else {
            Issue.record("a full pool closes a new connection")
            return
        }
    }

    @Test func aClaimedConnectionIsCountedOnceAndStillLaunchable() {
        var machine = Machine(maximumIdle: 8, maximumAwaited: 8)
        _ = machine.connectionReady(id: PoolID(6), owner: 1, connection: "a")
        _ = machine.connectionReady(id: PoolID(7), owner: 1, connection: "b")
        #expect(self.isCounted(machine.connectionClaimed(id: PoolID(6))))
        #expect(machine.claimedCount == 1)
        #expect(self.isNone(machine.connectionClaimed(id: PoolID(6))))
        #expect(self.isNone(machine.connectionClaimed(id: PoolID(9))))
        let launched = self.dialled(machine.launchReceived(id: PoolID(6), owner: 1))
        #expect(launched?.0 == "a" && launched?.1 == true)
        #expect(machine.claimedCount == 0)
        #expect(self.isCounted(machine.connectionClaimed(id: PoolID(7))))
        let closedClaimed = machine.connectionClosed(id: PoolID(7), where: { $0 == "b" })
        #expect(closedClaimed == true)
        #expect(machine.idleCount == 0 && machine.claimedCount == 0)
    }

    @Test func claimedConnectionsBeyondTheBoundAreClosedAndFreedOnTheirEnd() {
        var machine = Machine(maximumIdle: 8, maximumAwaited: 8, maximumClaimed: 2)
        for (id, name) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            _ = machine.connectionReady(id: PoolID(UInt32(id)), owner: 1, connection: name)
        }
        #expect(self.isCounted(machine.connectionClaimed(id: PoolID(1))))
        #expect(self.isCounted(machine.connectionClaimed(id: PoolID(2))))
        guard case .close("c") = machine.connectionClaimed(id: PoolID(3)) else {
            Issue.record("a third claim over a bound of two closes its connection")
            return
        }
        #expect(machine.idleCount == 3 && machine.claimedCount == 2)
        // A claimed connection that ends (its launch, its close, its owner) makes room again.
        _ = machine.launchReceived(id: PoolID(1), owner: 1)
        #expect(self.isCounted(machine.connectionClaimed(id: PoolID(4))))
        #expect(machine.ownerLost(1).sorted() == ["b", "d"])
        #expect(machine.claimedCount == 0)
    }

    private func isCounted(_ action: Machine.ClaimAction) -> Bool {
        if case .counted = action { return true }
        return false
    }

    private func isNone(_ action: Machine.ClaimAction) -> Bool {
        if case .none = action { return true }
        return false
    }

    @Test func anOwnerLeavingTakesItsConnectionsAndLaunches() {
        var machine = Machine(maximumIdle: 8, maximumAwaited: 8)
        _ = machine.connectionReady(id: PoolID(1), owner: 1, connection: "a1")
        _ = machine.connectionReady(id: PoolID(2), owner: 2, connection: "b1")
        _ = machine.connectionReady(id: PoolID(3), owner: 1, connection: "a2")
        _ = machine.launchReceived(id: PoolID(4), owner: 1)
        #expect(machine.idleCount(owner: 1) == 2)
        let lost = machine.ownerLost(1).sorted()
        #expect(lost == ["a1", "a2"])
        #expect(machine.idleCount == 1 && machine.awaitedCount == 0)
        let drained = machine.drain()
        #expect(drained == ["b1"])
        #expect(machine.idleCount == 0)
    }
}
