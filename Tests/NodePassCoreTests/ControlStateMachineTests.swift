import NIOCore
import Testing

@testable import NodePassCore

@Suite struct ControlStateMachineTests {
    let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func firstRemoteStartsThePoolAndLaterOnesAreHeartbeats() {
        var machine = ControlStateMachine(reportInterval: .seconds(5))
        machine.connected(now: self.start)
        let result1 = machine.signalReceived(.remote(port: 4000), now: self.start)
        #expect(result1 == .startPool(port: 4000))
        let result2 = machine.signalReceived(.remote(port: 4000), now: self.start + .seconds(5))
        #expect(result2 == .none)
        let result3 = machine.signalReceived(.remote(port: 4001), now: self.start + .seconds(10))
        #expect(result3 == .restartPool(port: 4001))
    }

    @Test func aServerThatNamesAnotherPortOnEveryLineRestartsThePoolOncePerSecond() {
        var machine = ControlStateMachine(reportInterval: .seconds(1))
        machine.connected(now: self.start)
        #expect(machine.signalReceived(.remote(port: 4000), now: self.start) == .startPool(port: 4000))
        // 2,000 lines alternating two ports, one every millisecond: 2 s.
        var restarts: [Int64] = []
        for line in 1...2000 {
            let now = self.start + .milliseconds(Int64(line))
            if case .restartPool = machine.signalReceived(.remote(port: 4000 + line % 2), now: now) {
                restarts.append(Int64(line))
            }
        }
        // The first line 1 s after the start names the other port.
        #expect(restarts == [1001])
        // A port named too soon is still a heartbeat.
        #expect(machine.heartbeatCheckFired(now: self.start + .milliseconds(2000) + .seconds(2)) == .none)
    }

    @Test func aNewPortNamedTooSoonIsTakenAtItsNextAnnouncement() {
        var machine = ControlStateMachine(reportInterval: .seconds(1))
        machine.connected(now: self.start)
        _ = machine.signalReceived(.remote(port: 4000), now: self.start)
        #expect(machine.signalReceived(.remote(port: 4001), now: self.start + .milliseconds(500)) == .none)
        #expect(machine.state == .running(poolPort: 4000, lastHeartbeat: self.start + .milliseconds(500)))
        let later = self.start + .milliseconds(1500)
        #expect(machine.signalReceived(.remote(port: 4001), now: later) == .restartPool(port: 4001))
    }

    @Test func launchOnlyWhenRunning() {
        var machine = ControlStateMachine(reportInterval: .seconds(5))
        let id = PoolID(42)
        let result4 = machine.signalReceived(.launch(id), now: self.start)
        #expect(result4 == .ignoreLaunch(id))
        machine.connected(now: self.start)
        let result5 = machine.signalReceived(.launch(id), now: self.start)
        #expect(result5 == .ignoreLaunch(id))
        _ = machine.signalReceived(.remote(port: 1), now: self.start)
        let result6 = machine.signalReceived(.launch(id), now: self.start)
        #expect(result6 == .launch(id))
    }

    @Test func threeMissedHeartbeatsMeanDead() {
        var machine = ControlStateMachine(reportInterval: .seconds(1))
        machine.connected(now: self.start)
        _ = machine.signalReceived(.remote(port: 1), now: self.start)
        let result7 = machine.heartbeatCheckFired(now: self.start + .seconds(2))
        #expect(result7 == .none)
        let result8 = machine.heartbeatCheckFired(now: self.start + .seconds(3))
        #expect(result8 == .none)
        _ = machine.signalReceived(.remote(port: 1), now: self.start + .seconds(3))
        let result9 = machine.heartbeatCheckFired(now: self.start + .seconds(6))
        #expect(result9 == .none)
        let result10 = machine.heartbeatCheckFired(now: self.start + .milliseconds(6001))
        #expect(result10 == .closeDeadChannel)
    }

    @Test func silentServerAfterHandshakeIsDead() {
        var machine = ControlStateMachine(reportInterval: .seconds(1))
        machine.connected(now: self.start)
        let result11 = machine.heartbeatCheckFired(now: self.start + .seconds(4))
        #expect(result11 == .closeDeadChannel)
        machine.disconnected()
        let result12 = machine.heartbeatCheckFired(now: self.start + .seconds(40))
        #expect(result12 == .none)
    }
}
