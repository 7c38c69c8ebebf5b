import NIOCore
import Testing

@testable import NodePassCore

@Suite struct DatagramRoutesStateMachineTests {
    typealias Machine = DatagramRoutesStateMachine<String>
    static let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func aFlowNeedsACarrierThenKeepsItsNumberAndCarrier() {
        var machine = Machine(maximumFlows: 8, idleTimeout: .seconds(60))
        #expect(machine.datagramFromUser("a:1", now: Self.start) == .needsCarrier)
        machine.carrierOpened(10)
        #expect(machine.datagramFromUser("a:1", now: Self.start) == .send(carrier: 10, flow: 1, isNew: true))
        #expect(machine.datagramFromUser("a:1", now: Self.start) == .send(carrier: 10, flow: 1, isNew: false))
        #expect(machine.datagramFromUser("a:2", now: Self.start) == .send(carrier: 10, flow: 2, isNew: true))
        #expect(machine.flowCount == 2)
        #expect(machine.datagramFromService(carrier: 10, flow: 2, now: Self.start) == "a:2")
        #expect(machine.datagramFromService(carrier: 10, flow: 3, now: Self.start) == nil)
        #expect(machine.datagramFromService(carrier: 11, flow: 1, now: Self.start) == nil)
    }

    @Test func newFlowsGoToTheCarrierWithTheFewestFlowsAndStayThere() {
        var machine = Machine(maximumFlows: 8, idleTimeout: .seconds(60))
        machine.carrierOpened(1)
        _ = machine.datagramFromUser("a", now: Self.start)
        _ = machine.datagramFromUser("b", now: Self.start)
        machine.carrierOpened(2)
        #expect(machine.datagramFromUser("c", now: Self.start) == .send(carrier: 2, flow: 1, isNew: true))
        #expect(machine.datagramFromUser("d", now: Self.start) == .send(carrier: 2, flow: 2, isNew: true))
        #expect(machine.datagramFromUser("a", now: Self.start) == .send(carrier: 1, flow: 1, isNew: false))
        // A carrier that closes takes its flows; their users start new flows elsewhere.
        #expect(machine.carrierClosed(1) == 2)
        #expect(machine.datagramFromUser("a", now: Self.start) == .send(carrier: 2, flow: 3, isNew: true))
        #expect(machine.flowCount == 3)
    }

    @Test func theFlowBoundDropsOnlyNewFlows() {
        var machine = Machine(maximumFlows: 2, idleTimeout: .seconds(60))
        machine.carrierOpened(1)
        _ = machine.datagramFromUser("a", now: Self.start)
        _ = machine.datagramFromUser("b", now: Self.start)
        #expect(machine.datagramFromUser("c", now: Self.start) == .drop(.flowLimit))
        #expect(machine.datagramFromUser("a", now: Self.start) == .send(carrier: 1, flow: 1, isNew: false))
        let ended = machine.flowEnded(carrier: 1, flow: 2)
        let endedAgain = machine.flowEnded(carrier: 1, flow: 2)
        #expect(ended && !endedAgain)
        #expect(machine.datagramFromUser("c", now: Self.start) == .send(carrier: 1, flow: 3, isNew: true))
    }

    @Test func idleFlowsExpireAndTrafficEitherWayKeepsAFlow() {
        var machine = Machine(maximumFlows: 8, idleTimeout: .seconds(60))
        machine.carrierOpened(1)
        _ = machine.datagramFromUser("quiet", now: Self.start)
        _ = machine.datagramFromUser("talks", now: Self.start)
        _ = machine.datagramFromUser("answered", now: Self.start)
        _ = machine.datagramFromUser("talks", now: Self.start + .seconds(30))
        _ = machine.datagramFromService(carrier: 1, flow: 3, now: Self.start + .seconds(40))
        #expect(machine.expire(now: Self.start + .milliseconds(59_999)).isEmpty)
        let expired = machine.expire(now: Self.start + .seconds(60))
        #expect(expired.map(\.flow) == [1])
        #expect(machine.flowCount == 2)
        #expect(machine.datagramFromService(carrier: 1, flow: 1, now: Self.start + .seconds(61)) == nil)
        #expect(Set(machine.expire(now: Self.start + .seconds(100)).map(\.flow)) == [2, 3])
        #expect(machine.flowCount == 0)
    }
}

