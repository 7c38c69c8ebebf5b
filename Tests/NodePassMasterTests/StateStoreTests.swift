import CoreMetrics
import NIOCore
import NodePassCore
import NodePassNIO
import Testing

@testable import NodePassMaster

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

@Suite struct StateStoreTests {
    private static func temporaryDirectory() -> String {
        var template = Array("/tmp/nodepass-state-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in
            buffer.baseAddress.flatMap { mkdtemp($0) }.map { String(cString: $0) }
        }
        #expect(made != nil)
        return (made ?? "/tmp/nodepass-state-unmade") + "/nested/state"
    }

    private static func state() -> MasterState {
        var state = MasterState(
            master: MasterIdentity(
                apiKey: String(repeating: "a", count: 32),
                masterID: String(repeating: "b", count: 16)
            )
        )
        state.instances = [InstanceRecord(id: "0a1b2c3d", url: "client://127.0.0.1:10101/127.0.0.1:22", alias: "ssh")]
        return state
    }

    private static func overwrite(_ path: String, with text: String) {
        let descriptor = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        close(descriptor)
    }

    /// The size of the file at `path`, -1 when it cannot be opened.
    private static func size(_ path: String) -> Int {
        let descriptor = open(path, O_RDONLY)
        guard descriptor >= 0 else { return -1 }
        defer { close(descriptor) }
        return Int(lseek(descriptor, 0, SEEK_END))
    }

    @Test func aSavedStateLoadsBackWholeAndPrivate() throws {
        let store = StateStore(directory: Self.temporaryDirectory())
        try store.prepare()
        #expect(try store.load() == nil)
        try store.save(Self.state())
        #expect(try store.load() == Self.state())
        // A second save replaces the first; no temporary file is left behind.
        var changed = Self.state()
        changed.master.alias = "edge"
        try store.save(changed)
        #expect(try store.load()?.master.alias == "edge")
        #expect(access(store.file + ".tmp", F_OK) != 0)
    }

    @Test func aDamagedOrForeignFileIsRefusedAndLeftAlone() throws {
        let store = StateStore(directory: Self.temporaryDirectory())
        try store.prepare()
        for text in ["{\"version\": 1, \"master\": ", "[]", "{\"version\": 9, \"master\": {}, \"instances\": []}"] {
            Self.overwrite(store.file, with: text)
            #expect(throws: NodePassError.self) { try store.load() }
            #expect(Self.size(store.file) == text.utf8.count)
        }
        // A well-formed file with a URL nobody can run is refused with the reason.
        var state = Self.state()
        state.instances[0].url = "client://nowhere"
        let text =
            "{\"version\":1,\"master\":{\"apiKey\":\"\(state.master.apiKey)\",\"masterID\":\"\(state.master.masterID)\","
            + "\"alias\":\"\"},\"instances\":[{\"id\":\"0a1b2c3d\",\"alias\":\"\",\"url\":\"client://nowhere\","
            + "\"restart\":true,\"running\":true,\"meta\":{\"peer\":{\"sid\":\"\",\"type\":\"\",\"alias\":\"\"},"
            + "\"tags\":{}},\"traffic\":{\"tcpReceived\":0,\"tcpSent\":0,\"udpReceived\":0,\"udpSent\":0}}]}"
        Self.overwrite(store.file, with: text)
        let error = #expect(throws: NodePassError.self) { try store.load() }
        #expect(error?.message.contains("0a1b2c3d") == true)
    }

    @Test func theDirectoryComesFromSystemdThenXDGThenHome() throws {
        #expect(
            try StateStore.directory(environment: ["STATE_DIRECTORY": "/var/lib/np:/other", "HOME": "/h"])
                == "/var/lib/np"
        )
        #expect(try StateStore.directory(environment: ["XDG_STATE_HOME": "/x", "HOME": "/h"]) == "/x/nodepass")
        #expect(
            try StateStore.directory(environment: ["XDG_STATE_HOME": "relative", "HOME": "/h"])
                == "/h/.local/state/nodepass"
        )
        #expect(throws: NodePassError.self) { try StateStore.directory(environment: [:]) }
    }
}

