import Testing

@testable import NodePassCore

@Suite struct ServerSessionsStateMachineTests {
    typealias Machine = ServerSessionsStateMachine<String>

    private let secret = V2SessionSecret(bytes: Array(repeating: 7, count: 32))

    private func pool(
        isFull: Bool = false,
        perClientLimit: Int? = nil,
        idle: [UInt64: Int] = [:],
        inUse: Set<PoolID> = []
    ) -> Machine.PoolOccupancy {
        Machine.PoolOccupancy(
            isFull: isFull,
            perClientLimit: perClientLimit,
            idleCount: { idle[$0] ?? 0 },
            isInUse: { inUse.contains($0) }
        )
    }

    private func refusal(_ admission: Machine.Admission) -> Machine.Refusal? {
        if case .refuse(let refusal) = admission { return refusal }
        return nil
    }

    private func admitted(_ admission: Machine.Admission) -> (id: PoolID, owner: UInt64)? {
        if case .admit(let id, let owner, _) = admission { return (id, owner) }
        return nil
    }

    @Test func withoutAClientEveryPoolConnectionIsRefused() {
        let machine = Machine(maximumClients: 4)
        let admission = machine.admitPoolConnection(.v1(peerIP: "192.0.2.1"), pool: self.pool()) { PoolID(1) }
        #expect(self.refusal(admission) == .noClient)
    }

    @Test func v1AdmitsOnlyTheClientsAddressAndANewerClientReplacesTheOld() {
        var machine = Machine(maximumClients: 4)
        guard let first = machine.v1ClientConnected("control-a", peerIP: "192.0.2.1") else {
            Issue.record("the first v1 client was refused")
            return
        }
        #expect(first.replaced.isEmpty && !first.isReconnect)
        let stranger = machine.admitPoolConnection(.v1(peerIP: "192.0.2.9"), pool: self.pool()) { PoolID(1) }
        #expect(self.refusal(stranger) == .notFromClientAddress)
        let unknownAddress = machine.admitPoolConnection(.v1(peerIP: nil), pool: self.pool()) { PoolID(1) }
        #expect(self.refusal(unknownAddress) == .notFromClientAddress)
        let client = machine.admitPoolConnection(.v1(peerIP: "192.0.2.1"), pool: self.pool()) { PoolID(2) }
        #expect(self.admitted(client)?.id == PoolID(2))
        #expect(self.admitted(client)?.owner == first.owner)

        let second = machine.v1ClientConnected("control-b", peerIP: "192.0.2.2")
        #expect(second?.replaced.map(\.owner) == [first.owner] && second?.replaced.map(\.control) == ["control-a"])
        #expect(second?.isReconnect == true && machine.count == 1)
        let old = machine.admitPoolConnection(.v1(peerIP: "192.0.2.1"), pool: self.pool()) { PoolID(3) }
        #expect(self.refusal(old) == .notFromClientAddress)
    }

    @Test func v2AdmitsTheProvedSessionWithItsSecret() {
        var machine = Machine(maximumClients: 4)
        let started = machine.v2ClientAuthenticated("a", peerIP: "192.0.2.1", sessionID: [1], secret: self.secret)
        let owner = started?.owner
        #expect(owner != nil)
        let admission = machine.admitPoolConnection(.v2(sessionID: [1]), pool: self.pool()) { PoolID(4) }
        guard case .admit(let id, let admittedOwner, let secret) = admission else {
            Issue.record("the proved session is admitted")
            return
        }
        #expect(id == PoolID(4) && admittedOwner == owner && secret?.bytes == self.secret.bytes)
        let ended = machine.admitPoolConnection(.v2(sessionID: [2]), pool: self.pool()) { PoolID(5) }
        #expect(self.refusal(ended) == .sessionEnded)
        // A v2 session has no v1 pool connections.
        let v1 = machine.admitPoolConnection(.v1(peerIP: "192.0.2.1"), pool: self.pool()) { PoolID(6) }
        #expect(self.refusal(v1) == .notFromClientAddress)
    }

