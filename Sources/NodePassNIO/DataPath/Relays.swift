import CoreMetrics
import Logging
import NIOCore
import NodePassCore

/// How one process sets up the ends of its relays: which byte counter each end feeds, the sessions that
/// bound and track them, and whether they may move to the kernel. Every `GlueHandler` of the tunnel is made
/// here, so that the two roles and both processes relay alike. A class, for the same reason as
/// `TunnelMetrics`: it is captured by the set-up closures of every connection.
final class Relays: Sendable {
    /// The channel an end of a relay reads from.
    enum End {
        /// A user's connection (what it reads goes towards the service).
        case user
        /// The target's connection (what it reads goes back to the user).
        case target
        /// A pool connection on the side with the users (it reads what the service sent back).
        case poolWithUsers
        /// A pool connection on the side that dials (it reads what the user sent).
        case poolThatDials
    }

    let sessions: SessionTracker
    let metrics: TunnelMetrics
    let logger: Logger
    /// A user connection on which nothing moved for this long is closed (nil: never).
    let idleTimeout: TimeAmount?
    /// Whether plain relays may move to the splice engine (`NODEPASS_SPLICE`).
    let splice: Bool

    init(sessions: SessionTracker, metrics: TunnelMetrics, logger: Logger, configuration: Configuration) {
        self.sessions = sessions
        self.metrics = metrics
        self.logger = logger
        self.idleTimeout = configuration.idleTimeout
        self.splice = configuration.splice
    }

    /// The unconnected `GlueHandler` of `end`.
    func glue(_ end: End) -> GlueHandler {
        let bytes: Counter
        switch end {
        case .user, .poolThatDials: bytes = self.metrics.bytesUpstream
        case .target, .poolWithUsers: bytes = self.metrics.bytesDownstream
        }
        guard self.splice else { return GlueHandler(bytes: bytes) }
        let setup: SpliceSetup
        switch end {
        case .user:
            setup = SpliceSetup(sessions: self.sessions, idleTimeout: self.idleTimeout, logger: self.logger)
        case .target:
            setup = SpliceSetup(sessions: self.sessions, logger: self.logger)
        case .poolWithUsers, .poolThatDials:
            // The other half of the pair keeps the time of the move.
            setup = SpliceSetup(sessions: self.sessions, logger: self.logger, schedulesMove: false)
        }
        return GlueHandler(bytes: bytes, splice: setup)
    }
}
