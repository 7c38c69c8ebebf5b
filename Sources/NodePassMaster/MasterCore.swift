import CoreMetrics
import Logging
import NIOCore
import NodePassCore
import NodePassNIO
import ServiceLifecycle
import Synchronization

/// The master's instances at run time: the `InstanceBook` (what the API may do), the runs of the tunnels
/// (each in its own service group inside this process), the saved state and the event stream. An actor:
/// API requests, the tunnels' reports and the timers reach the book one at a time.
actor MasterCore {
    private var book: InstanceBook
    private var runs: [String: InstanceRun] = [:]
    nonisolated let hub: EventHub
    nonisolated let key: APIKey
    private let store: StateStore
    private let configuration: Configuration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let instanceLogHandler: @Sendable (String, LogLevel, @escaping @Sendable (String) -> Void) -> any LogHandler
    private let prometheus: Bool
    /// The runs being stopped, by instance: a new run of the same instance waits for its end (its ports).
    private var stopping: [String: Task<Void, Never>] = [:]
    private var shuttingDown = false
    private var lastTrafficSave = NIODeadline.now()
    /// Traffic alone is saved at most this often (every change the API makes is saved at once).
    static let trafficSavePeriod = TimeAmount.minutes(1)

    /// One run of an instance.
    private struct InstanceRun {
        var run: UInt64
        var tunnel: ServiceGroup
        var task: Task<Void, Never>
        var tally: InstanceTally
        var last = InstanceTally.Reading()
        var mode = 0
    }

    /// `instanceLogHandler(id, level, copy)` makes the log handler of an instance's tunnel.
    init(
        state: MasterState,
        logLevel: LogLevel,
        store: StateStore,
        configuration: Configuration,
        group: any EventLoopGroup,
        logger: Logger,
        prometheus: Bool,
        instanceLogHandler:
            @escaping @Sendable (String, LogLevel, @escaping @Sendable (String) -> Void) -> any LogHandler
    ) {
        self.book = InstanceBook(state: state, logLevel: logLevel, restartDelay: configuration.serviceCooldown)
        self.hub = EventHub(maximumSubscribers: 32)
        self.key = APIKey(state.master.apiKey)
        self.store = store
        self.configuration = configuration
        self.group = group
        self.logger = logger
        self.prometheus = prometheus
        self.instanceLogHandler = instanceLogHandler
        self.hub.remember(self.book.views)
    }

    // MARK: the API

    var views: [InstanceView] { self.book.views }
    var identity: MasterIdentity { self.book.state.master }

    func view(_ id: String) -> Result<InstanceView, MasterAPIError> { self.book.view(id) }

    func create(url: String, alias: String?) async -> Result<InstanceView, MasterAPIError> {
        let id = randomHex(bytes: 4)
        return await self.change { $0.create(id: id, url: url, alias: alias) }
    }

    func patch(_ id: String, _ patch: InstancePatch) async -> Result<InstanceView, MasterAPIError> {
        let newKey = randomHex(bytes: 16)
        return await self.change { $0.patch(id, patch) { newKey } }
    }

    func replaceURL(_ id: String, url: String) async -> Result<InstanceView, MasterAPIError> {
        await self.change { $0.replaceURL(id, url: url) }
    }

    func delete(_ id: String) async -> Result<InstanceView, MasterAPIError> {
        await self.change { $0.delete(id) }
    }

    func setAlias(_ alias: String) async -> Result<Void, MasterAPIError> {
        let before = self.book
        switch self.book.setMasterAlias(alias) {
        case .success(let effects):
            let result = await self.perform(effects)
            if case .failure = result { self.book = before }
            return result
        case .failure(let error):
            return .failure(error)
        }
    }

    /// Applies a request to the book and carries out its effects; when the state cannot be saved, nothing
    /// of the request happens (the book goes back to what it was) and the answer is 500.
    private func change(
        _ request: (inout InstanceBook) -> Result<MasterOutcome, MasterAPIError>
    ) async -> Result<InstanceView, MasterAPIError> {
        let before = self.book
        switch request(&self.book) {
        case .success(let outcome):
            let result = await self.perform(outcome.effects)
            if case .failure = result {
                self.book = before
                return result.map { outcome.view }
            }
            self.key.replace(self.book.state.master.apiKey)
            return .success(outcome.view)
        case .failure(let error):
            return .failure(error)
        }
    }

    /// A new event-stream subscriber: its stream starts with an `initial` event per instance.
    func subscribe() -> (id: UInt64, frames: AsyncStream<ByteBuffer>)? {
        self.hub.subscribe(initial: self.book.views, room: 256)
    }

    // MARK: running the tunnels

    /// Starts what was running when the state was saved.
    func resume() async {
        _ = await self.perform(self.book.resume())
    }

    /// Reads every run's counters, reports them to the book, and saves when traffic moved.
    func report() async {
        var effects: [MasterEffect] = []
        var moved = false
        for (id, var run) in self.runs {
            let reading = run.tally.read()
            var report = InstanceReport()
            report.traffic = reading.traffic.since(run.last.traffic)
            report.tcps = reading.connections
            report.udps = reading.flows
            report.pool = reading.idlePool
            report.mode = run.mode
            moved = moved || report.traffic != TrafficCounters()
            run.last = reading
            self.runs[id] = run
            effects += self.book.report(id, run: run.run, report)
        }
        if moved && NIODeadline.now() - self.lastTrafficSave >= Self.trafficSavePeriod {
            effects.append(.save)
            self.lastTrafficSave = .now()
        }
        _ = await self.perform(effects)
    }

    /// Adds what `run` counted since its last report to its instance (the run has ended or is ending).
    private func collectTraffic(_ id: String, of run: InstanceRun) {
        self.book.addTraffic(id, run.tally.read().traffic.since(run.last.traffic))
    }

    /// Ends `run` of `id` and waits until it has (its listeners closed, its last bytes counted).
    private func stopRun(_ id: String, _ run: InstanceRun) async {
        self.stopping[id] = run.task
        await run.tunnel.triggerGracefulShutdown()
        await run.task.value
        self.collectTraffic(id, of: run)
        if self.stopping[id] == run.task { self.stopping[id] = nil }
    }

    /// The master stops: subscribers get `shutdown`, every tunnel stops (and still runs at the next start),
    /// the state (with the last counters) is saved.
    func shutdown() async {
        guard !self.shuttingDown else { return }
        await self.report()
        self.shuttingDown = true
        self.hub.publish(.shutdown, nil)
        self.hub.endAll()
        let running = self.runs
        self.runs = [:]
        for run in running.values { await run.tunnel.triggerGracefulShutdown() }
        for (id, run) in running {
            await run.task.value
            self.collectTraffic(id, of: run)
        }
        for task in self.stopping.values { await task.value }
        self.save()
    }

    private func started(_ id: String, run: UInt64, mode: Int) async {
        guard !self.shuttingDown else { return }
        if self.runs[id]?.run == run { self.runs[id]?.mode = mode }
        _ = await self.perform(self.book.started(id, run: run, at: .now()))
    }

    private func ended(_ id: String, run: UInt64, failed: Bool) async {
        guard !self.shuttingDown else { return }
        if let current = self.runs[id], current.run == run {
            self.runs[id] = nil
            self.collectTraffic(id, of: current)
        }
        let effects = self.book.ended(id, run: run, failed: failed, at: .now(), jitter: Double.random(in: 0..<1))
        _ = await self.perform(effects)
    }

    private func restartDue(_ id: String, run: UInt64) async {
        guard !self.shuttingDown else { return }
        _ = await self.perform(self.book.restartDue(id, run: run))
    }

    /// Does what the book asked, in order; a state that cannot be saved fails the request, and what came
    /// after the save is not done.
    private func perform(_ effects: [MasterEffect]) async -> Result<Void, MasterAPIError> {
        for effect in effects {
            switch effect {
            case .start(let id, let run, let url):
                await self.start(id, run: run, url: url)
            case .startLater(let id, let run, let delay):
                self.logger.info(
                    "instance failed; starting it again",
                    metadata: ["np.instance": "\(id)", "np.retry": "\(delay.nanoseconds / 1_000_000)ms"]
                )
                Task {
                    try? await Task.sleep(nanoseconds: UInt64(max(0, delay.nanoseconds)))
                    await self.restartDue(id, run: run)
                }
            case .stop(let id, let run):
                guard let current = self.runs[id], current.run == run else { continue }
                self.runs[id] = nil
                await self.stopRun(id, current)
            case .save:
                guard self.save() else {
                    return .failure(MasterAPIError(status: 500, message: "The state could not be saved"))
                }
            case .publish(let kind, let view):
                self.hub.publish(kind, view)
            case .endSubscriptions:
                self.hub.endAll()
            }
        }
        return .success(())
    }

    @discardableResult
    private func save() -> Bool {
        do {
            try self.store.save(self.book.state)
            return true
        } catch {
            self.logger.error("cannot save the master's state: \(UserFacingError.describe(error))")
            return false
        }
    }

    private func start(_ id: String, run: UInt64, url: TunnelURL) async {
        // The run before it must be gone first (it may hold the ports this one binds).
        if let previous = self.stopping[id] { await previous.value }
        // Another request may have made a newer run meanwhile: then this one is not started (and the
        // run in place, which is that newer one or on its way to it, is left alone).
        guard !self.shuttingDown, self.book.isCurrent(id, run: run) else { return }
        if let older = self.runs[id] {
            self.runs[id] = nil
            await self.stopRun(id, older)
        }
        guard !self.shuttingDown, self.book.isCurrent(id, run: run), self.runs[id] == nil else { return }
        let tally = InstanceTally()
        let factory: any MetricsFactory =
            self.prometheus ? MultiplexMetricsHandler(factories: [tally, MetricsSystem.factory]) : tally
        let hub = self.hub
        let makeHandler = self.instanceLogHandler
        let logger = Logger(label: "nodepass.instance") { _ in
            makeHandler(id, url.logLevel) { line in hub.log(id, line) }
        }
        let role = url.role.rawValue
        let metrics = TunnelMetrics(role: role, instance: id, factory: factory)
        let tunnel: any Service
        switch url.role {
        case .server:
            tunnel = TunnelServer(
                url: url,
                configuration: self.configuration,
                group: self.group,
                logger: logger,
                metrics: metrics,
                onListening: { ports in
                    Task { await self.started(id, run: run, mode: ports.target == 0 ? 2 : 1) }
                }
            )
        case .client:
            tunnel = TunnelClient(
                url: url,
                configuration: self.configuration,
                group: self.group,
                logger: logger,
                metrics: metrics
            )
        }
        let serviceGroup = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: [.init(service: tunnel)],
                gracefulShutdownSignals: [],
                cancellationSignals: [],
                logger: Logger(label: "nodepass.lifecycle", factory: { _ in SwiftLogNoOpLogHandler() })
            )
        )
        // Detached: the master stops its tunnels itself, in its own order, at shutdown.
        let task = Task.detached {
            var failed = false
            do {
                try await serviceGroup.run()
            } catch {
                failed = true
                logger.error("the tunnel stopped: \(UserFacingError.describe(error))")
            }
            await self.ended(id, run: run, failed: failed)
        }
        self.runs[id] = InstanceRun(run: run, tunnel: serviceGroup, task: task, tally: tally)
        if url.role == .client {
            // A client runs from its start: it connects, and reconnects, by itself.
            Task { await self.started(id, run: run, mode: 0) }
        }
    }
}

