import Testing

@testable import NodePassCore

@Suite struct LaunchQueueStateMachineTests {
    typealias Machine = LaunchQueueStateMachine<String, String>

    private func relayed(_ action: Machine.Action) -> (PoolID, String, String)? {
        if case .relay(let id, let connection, let user) = action { return (id, connection, user) }
        return nil
    }

    @Test func anIDIsInUseExactlyWhileItsConnectionIsIdle() {
        var machine = Machine(maximumIdle: 8)
        for (number, owner) in [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "a")] {
            _ = machine.poolConnectionReady(id: PoolID(UInt32(number)), connection: owner)
        }
        #expect((1...5).allSatisfy { machine.isInUse(PoolID(UInt32($0))) })
        _ = machine.userArrived(ticket: 1, user: "u")  // takes 1
        #expect(!machine.isInUse(PoolID(1)))
        let closed = machine.poolConnectionClosed(id: PoolID(2))
        #expect(closed && !machine.isInUse(PoolID(2)))
        let closedAgain = machine.poolConnectionClosed(id: PoolID(2))
        #expect(!closedAgain)
        let left = machine.poolConnectionClosed(id: PoolID(3))
        #expect(left && !machine.isInUse(PoolID(3)))
        let lost = machine.controlLost(where: { $0 == "b" })  // 4
        #expect(lost == ["b"])
        #expect(!machine.isInUse(PoolID(4)) && machine.isInUse(PoolID(5)))
        _ = machine.drain()
        #expect(!machine.isInUse(PoolID(5)))
        // An ID can be used again once its connection left the pool.
        let again = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        #expect(self.isKeep(again) && machine.isInUse(PoolID(1)))
    }

    @Test func aDuplicateIDStaysFindableUntilItsLastConnectionLeaves() {
        var machine = Machine(maximumIdle: 8)
        _ = machine.poolConnectionReady(id: PoolID(7), connection: "a")
        _ = machine.poolConnectionReady(id: PoolID(7), connection: "b")
        let first = machine.poolConnectionClosed(id: PoolID(7))
        #expect(first && machine.isInUse(PoolID(7)))
        let second = machine.poolConnectionClosed(id: PoolID(7))
        #expect(second && !machine.isInUse(PoolID(7)) && machine.idleCount == 0)
    }

    @Test func userTakesTheOldestIdleConnection() {
        var machine = Machine(maximumIdle: 4)
        let action1 = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        #expect(self.isKeep(action1))
        let action2 = machine.poolConnectionReady(id: PoolID(2), connection: "b")
        #expect(self.isKeep(action2))
        let action3 = machine.userArrived(ticket: 1, user: "u1")
        let first = self.relayed(action3)
        #expect(first?.0 == PoolID(1))
        #expect(first?.1 == "a")
        #expect(first?.2 == "u1")
        #expect(machine.idleCount == 1)
    }

    @Test func userWaitsThenGetsTheNextConnection() {
        var machine = Machine(maximumIdle: 4)
        let action4 = machine.userArrived(ticket: 1, user: "u1")
        #expect(self.isWait(action4))
        let action5 = machine.userArrived(ticket: 2, user: "u2")
        #expect(self.isWait(action5))
        #expect(machine.waitingCount == 2)
        let action6 = machine.poolConnectionReady(id: PoolID(7), connection: "a")
        let relay = self.relayed(action6)
        #expect(relay?.2 == "u1")
        #expect(machine.idleCount == 0)
        #expect(machine.waitingCount == 1)
    }

    @Test func timedOutUserIsRemovedOnce() {
        var machine = Machine(maximumIdle: 4)
        _ = machine.userArrived(ticket: 1, user: "u1")
        let result1 = machine.userLeft(ticket: 1)
        #expect(result1 == "u1")
        let result2 = machine.userLeft(ticket: 1)
        #expect(result2 == nil)
        let action7 = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        #expect(self.isKeep(action7))
    }

    @Test func retriedUserGoesFirst() {
        var machine = Machine(maximumIdle: 4)
        _ = machine.userArrived(ticket: 1, user: "u1")
        _ = machine.userArrived(ticket: 2, user: "u2", retry: true)
        let action8 = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        #expect(self.relayed(action8)?.2 == "u2")
    }

    @Test func neverKeepsMoreThanTheMaximum() {
        var machine = Machine(maximumIdle: 2)
        _ = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        _ = machine.poolConnectionReady(id: PoolID(2), connection: "b")
        guard case .close(let closed) = machine.poolConnectionReady(id: PoolID(3), connection: "c") else {
            Issue.record("third connection was kept")
            return
        }
        #expect(closed == "c")
        #expect(machine.idleCount == 2)
    }

    @Test func fullOnlyWhenNobodyWaits() {
        var machine = Machine(maximumIdle: 1)
        #expect(!machine.isFull)
        _ = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        #expect(machine.isFull)
        _ = machine.userArrived(ticket: 1, user: "u1")
        _ = machine.userArrived(ticket: 2, user: "u2")
        #expect(!machine.isFull)
    }

    @Test func deadConnectionIsSkipped() {
        var machine = Machine(maximumIdle: 4)
        _ = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        _ = machine.poolConnectionReady(id: PoolID(2), connection: "b")
        let result3 = machine.poolConnectionClosed(id: PoolID(1))
        #expect(result3)
        let result4 = machine.poolConnectionClosed(id: PoolID(1))
        #expect(!result4)
        let action9 = machine.userArrived(ticket: 1, user: "u")
        #expect(self.relayed(action9)?.1 == "b")
    }

    @Test func controlLossDropsIdleButKeepsWaitingUsers() {
        var machine = Machine(maximumIdle: 4)
        _ = machine.poolConnectionReady(id: PoolID(1), connection: "a")
        let result5 = machine.controlLost()
        #expect(result5 == ["a"])
        _ = machine.userArrived(ticket: 1, user: "u")
        let result6 = machine.controlLost()
        #expect(result6.isEmpty)
        #expect(machine.waitingCount == 1)
        let result7 = machine.isInUse(PoolID(1))
        #expect(result7 == false)
        let drained = machine.drain()
        #expect(drained.users == ["u"])
    }

    @Test func oneClientLeavingTakesOnlyItsOwnIdleConnections() {
        var machine = Machine(maximumIdle: 8)
        _ = machine.poolConnectionReady(id: PoolID(1), connection: "a1")
        _ = machine.poolConnectionReady(id: PoolID(2), connection: "b1")
        _ = machine.poolConnectionReady(id: PoolID(3), connection: "a2")
        let lost = machine.controlLost { $0.hasPrefix("a") }
        #expect(lost == ["a1", "a2"])
        let next = machine.userArrived(ticket: 1, user: "u")
        #expect(self.relayed(next)?.1 == "b1")
    }

    private func isKeep(_ action: Machine.Action) -> Bool {
        if case .keep = action { return true }
        return false
    }

    private func isWait(_ action: Machine.Action) -> Bool {
        if case .wait = action { return true }
        return false
    }
}
