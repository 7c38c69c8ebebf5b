import NIOCore

/// A master's instances and what its API does to them, without I/O: every request and every report from a
/// running tunnel is checked and applied here, and returns what the caller must do (`MasterEffect`): start or
/// stop a tunnel, save the state, publish an event. The caller serialises the calls.
///
/// Each start of an instance is a new run, numbered; what a tunnel reports about an older run (a late stop, a
/// last traffic report) is ignored, so a restart never mixes two runs.
public struct InstanceBook: Sendable {
    /// The ID under which the API shows the master's own record: its API key and master ID.
    public static let keyRecordID = "********"

    public private(set) var state: MasterState
    /// The log level an instance gets when its URL names none (the master's own).
    public let logLevel: LogLevel
    /// The first pause before an instance that failed is started again (then doubling, as a client).
    public let restartDelay: TimeAmount
    private var live: [String: Live] = [:]

    /// What is known of an instance only while the master runs.
    private struct Live: Sendable {
        var status: InstanceStatus = .stopped
        var run: UInt64 = 0
        var startedAt: NIODeadline?
        var backoff: Backoff
        var report = InstanceReport()
    }

    /// A book over `state` (loaded or new); nothing runs until `resume()`.
    public init(state: MasterState, logLevel: LogLevel, restartDelay: TimeAmount) {
        self.state = state
        self.logLevel = logLevel
        self.restartDelay = restartDelay
        for record in state.instances {
            self.live[record.id] = self.newLive()
        }
    }

    private func newLive() -> Live {
        Live(backoff: Backoff(base: self.restartDelay, healthyAfter: .seconds(60)))
    }

    // MARK: reading

    /// The key record followed by every instance, in the order they were made.
    public var views: [InstanceView] {
        [self.keyRecordView] + self.state.instances.map { self.view(of: $0) }
    }

    /// The view of `id`, the key record included.
    public func view(_ id: String) -> Result<InstanceView, MasterAPIError> {
        if id == Self.keyRecordID { return .success(self.keyRecordView) }
        guard let record = self.record(id) else { return .failure(.notFound) }
        return .success(self.view(of: record))
    }

    /// The IDs of the instances that run now or are about to.
    public var runningIDs: [String] {
        self.state.instances.filter { $0.running }.map(\.id)
    }

    private var keyRecordView: InstanceView {
        InstanceView(
            id: Self.keyRecordID,
            alias: self.state.master.alias,
            type: "",
            status: "",
            url: self.state.master.apiKey,
            config: self.state.master.masterID,
            restart: false,
            meta: InstanceMeta()
        )
    }

    private func view(of record: InstanceRecord) -> InstanceView {
        let live = self.live[record.id] ?? self.newLive()
        var view = InstanceView(
            id: record.id,
            alias: record.alias,
            type: String(record.url.prefix(while: { $0 != ":" })),
            status: live.status.rawValue,
            url: record.url,
            config: (try? TunnelURL.parse(record.url))?.canonical ?? record.url,
            restart: record.restart,
            meta: record.meta
        )
        if live.status == .running {
            view.mode = live.report.mode
            view.ping = live.report.ping
            view.pool = live.report.pool
            view.tcps = live.report.tcps
            view.udps = live.report.udps
        }
        view.tcprx = record.traffic.tcpReceived
        view.tcptx = record.traffic.tcpSent
        view.udprx = record.traffic.udpReceived
        view.udptx = record.traffic.udpSent
        return view
    }

    // MARK: requests

    /// Starts every instance that was running when the state was saved.
    public mutating func resume() -> [MasterEffect] {
        self.state.instances.compactMap { record in
            record.running ? self.start(record.id) : nil
        }
    }

