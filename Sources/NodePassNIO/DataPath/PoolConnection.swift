import NIOCore
import NodePassCore

/// The handler at the front of a pool connection that holds it until its relay starts
/// (`ServerPoolConnectionHandler`, `ClientPoolConnectionHandler`).
protocol PoolConnectionHolder: AnyObject {
    /// Ends the waiting phase: gives the connection to `consumer` and passes on what was held. Runs on the
    /// connection's event loop; false when the connection is no longer usable.
    func handOff(to consumer: PoolConnectionConsumer) -> Bool
}

/// What a launched pool connection serves.
enum PoolConnectionConsumer {
    /// One TCP connection: the relay behind the holder is connected to `partner`.
    case relay(partner: any Channel)
    /// Datagrams (`nodepass/2.1`), or the frames of a resumable relay: `handler` is put right behind the
    /// holder and reads all that comes; the relay behind it stays unconnected.
    case carrier(any ChannelHandler)
}

/// A pool connection with its ID, ready to carry one relay: what a pool (`ServerPool`, `ClientPool`) gives
/// the side with the users (`Launcher`) or the side that dials (`TargetDialer`).
struct PoolConnection: Sendable {
    let channel: any Channel
    let id: PoolID
    /// The client session (on the server) or the pool generation (on the client) it belongs to.
    var owner: UInt64
    /// The ticket of the relay it carries, when its session's relays resume (`V2Resume`).
    let resume: V2ResumeTicket?
    private let holder: NIOLoopBound<any PoolConnectionHolder>

    /// Made on the connection's event loop by the handler that holds it.
    init(
        channel: any Channel,
        id: PoolID,
        owner: UInt64,
        holder: any PoolConnectionHolder,
        resume: V2ResumeTicket? = nil
    ) {
        self.channel = channel
        self.id = id
        self.owner = owner
        self.resume = resume
        self.holder = NIOLoopBound(holder, eventLoop: channel.eventLoop)
    }

    /// Starts relaying this connection to `partner`; see `PoolConnectionHolder.handOff(to:)`. Must run on the
    /// connection's event loop.
    func handOff(to partner: any Channel) -> Bool {
        self.holder.value.handOff(to: .relay(partner: partner))
    }

    /// Makes this connection a datagram carrier read by `handler`. Must run on the connection's event loop.
    func handOff(toCarrier handler: any ChannelHandler) -> Bool {
        self.holder.value.handOff(to: .carrier(handler))
    }
}

/// What a pool does with its ready connections: `Launcher` on the side with the users, `TargetDialer` on the
/// side that dials. Called from any thread.
protocol PoolConnectionRole: AnyObject, Sendable {
    /// A pool connection is ready; false when it was closed at once (its ID is taken, or the pool is full).
    func connectionReady(_ connection: PoolConnection) -> Bool
    /// The other side wrote on the idle connection `id` before launching it: true the first time it counts
    /// as used (the dialling side keeps it for its launch, or closes it once too many wait; the side with the
    /// users drops it as broken). Called with the pool's lock held: the role closes no channel at once.
    func connectionClaimed(_ id: PoolID) -> Bool
    /// A pool connection closed before its relay: true when it counted as idle (neither used nor claimed).
    func connectionClosed(id: PoolID, channel: any Channel) -> Bool
    /// The owner's control channel is gone: its idle connections are closed; returns how many.
    @discardableResult
    func ownerLost(_ owner: UInt64) -> Int
    /// Shutting down or restarting the pool: every idle connection (and waiting user) is closed.
    func closeAll()
    /// Whether another connection would be closed at once: the idle pool is full and nobody waits.
    var isFull: Bool { get }
    /// The number of idle connections of `owner`.
    func idleCount(owner: UInt64) -> Int
    /// True when an idle connection already has this ID.
    func isInUse(_ id: PoolID) -> Bool
    /// The number of idle pool connections.
    var idleCount: Int { get }
}

/// What the roles need from their pool.
protocol PoolConnectionOwners: AnyObject, Sendable {
    /// Where the launches of `owner`'s connections go, nil once that owner is gone.
    func launchWriter(for owner: UInt64) -> SignalWriter?
    /// A pool connection was taken for a relay (`wasClaimed`: it was already counted as used).
    func connectionTaken(_ connection: PoolConnection, wasClaimed: Bool)
    /// The owners whose session carries UDP (`nodepass/2.1`, UDP on).
    var datagramOwners: Set<UInt64> { get }
    /// Whether `owner` is still connected (a client session on the server, the current pool generation on
    /// the client).
    func isCurrent(_ owner: UInt64) -> Bool
}
