import NIOCore
import NodePassCore

/// What the server gives an accepted pool connection: its ID, the bytes that tell the client the ID, and
/// the client session that owns it.
struct PoolAdmission: Sendable {
    /// The connection's ID.
    var id: PoolID
    /// The opening to write in one write: the 8 hex characters (v1), or the ID and its proof (v2).
    var opening: ByteBuffer
    /// The client session the connection belongs to.
    var owner: UInt64
    /// v2: the confirmation the client must send back before the connection is idle.
    var confirmation: [UInt8]?
    /// The ticket of the relay it will carry, when its session's relays resume.
    var resume: V2ResumeTicket?

    /// Makes an admission.
    init(
        id: PoolID,
        opening: ByteBuffer,
        owner: UInt64,
        confirmation: [UInt8]? = nil,
        resume: V2ResumeTicket? = nil
    ) {
        self.id = id
        self.opening = opening
        self.owner = owner
        self.confirmation = confirmation
        self.resume = resume
    }
}

/// Fired down a v2 pool connection's pipeline once the client proved its session: the session and the
/// nonce that the server's answer must be bound to.
struct V2PoolAuthenticated: Sendable {
    /// The session the client named.
    var sessionID: [UInt8]
    /// The server's nonce of this connection.
    var nonce: [UInt8]
    /// The keys of a sealed connection (`nodepass/2.2` with `tls=1`); nil when it is TLS or plain.
    var sealing: V2PoolSealKeys? = nil
    /// The proof said `pool resume`: the connection resumes a relay instead of joining the pool.
    var resume = false
}

/// What a server pool connection reports to its pool. Called on the connection's event loop.
protocol ServerPoolConnectionDelegate: AnyObject, Sendable {
    /// A pool connection was accepted (v1) or authenticated (v2): returns its admission, or nil to refuse it.
    func poolConnectionAccepted(_ channel: any Channel, authentication: V2PoolAuthenticated?) -> PoolAdmission?
    /// The opening was written (and, in v2, confirmed): the connection is idle.
    func poolConnectionReady(_ connection: PoolConnection)
    /// An idle connection closed or broke the protocol (sent bytes before its launch).
    func poolConnectionClosed(id: PoolID, channel: any Channel, protocolViolation: Bool)
}

/// The server side of a pool connection before its launch: writes the opening in a single write, then
/// waits to be handed off; after that it passes every event on to the `GlueHandler` behind it.
///
/// In reverse mode the server launches: an idle connection that receives a byte or an end of input is
/// dead and closed. In forward mode (`holdsEarlyBytes`) the client launches and may relay before the
/// server has read the launch: early bytes are held (up to a bound, for at most `claimTimeout`) and passed
/// on at the handoff. v1 starts when the connection is active; v2 starts on `V2PoolAuthenticated`. The
/// channel must have `autoRead` off.
final class ServerPoolConnectionHandler: ChannelInboundHandler, PoolConnectionHolder {
    typealias InboundIn = ByteBuffer

    private enum State {
        case opening
        case confirming(PoolAdmission, received: ByteBuffer)
        case idle(PoolID)
        case claimed(PoolID)
        case done
    }

    private var state: State = .opening
    private let delegate: any ServerPoolConnectionDelegate
    private let waitsForAuthentication: Bool
    private let claimTimeout: TimeAmount?
    private let confirmationTimeout: TimeAmount
    private var early = EarlyBytes()
    private var timeout: Scheduled<Void>?
    private var context: ChannelHandlerContext?
    /// The relay behind this handler, connected at the hand-off.
    private let glue: GlueHandler

    /// Makes the handler; with `waitsForAuthentication` it starts on `V2PoolAuthenticated` instead of
    /// `channelActive`; with a `claimTimeout` it holds early bytes (forward mode) for at most that long. A v2
    /// client has `confirmationTimeout` to confirm the opening.
    init(
        delegate: any ServerPoolConnectionDelegate,
        glue: GlueHandler,
        waitsForAuthentication: Bool = false,
        claimTimeout: TimeAmount? = nil,
        confirmationTimeout: TimeAmount = .seconds(5)
    ) {
        self.delegate = delegate
        self.glue = glue
        self.waitsForAuthentication = waitsForAuthentication
        self.claimTimeout = claimTimeout
        self.confirmationTimeout = confirmationTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        if !self.waitsForAuthentication {
            self.start(context: context, authentication: nil)
        }
    }