    /// POST /instances: a new instance `id` (random, made by the caller) for `url`, started at once.
    public mutating func create(id: String, url: String, alias: String?) -> Result<MasterOutcome, MasterAPIError> {
        guard self.state.instances.count < MasterState.maximumInstances else {
            return .failure(.badRequest("a master runs at most \(MasterState.maximumInstances) instances"))
        }
        guard !self.state.instances.contains(where: { $0.id == id }), id != Self.keyRecordID else {
            return .failure(MasterAPIError(status: 409, message: "Instance ID already exists"))
        }
        let alias = alias ?? ""
        guard alias.utf8.count <= MasterState.maximumFieldLength else { return .failure(.tooLong("alias")) }
        let checked: String
        switch self.checked(url) {
        case .success(let value): checked = value
        case .failure(let error): return .failure(error)
        }
        self.state.instances.append(InstanceRecord(id: id, url: checked, alias: alias, restart: true, running: true))
        self.live[id] = self.newLive()
        let start = self.start(id)
        let view = self.view(of: self.state.instances[self.state.instances.count - 1])
        return .success(MasterOutcome(view: view, effects: [.save, start, .publish(.create, view)]))
    }

    /// PATCH /instances/{id}. Every part is checked before any is applied. On the key record only
    /// `action: restart` does something: it makes a new API key (`newKey`), and ends every event stream.
    public mutating func patch(
        _ id: String,
        _ patch: InstancePatch,
        newKey: () -> String
    ) -> Result<MasterOutcome, MasterAPIError> {
        if let action = patch.action, InstanceAction(rawValue: action) == nil {
            return .failure(.badRequest("Invalid action: \(action.prefix(32))"))
        }
        if id == Self.keyRecordID {
            guard patch.action == InstanceAction.restart.rawValue else {
                return .success(MasterOutcome(view: self.keyRecordView, effects: []))
            }
            self.state.master.apiKey = newKey()
            let view = self.keyRecordView
            return .success(MasterOutcome(view: view, effects: [.save, .publish(.update, view), .endSubscriptions]))
        }
        guard let index = self.index(of: id) else { return .failure(.notFound) }
        if let alias = patch.alias, alias.utf8.count > MasterState.maximumFieldLength {
            return .failure(.tooLong("alias"))
        }
        if let meta = patch.meta {
            var changed = self.state.instances[index].meta
            if let peer = meta.peer { changed.peer = peer }
            if let tags = meta.tags { changed.tags = tags }
            do {
                try changed.validate(instance: id)
            } catch {
                return .failure(.badRequest(error.message))
            }
        }
        var effects: [MasterEffect] = []
        var changed = false
        if let alias = patch.alias, !alias.isEmpty, alias != self.state.instances[index].alias {
            self.state.instances[index].alias = alias
            changed = true
        }
        if let restart = patch.restart, restart != self.state.instances[index].restart {
            self.state.instances[index].restart = restart
            changed = true
        }
        if let meta = patch.meta {
            if let peer = meta.peer { self.state.instances[index].meta.peer = peer }
            if let tags = meta.tags { self.state.instances[index].meta.tags = tags }
            changed = true
        }
        switch patch.action.flatMap(InstanceAction.init(rawValue:)) {
        case .start:
            // A stopped instance, or one that failed (even while it waits to run again).
            if !self.state.instances[index].running || self.live[id]?.status == .error {
                effects.append(self.start(id))
                changed = true
            }
        case .stop:
            if self.state.instances[index].running {
                effects.append(self.stop(id))
                changed = true
            }
        case .restart:
            if self.state.instances[index].running { effects.append(self.stop(id)) }
            effects.append(self.start(id))
            changed = true
        case .reset:
            self.state.instances[index].traffic = TrafficCounters()
            changed = true
        case nil:
            break
        }
        let view = self.view(of: self.state.instances[index])
        guard changed else { return .success(MasterOutcome(view: view, effects: effects)) }
        return .success(MasterOutcome(view: view, effects: [.save] + effects + [.publish(.update, view)]))
    }