    @Test func v2ClientsAreBoundedAndTheirSessionIDsUnique() {
        var machine = Machine(maximumClients: 2)
        #expect(machine.v2ClientAuthenticated("a", peerIP: nil, sessionID: [1], secret: self.secret) != nil)
        #expect(machine.v2ClientAuthenticated("b", peerIP: nil, sessionID: [1], secret: self.secret) == nil)
        let second = machine.v2ClientAuthenticated("b", peerIP: nil, sessionID: [2], secret: self.secret)
        #expect(second?.isReconnect == true)
        #expect(machine.v2ClientAuthenticated("c", peerIP: nil, sessionID: [3], secret: self.secret) == nil)
        #expect(machine.secret(forSession: [2])?.bytes == self.secret.bytes)

        let owner = machine.owner { $0 == "b" }
        #expect(owner == second?.owner)
        let closed = machine.controlClosed(owner ?? 0)
        #expect(closed?.control == "b" && machine.secret(forSession: [2]) == nil)
        #expect(machine.v2ClientAuthenticated("c", peerIP: nil, sessionID: [3], secret: self.secret) != nil)
        #expect(machine.closeAll().sorted() == ["a", "c"] && machine.count == 0)
    }

    /// A handshake that finishes while the server shuts down leaves no session behind: after `closeAll()`
    /// neither version starts one (the caller closes that control channel).
    @Test func noSessionStartsAfterShutdown() {
        var machine = Machine(maximumClients: 4)
        #expect(machine.v2ClientAuthenticated("a", peerIP: nil, sessionID: [1], secret: self.secret) != nil)
        #expect(machine.closeAll() == ["a"])
        #expect(machine.v2ClientAuthenticated("b", peerIP: nil, sessionID: [2], secret: self.secret) == nil)
        #expect(machine.v1ClientConnected("c", peerIP: "192.0.2.1") == nil)
        #expect(machine.count == 0 && machine.secret(forSession: [2]) == nil)
    }

    @Test func aFullPoolOrAFullClientShareIsRefused() {
        var machine = Machine(maximumClients: 4)
        let owner = machine.v2ClientAuthenticated("a", peerIP: nil, sessionID: [1], secret: self.secret)?.owner ?? 0
        let full = machine.admitPoolConnection(.v2(sessionID: [1]), pool: self.pool(isFull: true)) { PoolID(1) }
        #expect(self.refusal(full) == .poolFull)
        let share = self.pool(perClientLimit: 2, idle: [owner: 2])
        let clientFull = machine.admitPoolConnection(.v2(sessionID: [1]), pool: share) { PoolID(1) }
        #expect(self.refusal(clientFull) == .clientPoolFull)
        let room = self.pool(perClientLimit: 3, idle: [owner: 2])
        #expect(self.admitted(machine.admitPoolConnection(.v2(sessionID: [1]), pool: room) { PoolID(1) }) != nil)
    }

    @Test func anIDInUseIsDrawnAgainWithinABound() {
        var machine = Machine(maximumClients: 4)
        _ = machine.v1ClientConnected("a", peerIP: "192.0.2.1")
        var draws: [PoolID] = [PoolID(1), PoolID(1), PoolID(2)]
        let admission = machine.admitPoolConnection(.v1(peerIP: "192.0.2.1"), pool: self.pool(inUse: [PoolID(1)])) {
            draws.removeFirst()
        }
        #expect(self.admitted(admission)?.id == PoolID(2))
        var drawn = 0
        let exhausted = machine.admitPoolConnection(.v1(peerIP: "192.0.2.1"), pool: self.pool(inUse: [PoolID(1)])) {
            drawn += 1
            return PoolID(1)
        }
        #expect(self.refusal(exhausted) == .noFreeID && drawn == Machine.idDraws)
    }
}
