import Testing

@testable import NodePassCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

@Suite struct MasterStateTests {
    private static func state() -> MasterState {
        var random = SeededGenerator(state: 7)
        var state = MasterState(master: .generate(using: &random))
        var record = InstanceRecord(id: "0a1b2c3d", url: "server://key@:10101/127.0.0.1:8080?log=warn", alias: "db")
        record.meta = InstanceMeta(peer: .init(sid: "s", type: "1", alias: "peer"), tags: ["env": "prod"])
        record.traffic.tcpReceived = 1 << 40
        state.instances = [record, InstanceRecord(id: "ffffffff", url: "client://:10101/:22", running: false)]
        return state
    }

    @Test func aNewIdentityIsHexOfTheRightLengthAndDiffersByGenerator() throws {
        var first = SeededGenerator(state: 1)
        var second = SeededGenerator(state: 2)
        let one = MasterIdentity.generate(using: &first)
        let other = MasterIdentity.generate(using: &second)
        #expect(MasterState.isHex(one.apiKey, count: 32))
        #expect(MasterState.isHex(one.masterID, count: 16))
        #expect(one.apiKey != other.apiKey && one.masterID != other.masterID)
        #expect(try MasterState(master: one).validated().instances.isEmpty)
    }

    @Test func aStateSurvivesJSONWhole() throws {
        let state = Self.state()
        let data = try JSONEncoder().encode(state)
        let decoded = try JSONDecoder().decode(MasterState.self, from: data)
        #expect(decoded == state)
        #expect(try decoded.validated() == state)
    }

    @Test func aStateThatBreaksARuleIsRefusedWithTheRule() {
        var broken: [MasterState] = []
        func with(_ change: (inout MasterState) -> Void) {
            var state = Self.state()
            change(&state)
            broken.append(state)
        }
        with { $0.version = 2 }
        with { $0.master.apiKey = "ABCDEF" + String(repeating: "0", count: 26) }
        with { $0.master.masterID = "0123" }
        with { $0.master.alias = String(repeating: "a", count: 257) }
        with { $0.instances[1].id = $0.instances[0].id }
        with { $0.instances[0].id = "0a1b2c3" }
        with { $0.instances[0].url = "server://:10101" }
        with { $0.instances[0].alias = String(repeating: "b", count: 300) }
        with { $0.instances[0].meta.peer.sid = String(repeating: "c", count: 300) }
        with { state in
            state.instances[0].meta.tags = Dictionary(uniqueKeysWithValues: (0..<65).map { ("k\($0)", "v") })
        }
        with { $0.instances[0].meta.tags["k"] = String(repeating: "d", count: 300) }
        with { state in
            state.instances = (0..<1025).map { number in
                let hex = String(number, radix: 16)
                return InstanceRecord(id: String(repeating: "0", count: 8 - hex.count) + hex, url: "client://:1/:2")
            }
        }
        for state in broken {
            #expect(throws: NodePassError(.invalidState, "")) { try state.validated() }
        }
    }
}