    /// PUT /instances/{id}: a new URL for the instance, which then runs with it.
    public mutating func replaceURL(_ id: String, url: String) -> Result<MasterOutcome, MasterAPIError> {
        guard id != Self.keyRecordID else {
            return .failure(MasterAPIError(status: 403, message: "Forbidden: API Key"))
        }
        guard let index = self.index(of: id) else { return .failure(.notFound) }
        let checked: String
        switch self.checked(url) {
        case .success(let value): checked = value
        case .failure(let error): return .failure(error)
        }
        guard checked != self.state.instances[index].url else {
            return .failure(MasterAPIError(status: 409, message: "Instance URL conflict"))
        }
        var effects: [MasterEffect] = []
        if self.state.instances[index].running { effects.append(self.stop(id)) }
        self.state.instances[index].url = checked
        effects.append(self.start(id))
        let view = self.view(of: self.state.instances[index])
        return .success(MasterOutcome(view: view, effects: [.save] + effects + [.publish(.update, view)]))
    }

    /// DELETE /instances/{id}.
    public mutating func delete(_ id: String) -> Result<MasterOutcome, MasterAPIError> {
        guard id != Self.keyRecordID else {
            return .failure(MasterAPIError(status: 403, message: "Forbidden: API Key"))
        }
        guard let index = self.index(of: id) else { return .failure(.notFound) }
        var effects: [MasterEffect] = []
        if self.state.instances[index].running { effects.append(self.stop(id)) }
        let view = self.view(of: self.state.instances[index])
        self.state.instances.remove(at: index)
        self.live[id] = nil
        return .success(MasterOutcome(view: view, effects: [.save] + effects + [.publish(.delete, view)]))
    }

    /// POST /info: the master's alias.
    public mutating func setMasterAlias(_ alias: String) -> Result<[MasterEffect], MasterAPIError> {
        guard alias.utf8.count <= MasterState.maximumFieldLength else { return .failure(.tooLong("alias")) }
        guard alias != self.state.master.alias else { return .success([]) }
        self.state.master.alias = alias
        return .success([.save])
    }

    // MARK: what the tunnels report

    /// Run `run` of `id` is up.
    public mutating func started(_ id: String, run: UInt64, at now: NIODeadline) -> [MasterEffect] {
        guard var live = self.live[id], live.run == run, let record = self.record(id), record.running else {
            return []
        }
        live.status = .running
        live.startedAt = now
        self.live[id] = live
        return [.publish(.update, self.view(of: record))]
    }

    /// Run `run` of `id` ended by itself: with `failed`, it failed (and runs again after a pause when its
    /// restart policy says so); else it stopped cleanly.
    public mutating func ended(
        _ id: String,
        run: UInt64,
        failed: Bool,
        at now: NIODeadline,
        jitter: Double
    ) -> [MasterEffect] {
        guard var live = self.live[id], live.run == run,
            let index = self.index(of: id)
        else { return [] }
        if let startedAt = live.startedAt { live.backoff.sessionEnded(uptime: now - startedAt) }
        live.startedAt = nil
        live.report = InstanceReport()
        live.run += 1
        var effects: [MasterEffect] = []
        if failed {
            live.status = .error
            if self.state.instances[index].restart {
                effects.append(.startLater(id: id, run: live.run, after: live.backoff.nextDelay(jitter: jitter)))
            }
        } else {
            live.status = .stopped
            self.state.instances[index].running = false
            effects.append(.save)
        }
        self.live[id] = live
        effects.append(.publish(.update, self.view(of: self.state.instances[index])))
        return effects
    }

    /// The pause after a failure is over: run `run` starts if nothing changed meanwhile.
    public mutating func restartDue(_ id: String, run: UInt64) -> [MasterEffect] {
        guard let live = self.live[id], live.run == run, live.status == .error,
            let record = self.record(id), record.running, record.restart
        else { return [] }
        guard let url = try? TunnelURL.parse(record.url) else { return [] }
        return [.start(id: id, run: run, url: url)]
    }

