import NIOCore
import Testing

@testable import NodePassCore

@Suite struct InstanceBookTests {
    private static let serverURL = "server://0123456789abcdef@:10101/127.0.0.1:8080?tls=0"
    private static let clientURL = "client://0123456789abcdef@127.0.0.1:10101/127.0.0.1:80?log=debug"
    private static let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    private static func book() -> InstanceBook {
        let identity = MasterIdentity(
            apiKey: String(repeating: "a", count: 32),
            masterID: String(repeating: "b", count: 16)
        )
        return InstanceBook(state: MasterState(master: identity), logLevel: .warn, restartDelay: .seconds(5))
    }

    /// The runs that `effects` start, by instance ID.
    private static func starts(_ effects: [MasterEffect]) -> [String: UInt64] {
        var runs: [String: UInt64] = [:]
        for case .start(let id, let run, _) in effects { runs[id] = run }
        return runs
    }

    private static func stops(_ effects: [MasterEffect]) -> [String: UInt64] {
        var runs: [String: UInt64] = [:]
        for case .stop(let id, let run) in effects { runs[id] = run }
        return runs
    }

    private static func events(_ effects: [MasterEffect]) -> [String] {
        effects.compactMap {
            if case .publish(let kind, let view) = $0 { return "\(kind.rawValue) \(view.id) \(view.status)" }
            return nil
        }
    }

    private static func saves(_ effects: [MasterEffect]) -> Bool {
        effects.contains { if case .save = $0 { true } else { false } }
    }