    private func start(context: ChannelHandlerContext, authentication: V2PoolAuthenticated?) {
        guard case .opening = self.state else { return }
        guard let admission = self.delegate.poolConnectionAccepted(context.channel, authentication: authentication)
        else {
            self.state = .done
            context.close(promise: nil)
            return
        }
        context.writeAndFlush(NIOAny(admission.opening), promise: nil)
        if admission.confirmation != nil {
            // Not idle before the client confirms from the far end of this connection (and of its TLS).
            self.state = .confirming(admission, received: ByteBuffer())
            let channel = context.channel
            self.timeout = context.eventLoop.scheduleTask(in: self.confirmationTimeout) { channel.close(promise: nil) }
            context.read()
            return
        }
        self.becomeIdle(context: context, admission: admission)
    }

    private func becomeIdle(context: ChannelHandlerContext, admission: PoolAdmission) {
        self.state = .idle(admission.id)
        self.delegate.poolConnectionReady(
            PoolConnection(
                channel: context.channel,
                id: admission.id,
                owner: admission.owner,
                holder: self,
                resume: admission.resume
            )
        )
        context.read()
    }

    private func confirm(context: ChannelHandlerContext, admission: PoolAdmission, received: inout ByteBuffer) {
        guard received.readableBytes >= V2PoolOpening.confirmationLength else {
            self.state = .confirming(admission, received: received)
            return
        }
        let confirmation = received.readBytes(length: V2PoolOpening.confirmationLength) ?? []
        guard let expected = admission.confirmation, V2Key.constantTimeEquals(confirmation, expected) else {
            self.state = .done
            context.close(promise: nil)
            return
        }
        self.timeout?.cancel()
        self.timeout = nil
        self.becomeIdle(context: context, admission: admission)
        if received.readableBytes > 0 {
            // Bytes right behind the confirmation: relayed data (forward mode) or a violation.
            self.channelRead(context: context, data: NIOAny(received))
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.state {
        case .confirming(let admission, var received):
            var buffer = self.unwrapInboundIn(data)
            received.writeBuffer(&buffer)
            self.confirm(context: context, admission: admission, received: &received)
        case .idle(let id) where self.claimTimeout == nil:
            self.state = .done
            self.delegate.poolConnectionClosed(id: id, channel: context.channel, protocolViolation: true)
            context.close(promise: nil)
        case .idle(let id):
            var buffer = self.unwrapInboundIn(data)
            self.early.hold(&buffer)
            self.state = .claimed(id)
            let channel = context.channel
            self.timeout = self.claimTimeout.map {
                context.eventLoop.scheduleTask(in: $0) { channel.close(promise: nil) }
            }
        case .claimed:
            var buffer = self.unwrapInboundIn(data)
            self.early.hold(&buffer)
        case .opening, .done:
            context.fireChannelRead(data)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        switch self.state {
        case .confirming:
            context.read()
        case .idle, .claimed:
            if self.claimTimeout != nil && self.early.wantsMoreReads {
                context.read()
            }
        case .opening, .done:
            context.fireChannelReadComplete()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let authenticated = event as? V2PoolAuthenticated {
            self.start(context: context, authentication: authenticated)
            return
        }
        if case ChannelEvent.inputClosed = event {
            switch self.state {
            case .idle, .confirming:
                context.close(promise: nil)
                return
            case .claimed:
                self.early.endOfInput()
                return
            case .opening, .done:
                break
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timeout?.cancel()
        self.timeout = nil
        switch self.state {
        case .idle(let id), .claimed(let id):
            self.state = .done
            self.delegate.poolConnectionClosed(id: id, channel: context.channel, protocolViolation: false)
        case .opening, .confirming, .done:
            break
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// Ends the waiting phase, connects the `GlueHandler` behind this handler to `partner` and passes on
    /// what was held (forward mode). Returns false when the connection is no longer usable.
    func handOff(to consumer: PoolConnectionConsumer) -> Bool {
        guard let context = self.context else { return false }
        switch self.state {
        case .idle, .claimed:
            self.timeout?.cancel()
            self.timeout = nil
            self.state = .done
            return self.early.handOff(context: context, to: consumer, glue: self.glue)
        case .opening, .confirming, .done:
            return false
        }
    }
}

@available(*, unavailable)
extension ServerPoolConnectionHandler: Sendable {}