    /// What run `run` of `id` counted since its last report: traffic is added to the instance's totals, the
    /// rest replaces what was shown.
    public mutating func report(_ id: String, run: UInt64, _ report: InstanceReport) -> [MasterEffect] {
        guard var live = self.live[id], live.run == run,
            let index = self.index(of: id)
        else { return [] }
        live.report = report
        self.live[id] = live
        self.state.instances[index].traffic.add(report.traffic)
        return [.publish(.update, self.view(of: self.state.instances[index]))]
    }

    /// Adds traffic that a run counted after its last report (read when it stopped).
    public mutating func addTraffic(_ id: String, _ traffic: TrafficCounters) {
        guard let index = self.index(of: id) else { return }
        self.state.instances[index].traffic.add(traffic)
    }

    /// Whether `run` is the current run of `id` (a start asked for earlier may have been overtaken).
    public func isCurrent(_ id: String, run: UInt64) -> Bool {
        self.live[id]?.run == run
    }

    // MARK: helpers

    private func index(of id: String) -> Int? {
        self.state.instances.firstIndex { $0.id == id }
    }

    private func record(_ id: String) -> InstanceRecord? {
        self.index(of: id).map { self.state.instances[$0] }
    }

    /// A new run of `id`: the instance wants to run from now on.
    private mutating func start(_ id: String) -> MasterEffect {
        guard let index = self.index(of: id), var live = self.live[id] else {
            return .save
        }
        live.run += 1
        live.status = .stopped
        self.live[id] = live
        self.state.instances[index].running = true
        // The URL was checked when it was stored; a state file edited by hand is checked on load.
        guard let url = try? TunnelURL.parse(self.state.instances[index].url) else { return .save }
        return .start(id: id, run: live.run, url: url)
    }

    /// Ends the current run of `id`: the instance wants to stay stopped.
    private mutating func stop(_ id: String) -> MasterEffect {
        let run = self.live[id]?.run ?? 0
        if var live = self.live[id] {
            live.run += 1
            live.status = .stopped
            live.startedAt = nil
            live.report = InstanceReport()
            self.live[id] = live
        }
        if let index = self.index(of: id) {
            self.state.instances[index].running = false
        }
        return .stop(id: id, run: run)
    }

    /// `url` as the instance will run it (with the master's `log=` when it names none), or the reason it
    /// cannot run.
    private func checked(_ url: String) -> Result<String, MasterAPIError> {
        guard !url.isEmpty else { return .failure(.badRequest("Invalid request body")) }
        let parsed: TunnelURL
        do {
            parsed = try TunnelURL.parse(url)
        } catch {
            return .failure(.badRequest("Invalid URL: \(error.message)"))
        }
        guard parsed.metrics == nil else {
            return .failure(
                .badRequest(
                    "Invalid URL: metrics= goes on the master's URL, where each instance's metrics carry its ID"
                )
            )
        }
        let query = url.firstIndex(of: "?").map { url[url.index(after: $0)...] } ?? ""
        guard !URLQuery.items(query).contains(where: { $0.name == "log" }) else { return .success(url) }
        let separator = url.contains("?") ? (query.isEmpty ? "" : "&") : "?"
        return .success(url + separator + "log=\(self.logLevel.rawValue)")
    }
}

/// The state of an instance as the API shows it.
public enum InstanceStatus: String, Sendable {
    case running, stopped, error
}

/// The `action` of a PATCH.
public enum InstanceAction: String, Sendable {
    case start, stop, restart, reset
}

/// A PATCH request's body: every part optional.
public struct InstancePatch: Codable, Sendable {
    /// `meta`: a given `peer` or `tags` replaces the old one whole; one left out stays.
    public struct Meta: Codable, Sendable {
        public var peer: InstanceMeta.Peer?
        public var tags: [String: String]?

        public init(peer: InstanceMeta.Peer? = nil, tags: [String: String]? = nil) {
            self.peer = peer
            self.tags = tags
        }
    }

    public var alias: String?
    public var action: String?
    public var restart: Bool?
    public var meta: Meta?