    @Test func aNewInstanceStartsSavesAndIsAnnouncedWithTheMastersLogLevel() throws {
        var book = Self.book()
        let outcome = try book.create(id: "0000000a", url: Self.serverURL, alias: "db").get()
        #expect(outcome.view.url == Self.serverURL + "&log=warn")
        #expect(outcome.view.status == "stopped" && outcome.view.type == "server" && outcome.view.alias == "db")
        #expect(outcome.view.restart)
        #expect(
            outcome.view.config
                == "server://0123456789abcdef@:10101/127.0.0.1:8080?log=warn&tls=0&mode=0&notcp=0&noudp=0"
        )
        #expect(Self.starts(outcome.effects) == ["0000000a": 1])
        #expect(Self.saves(outcome.effects))
        #expect(Self.events(outcome.effects) == ["create 0000000a stopped"])
        // A URL that names its log level keeps it; one without a query gets one.
        #expect(try book.create(id: "0000000b", url: Self.clientURL, alias: nil).get().view.url == Self.clientURL)
        let bare = "client://127.0.0.1:10101/127.0.0.1:80"
        let client = try book.create(id: "0000000c", url: bare, alias: nil).get().view
        #expect(client.url == bare + "?log=warn" && client.config == client.url)
        #expect(book.views.map(\.id) == [InstanceBook.keyRecordID, "0000000a", "0000000b", "0000000c"])
    }

    @Test func urlsThatCannotRunAreRefusedWithTheReasonAndChangeNothing() {
        var book = Self.book()
        for (url, fragment) in [
            ("", "Invalid request body"),
            ("http://example.com/", "Invalid URL"),
            ("server://:10101", "Invalid URL"),
            ("client://k@127.0.0.1:1/127.0.0.1:2?tls=1", "set on the server"),
            ("server://:1/:2?metrics=127.0.0.1:9", "metrics="),
        ] {
            guard case .failure(let error) = book.create(id: "0000000a", url: url, alias: nil) else {
                Issue.record("\(url) was accepted")
                continue
            }
            #expect(error.status == 400)
            #expect(error.message.contains(fragment), "\(url): \(error.message)")
        }
        #expect(book.state.instances.isEmpty)
        #expect(
            (try? book.create(id: "0000000a", url: Self.serverURL, alias: String(repeating: "x", count: 257)).get())
                == nil
        )
        _ = book.create(id: "0000000a", url: Self.serverURL, alias: nil)
        #expect(book.create(id: "0000000a", url: Self.clientURL, alias: nil).failureStatus == 409)
        #expect(book.create(id: InstanceBook.keyRecordID, url: Self.clientURL, alias: nil).failureStatus == 409)
    }

    @Test func aRunIsRunningOnceItReportsAndItsCountersAddUp() throws {
        var book = Self.book()
        _ = try book.create(id: "0000000a", url: Self.serverURL, alias: nil).get()
        #expect(Self.events(book.started("0000000a", run: 1, at: Self.start)) == ["update 0000000a running"])
        var report = InstanceReport()
        report.traffic.tcpReceived = 100
        report.traffic.udpSent = 7
        report.tcps = 3
        report.pool = 16
        report.mode = 1
        _ = book.report("0000000a", run: 1, report)
        _ = book.report("0000000a", run: 1, report)
        let view = try book.view("0000000a").get()
        #expect(view.tcprx == 200 && view.udptx == 14 && view.tcps == 3 && view.pool == 16 && view.mode == 1)
        // A report from another run changes nothing.
        #expect(book.report("0000000a", run: 7, report).isEmpty)
        #expect(try book.view("0000000a").get().tcprx == 200)
        // reset zeroes the counters and keeps the run.
        let reset = try book.patch("0000000a", InstancePatch(action: "reset"), newKey: { "" }).get()
        #expect(reset.view.tcprx == 0 && reset.view.status == "running")
        #expect(Self.starts(reset.effects).isEmpty && Self.stops(reset.effects).isEmpty)
    }

    @Test func stopStartAndRestartMakeNewRunsAndLateReportsOfOldRunsAreIgnored() throws {
        var book = Self.book()
        _ = try book.create(id: "0000000a", url: Self.serverURL, alias: nil).get()
        _ = book.started("0000000a", run: 1, at: Self.start)
        let stop = try book.patch("0000000a", InstancePatch(action: "stop"), newKey: { "" }).get()
        #expect(Self.stops(stop.effects) == ["0000000a": 1] && stop.view.status == "stopped")
        #expect(book.state.instances[0].running == false)
        // Stopping what is stopped does nothing; the end of the stopped run is not news.
        #expect(try book.patch("0000000a", InstancePatch(action: "stop"), newKey: { "" }).get().effects.isEmpty)
        #expect(book.ended("0000000a", run: 1, failed: true, at: Self.start, jitter: 0).isEmpty)
        let start = try book.patch("0000000a", InstancePatch(action: "start"), newKey: { "" }).get()
        #expect(Self.starts(start.effects) == ["0000000a": 3])
        #expect(book.started("0000000a", run: 1, at: Self.start).isEmpty)
        let restart = try book.patch("0000000a", InstancePatch(action: "restart"), newKey: { "" }).get()
        #expect(Self.stops(restart.effects) == ["0000000a": 3] && Self.starts(restart.effects) == ["0000000a": 5])
        #expect(book.patch("0000000a", InstancePatch(action: "jump"), newKey: { "" }).failureStatus == 400)
    }

    @Test func aFailedRunStartsAgainAfterTheBackoffOnlyWithItsRestartPolicy() throws {
        var book = Self.book()
        _ = try book.create(id: "0000000a", url: Self.serverURL, alias: nil).get()
        _ = book.started("0000000a", run: 1, at: Self.start)
        var effects = book.ended("0000000a", run: 1, failed: true, at: Self.start + .seconds(1), jitter: 0)
        #expect(Self.events(effects) == ["update 0000000a error"])
        guard case .startLater(_, let run, let delay) = effects.first else {
            Issue.record("no restart after a failure: \(effects)")
            return
        }
        #expect(run == 2 && delay == .seconds(5))
        #expect(Self.starts(book.restartDue("0000000a", run: 2)) == ["0000000a": 2])
        // It fails again at once: the next pause is longer.
        effects = book.ended("0000000a", run: 2, failed: true, at: Self.start + .seconds(2), jitter: 1)
        guard case .startLater(_, 3, let second) = effects.first else {
            Issue.record("no second restart: \(effects)")
            return
        }
        #expect(second == .seconds(10))
        // Without the policy, a failure leaves the instance in error.
        _ = try book.patch("0000000a", InstancePatch(restart: false), newKey: { "" }).get()
        #expect(book.restartDue("0000000a", run: 3).isEmpty)
        #expect(try book.view("0000000a").get().status == "error")
        // A clean end is a stop, saved.
        _ = try book.patch("0000000a", InstancePatch(action: "start"), newKey: { "" }).get()
        effects = book.ended("0000000a", run: 4, failed: false, at: Self.start + .seconds(3), jitter: 0)
        #expect(Self.saves(effects) && book.state.instances[0].running == false)
    }

    @Test func patchChecksEveryPartBeforeApplyingAny() throws {
        var book = Self.book()
        _ = try book.create(id: "0000000a", url: Self.serverURL, alias: "old").get()
        let long = String(repeating: "t", count: 257)
        let bad = InstancePatch(alias: "new", meta: .init(tags: ["k": long]))
        #expect(book.patch("0000000a", bad, newKey: { "" }).failureStatus == 400)
        #expect(book.state.instances[0].alias == "old")
        let peer = InstanceMeta.Peer(sid: "s", type: "1", alias: "p")
        var outcome = try book.patch(
            "0000000a",
            InstancePatch(meta: .init(peer: peer, tags: ["a": "b"])),
            newKey: { "" }
        )
        .get()
        #expect(outcome.view.meta == InstanceMeta(peer: peer, tags: ["a": "b"]))
        // Tags alone replace the tags and keep the peer; an empty alias changes nothing.
        outcome = try book.patch("0000000a", InstancePatch(alias: "", meta: .init(tags: [:])), newKey: { "" }).get()
        #expect(outcome.view.meta == InstanceMeta(peer: peer, tags: [:]) && outcome.view.alias == "old")
        #expect(book.patch("ffffffff", InstancePatch(alias: "x"), newKey: { "" }).failureStatus == 404)
    }

    @Test func theKeyRecordShowsTheKeyAndIDAndOnlyARestartChangesIt() throws {
        var book = Self.book()
        let record = try book.view(InstanceBook.keyRecordID).get()
        #expect(record.url == String(repeating: "a", count: 32) && record.config == String(repeating: "b", count: 16))
        #expect(record.type == "" && record.status == "")
        #expect(
            try book.patch(InstanceBook.keyRecordID, InstancePatch(alias: "x"), newKey: { "c" }).get().effects.isEmpty
        )
        let outcome = try book.patch(InstanceBook.keyRecordID, InstancePatch(action: "restart"), newKey: { "c" }).get()
        #expect(outcome.view.url == "c" && book.state.master.apiKey == "c")
        #expect(outcome.effects.contains { if case .endSubscriptions = $0 { true } else { false } })
        #expect(book.replaceURL(InstanceBook.keyRecordID, url: Self.serverURL).failureStatus == 403)
        #expect(book.delete(InstanceBook.keyRecordID).failureStatus == 403)
        #expect(try book.setMasterAlias("edge-1").get().count == 1)
        #expect(try book.view(InstanceBook.keyRecordID).get().alias == "edge-1")
    }

    @Test func putRunsTheNewURLAndDeleteStopsAndForgets() throws {
        var book = Self.book()
        _ = try book.create(id: "0000000a", url: Self.serverURL, alias: "db").get()
        _ = book.started("0000000a", run: 1, at: Self.start)
        #expect(book.replaceURL("0000000a", url: Self.serverURL).failureStatus == 409)
        let put = try book.replaceURL("0000000a", url: Self.clientURL).get()
        #expect(Self.stops(put.effects) == ["0000000a": 1] && Self.starts(put.effects) == ["0000000a": 3])
        #expect(put.view.type == "client" && put.view.alias == "db")
        let delete = try book.delete("0000000a").get()
        #expect(Self.stops(delete.effects) == ["0000000a": 3])
        #expect(Self.events(delete.effects) == ["delete 0000000a stopped"])
        #expect(book.state.instances.isEmpty && book.view("0000000a").failureStatus == 404)
        #expect(book.started("0000000a", run: 3, at: Self.start).isEmpty)
    }

    @Test func everyRequestThatChangesTheStateSavesFirst() throws {
        var book = Self.book()
        var outcomes = [try book.create(id: "0000000a", url: Self.serverURL, alias: nil).get()]
        outcomes.append(try book.patch("0000000a", InstancePatch(action: "restart"), newKey: { "" }).get())
        outcomes.append(try book.replaceURL("0000000a", url: Self.clientURL).get())
        outcomes.append(
            try book.patch(InstanceBook.keyRecordID, InstancePatch(action: "restart"), newKey: { "k" }).get()
        )
        outcomes.append(try book.delete("0000000a").get())
        for outcome in outcomes {
            guard case .save = outcome.effects.first else {
                Issue.record("\(outcome.effects) does not save first")
                continue
            }
        }
    }

    @Test func trafficCountedAfterTheLastReportIsAdded() throws {
        var book = Self.book()
        _ = try book.create(id: "0000000a", url: Self.serverURL, alias: nil).get()
        var traffic = TrafficCounters()
        traffic.tcpSent = 5
        book.addTraffic("0000000a", traffic)
        book.addTraffic("0000000a", traffic)
        book.addTraffic("ffffffff", traffic)
        #expect(try book.view("0000000a").get().tcptx == 10)
    }

    @Test func aLoadedStateResumesWhatWasRunning() throws {
        var book = Self.book()
        _ = try book.create(id: "0000000a", url: Self.serverURL, alias: nil).get()
        _ = try book.create(id: "0000000b", url: Self.clientURL, alias: nil).get()
        _ = try book.patch("0000000b", InstancePatch(action: "stop"), newKey: { "" }).get()
        var reloaded = InstanceBook(state: try book.state.validated(), logLevel: .info, restartDelay: .seconds(5))
        #expect(Self.starts(reloaded.resume()) == ["0000000a": 1])
        #expect(try reloaded.view("0000000b").get().status == "stopped")
    }
}

extension Result where Failure == MasterAPIError {
    /// The HTTP status of a failure, nil on success.
    fileprivate var failureStatus: Int? {
        if case .failure(let error) = self { return error.status }
        return nil
    }
}