/// The API key, compared in constant time; replaced when the key record is restarted.
final class APIKey: Sendable {
    private let value: Mutex<[UInt8]>

    init(_ key: String) {
        self.value = Mutex(Array(key.utf8))
    }

    func replace(_ key: String) {
        self.value.withLock { $0 = Array(key.utf8) }
    }

    /// Whether `candidate` is the key; the time taken depends only on the candidate's length.
    func matches(_ candidate: Substring) -> Bool {
        let given = Array(candidate.utf8)
        return self.value.withLock { key in
            var difference: UInt8 = 0
            for index in given.indices {
                difference |= given[index] ^ (index < key.count ? key[index] : 0)
            }
            return difference == 0 && given.count == key.count
        }
    }
}

extension TrafficCounters {
    /// What was counted since `earlier` (a run's counters only grow).
    func since(_ earlier: TrafficCounters) -> TrafficCounters {
        var delta = TrafficCounters()
        delta.tcpReceived = self.tcpReceived &- min(earlier.tcpReceived, self.tcpReceived)
        delta.tcpSent = self.tcpSent &- min(earlier.tcpSent, self.tcpSent)
        delta.udpReceived = self.udpReceived &- min(earlier.udpReceived, self.udpReceived)
        delta.udpSent = self.udpSent &- min(earlier.udpSent, self.udpSent)
        return delta
    }
}