    public init(alias: String? = nil, action: String? = nil, restart: Bool? = nil, meta: Meta? = nil) {
        self.alias = alias
        self.action = action
        self.restart = restart
        self.meta = meta
    }
}

/// What a running instance tells the master now and then.
public struct InstanceReport: Hashable, Sendable {
    /// Bytes moved since the previous report.
    public var traffic = TrafficCounters()
    /// 1 reverse, 2 forward (as the `mode=` parameter), 0 while not known.
    public var mode = 0
    /// The last heartbeat's round trip, in milliseconds.
    public var ping = 0
    /// Idle pool connections.
    public var pool = 0
    /// TCP connections relayed now.
    public var tcps = 0
    /// UDP flows now.
    public var udps = 0

    public init() {}
}

/// What the API shows of an instance: the fields, names and types of NodePass 1.14's master API.
public struct InstanceView: Codable, Hashable, Sendable {
    public var id: String
    public var alias: String
    public var type: String
    public var status: String
    public var url: String
    public var config: String
    public var restart: Bool
    public var meta: InstanceMeta
    public var mode = 0
    public var ping = 0
    public var pool = 0
    public var tcps = 0
    public var udps = 0
    public var tcprx: UInt64 = 0
    public var tcptx: UInt64 = 0
    public var udprx: UInt64 = 0
    public var udptx: UInt64 = 0

    public init(
        id: String,
        alias: String,
        type: String,
        status: String,
        url: String,
        config: String,
        restart: Bool,
        meta: InstanceMeta
    ) {
        self.id = id
        self.alias = alias
        self.type = type
        self.status = status
        self.url = url
        self.config = config
        self.restart = restart
        self.meta = meta
    }
}

/// A request's result: the instance as it is now, and what the caller must do.
public struct MasterOutcome: Sendable {
    public var view: InstanceView
    public var effects: [MasterEffect]
}

/// The kinds of events on the API's event stream (its `type` field).
public enum MasterEventKind: String, Sendable {
    case initial, create, update, delete, log, shutdown
}

/// What the caller of an `InstanceBook` must do, in order. A request's `.save` comes first: when the state
/// cannot be saved, the caller drops the rest and goes back to the book it had before the request.
public enum MasterEffect: Sendable {
    /// Start run `run` of the instance with `url`.
    case start(id: String, run: UInt64, url: TunnelURL)
    /// After `after`, call `restartDue(id, run:)`.
    case startLater(id: String, run: UInt64, after: TimeAmount)
    /// Stop run `run` of the instance (its end is not reported back).
    case stop(id: String, run: UInt64)
    /// Save the state.
    case save
    /// Send an event to every subscriber.
    case publish(MasterEventKind, InstanceView)
    /// End every event stream (the API key changed).
    case endSubscriptions
}

/// A refused request: its HTTP status and the message of its `{"error": …}` body.
public struct MasterAPIError: Error, Hashable, Sendable {
    public var status: Int
    public var message: String

    public init(status: Int, message: String) {
        self.status = status
        self.message = message
    }

    public static let notFound = MasterAPIError(status: 404, message: "Instance not found")

    public static func badRequest(_ message: String) -> MasterAPIError {
        MasterAPIError(status: 400, message: message)
    }

    static func tooLong(_ what: String) -> MasterAPIError {
        .badRequest("\(what) is longer than \(MasterState.maximumFieldLength) bytes")
    }
}

extension TrafficCounters {
    /// Adds `other`, saturating rather than overflowing.
    mutating func add(_ other: TrafficCounters) {
        self.tcpReceived = Self.sum(self.tcpReceived, other.tcpReceived)
        self.tcpSent = Self.sum(self.tcpSent, other.tcpSent)
        self.udpReceived = Self.sum(self.udpReceived, other.udpReceived)
        self.udpSent = Self.sum(self.udpSent, other.udpSent)
    }

    private static func sum(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let (value, overflow) = a.addingReportingOverflow(b)
        return overflow ? .max : value
    }
}
