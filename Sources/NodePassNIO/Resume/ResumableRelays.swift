import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// Opens the pool connection on which a client resumes one relay (`ClientPool`).
protocol ResumeConnector: AnyObject, Sendable {
    /// Dials a resume connection for `stream` on its event loop; the future succeeds once the relay goes on
    /// over it and fails when it could not (no session yet, the dial failed, the server refused).
    func openResumeConnection(for stream: ResumableStream.Handle) -> EventLoopFuture<Void>
}

/// What every resumable relay of one tunnel side shares (`Pipelines.resumes`): the grace period, the bounds
/// on what they keep, their metrics, the live relays by ID (where a resume connection finds its relay on
/// the server; what resumes after a reconnection on the client), and on the client the connector that
/// opens resume connections.
final class ResumableRelays: Sendable {
    /// How long a relay waits for a new pool connection after a break (RESUME_GRACE).
    let grace: TimeAmount
    /// The most bytes one relay keeps for a resend: 16 times RELAY_BUFFER, at least 1 MiB (eight times
    /// `ackEvery`, so that a sender whose peer acks at that pace does not wait for an ack on a short path).
    /// Over a path with a round trip of RTT, one relay carries at most this much per RTT.
    let keepLimit: Int
    /// RELAY_BUFFER: the size of a relay's reads, and what it hands to its user or service at a time.
    let relayBuffer: Int
    /// BUFFER_BUDGET, shared with every relay of the process: past it, a relay keeps at most `keepFloor`.
    let budget: RelayBudget
    /// What a relay may keep even while the budget is full, so that none waits for bytes others keep. As
    /// much as `ackEvery`: a sender at this bound gets its ack when its last byte arrives, not `ackDelay` later.
    static let keepFloor = Int(ackEvery)
    /// Positions received before an ack goes out at the end of a read. (Bytes sent the other way carry an
    /// ack of what arrived so far anyway.)
    static let ackEvery: UInt64 = 128 * 1024
    /// When fewer were received, the ack goes out after this delay.
    static let ackDelay = TimeAmount.milliseconds(20)
    let metrics: ResumeMetrics
    let tunnelMetrics: TunnelMetrics
    let logger: Logger
    /// True in the client process (which dials resume connections).
    let isClient: Bool
    private struct Live {
        var byID: [[UInt8]: ResumableStream.Handle] = [:]
        /// How many live relays were launched on a pool connection with each ID.
        var poolIDs: [PoolID: Int] = [:]
    }

    private let live = Locked(Live())
    private let connectorBox = Locked<(any ResumeConnector)?>(nil)

    init(configuration: Configuration, metrics: TunnelMetrics, budget: RelayBudget, logger: Logger, isClient: Bool) {
        self.grace = configuration.resumeGrace
        self.relayBuffer = configuration.relayBuffer
        self.keepLimit = max(configuration.relayBuffer * 16, 8 * Int(Self.ackEvery))
        self.budget = budget
        self.metrics = metrics.resume
        self.tunnelMetrics = metrics
        self.logger = logger
        self.isClient = isClient
    }

    /// The client's connector; set once by the pool before any relay starts.
    var connector: (any ResumeConnector)? {
        get { self.connectorBox.withLock { $0 } }
        set { self.connectorBox.withLock { $0 = newValue } }
    }

    /// Registers a relay: false when a live relay has its ID already.
    func register(_ handle: ResumableStream.Handle, poolID: PoolID) -> Bool {
        self.live.withLock { live in
            guard live.byID[handle.ticket.streamID] == nil else { return false }
            live.byID[handle.ticket.streamID] = handle
            live.poolIDs[poolID, default: 0] += 1
            return true
        }
    }

    /// The relay ended.
    func unregister(_ ticket: V2ResumeTicket, poolID: PoolID) {
        self.live.withLock { live in
            guard live.byID[ticket.streamID]?.ticket == ticket else { return }
            live.byID[ticket.streamID] = nil
            live.poolIDs[poolID] = live.poolIDs[poolID].flatMap { $0 > 1 ? $0 - 1 : nil }
        }
    }

    /// The live relay with `streamID`, if any.
    func relay(_ streamID: [UInt8]) -> ResumableStream.Handle? {
        self.live.withLock { $0.byID[streamID] }
    }

    /// Whether a live relay of any session was launched on a pool connection with this ID (the server gives a
    /// new pool connection another ID, so that relay IDs stay unique).
    func isLive(_ id: PoolID) -> Bool {
        self.live.withLock { $0.poolIDs[id] != nil }
    }

    /// The number of live relays.
    var count: Int { self.live.withLock { $0.byID.count } }

    /// The client's control channel reconnected: every live relay resumes on a new pool connection
    /// (`ResumableStream.sessionRestarted`).
    func sessionRestarted() {
        let handles = self.live.withLock { Array($0.byID.values) }
        for handle in handles {
            handle.eventLoop.execute { handle.stream.value.sessionRestarted() }
        }
    }
}

/// The metrics of resumes: attempts, outcomes by reason, bytes sent again.
struct ResumeMetrics: Sendable {
    let attempted: Counter
    let succeeded: Counter
    let failedUnknown: Counter
    let failedExpired: Counter
    let failedRefused: Counter
    let bytesResent: Counter

    init(labels: MetricLabels) {
        self.attempted = labels.counter("nodepass_resumes_attempted_total")
        self.succeeded = labels.counter("nodepass_resumes_total", ("outcome", "resumed"))
        self.failedUnknown = labels.counter("nodepass_resumes_total", ("outcome", "unknown"))
        self.failedExpired = labels.counter("nodepass_resumes_total", ("outcome", "expired"))
        self.failedRefused = labels.counter("nodepass_resumes_total", ("outcome", "refused"))
        self.bytesResent = labels.counter("nodepass_resume_bytes_resent_total")
    }
}