@Suite struct DialedFlowsStateMachineTests {
    typealias Machine = DialedFlowsStateMachine<String>
    static let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    private func payload(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

    @Test func theFirstDatagramOpensASocketAndWhatComesMeanwhileIsHeldInOrder() {
        var machine = Machine(maximumFlows: 8, idleTimeout: .seconds(60))
        guard case .open = machine.datagramArrived(flow: 5, payload: self.payload("1"), now: Self.start) else {
            Issue.record("a new flow opens a socket")
            return
        }
        guard case .held = machine.datagramArrived(flow: 5, payload: self.payload("2"), now: Self.start) else {
            Issue.record("a datagram waits for the opening socket")
            return
        }
        #expect(machine.socketOpened(flow: 5, socket: "s5") == [self.payload("1"), self.payload("2")])
        guard case .send(let socket) = machine.datagramArrived(flow: 5, payload: self.payload("3"), now: Self.start)
        else {
            Issue.record("an open flow sends at once")
            return
        }
        #expect(socket == "s5")
        #expect(machine.flowCount == 1)
    }

    @Test func heldDatagramsAreBoundedAndAFailedSocketDropsThem() {
        var machine = Machine(maximumFlows: 8, idleTimeout: .seconds(60))
        _ = machine.datagramArrived(flow: 1, payload: self.payload("x"), now: Self.start)
        for _ in 1..<Machine.maximumHeld {
            _ = machine.datagramArrived(flow: 1, payload: self.payload("x"), now: Self.start)
        }
        guard case .drop(.opening) = machine.datagramArrived(flow: 1, payload: self.payload("x"), now: Self.start)
        else {
            Issue.record("past the bound, datagrams are dropped")
            return
        }
        #expect(machine.socketFailed(flow: 1) == Machine.maximumHeld)
        #expect(machine.flowCount == 0)
        #expect(machine.socketOpened(flow: 1, socket: "late") == nil, "a socket for a forgotten flow is closed")
    }

    @Test func theBoundEndsAndExpiryAndClosing() {
        var machine = Machine(maximumFlows: 2, idleTimeout: .seconds(10))
        _ = machine.datagramArrived(flow: 1, payload: self.payload("a"), now: Self.start)
        _ = machine.datagramArrived(flow: 2, payload: self.payload("b"), now: Self.start)
        guard case .drop(.flowLimit) = machine.datagramArrived(flow: 3, payload: self.payload("c"), now: Self.start)
        else {
            Issue.record("a third flow is past the bound")
            return
        }
        _ = machine.socketOpened(flow: 1, socket: "s1")
        _ = machine.socketOpened(flow: 2, socket: "s2")
        let known = machine.replyArrived(flow: 2, now: Self.start + .seconds(5))
        let unknown = machine.replyArrived(flow: 9, now: Self.start)
        #expect(known && !unknown)
        let expired = machine.expire(now: Self.start + .seconds(10))
        #expect(expired.map(\.flow) == [1] && expired.first?.socket == "s1")
        #expect(machine.flowEnded(flow: 1).live == false)
        _ = machine.datagramArrived(flow: 3, payload: self.payload("c"), now: Self.start + .seconds(11))
        _ = machine.socketOpened(flow: 3, socket: "s3")
        let closed = machine.closeAll()
        #expect(closed.flows == 2)
        #expect(Set(closed.sockets) == ["s2", "s3"])
        #expect(machine.flowCount == 0)
    }

    @Test func aFlowWhoseSocketIsStillOpeningCountsAsLive() {
        var machine = Machine(maximumFlows: 8, idleTimeout: .seconds(10))
        _ = machine.datagramArrived(flow: 4, payload: self.payload("d"), now: Self.start)
        let opening = machine.flowEnded(flow: 4)
        #expect(opening.live && opening.socket == nil)
        _ = machine.datagramArrived(flow: 5, payload: self.payload("e"), now: Self.start)
        _ = machine.datagramArrived(flow: 6, payload: self.payload("f"), now: Self.start)
        _ = machine.socketOpened(flow: 6, socket: "s6")
        let closed = machine.closeAll()
        #expect(closed.flows == 2 && closed.sockets == ["s6"])
    }
}