@Suite struct MasterPartsTests {
    @Test func theKeyMatchesOnlyItselfAndCanBeReplaced() {
        let key = APIKey("0123456789abcdef0123456789abcdef")
        #expect(key.matches("0123456789abcdef0123456789abcdef"))
        for wrong in [
            "", "0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef0",
            "1123456789abcdef0123456789abcdef",
        ] {
            #expect(!key.matches(wrong[...]), "\(wrong)")
        }
        // A longer candidate that starts with the key, padded with any bytes, is not the key.
        #expect(!key.matches(("0123456789abcdef0123456789abcdef" + String(repeating: "\u{0}", count: 256))[...]))
        key.replace("ffffffffffffffffffffffffffffffff")
        #expect(!key.matches("0123456789abcdef0123456789abcdef"))
        #expect(key.matches("ffffffffffffffffffffffffffffffff"))
    }

    @Test func theHubBoundsItsSubscribersAndStartsEachWithTheInitialEvents() async {
        let hub = EventHub(maximumSubscribers: 2)
        let view = InstanceView(
            id: "0a1b2c3d",
            alias: "",
            type: "client",
            status: "running",
            url: "u",
            config: "c",
            restart: true,
            meta: InstanceMeta()
        )
        guard let first = hub.subscribe(initial: [view], room: 4) else {
            Issue.record("the first subscriber was refused")
            return
        }
        // A stream that is dropped gives its place back; one that is held keeps it.
        #expect(hub.subscribe(initial: [], room: 4) != nil)
        let second = hub.subscribe(initial: [], room: 4)
        #expect(second != nil && hub.subscriberCount == 2)
        #expect(hub.subscribe(initial: [], room: 4) == nil)
        hub.publish(.update, view)
        hub.log("0a1b2c3d", "a line")
        hub.endAll()
        #expect(hub.subscriberCount == 0)
        var frames: [String] = []
        for await frame in first.frames { frames.append(String(buffer: frame)) }
        #expect(frames.count == 4)
        #expect(frames[0] == "retry: 3000\n\n")
        #expect(frames[1].hasPrefix("event: instance\ndata: {") && frames[1].contains("\"type\":\"initial\""))
        #expect(frames[2].contains("\"type\":\"update\"") && frames[3].contains("\"logs\":\"a line\""))
        #expect(frames.allSatisfy { $0.hasSuffix("}\n\n") || $0 == "retry: 3000\n\n" })
        // A slow subscriber loses what does not fit, and the others are not held up.
        guard let slow = hub.subscribe(initial: [], room: 2) else {
            Issue.record("a subscriber was refused after the others left")
            return
        }
        for _ in 0..<10 { hub.publish(.update, view) }
        hub.endAll()
        var count = 0
        for await _ in slow.frames { count += 1 }
        #expect(count == 3)
    }

    @Test func theTallyCountsWhatTheMasterShows() {
        let tally = InstanceTally()
        let metrics = TunnelMetrics(role: "server", instance: "0a1b2c3d", factory: tally)
        metrics.bytesUpstream.increment(by: 100)
        metrics.bytesDownstream.increment(by: 7)
        metrics.active.increment(by: 3)
        metrics.active.decrement(by: 1)
        metrics.poolIdle.set(16)
        let reading = tally.read()
        #expect(reading.traffic.tcpReceived == 100 && reading.traffic.tcpSent == 7)
        #expect(reading.connections == 2 && reading.idlePool == 16)
    }
}

@Suite struct MasterAPITests {
    @Test func instanceIDsArePercentDecoded() {
        #expect(MasterAPI.percentDecoded("%2A%2A%2A%2A%2A%2A%2A%2A") == "********")
        #expect(MasterAPI.percentDecoded("0a1b2c3d") == "0a1b2c3d")
        #expect(MasterAPI.percentDecoded("%zz%2") == "%zz%2")
        #expect(MasterAPI.percentDecoded("a%20b") == "a b")
    }
}
