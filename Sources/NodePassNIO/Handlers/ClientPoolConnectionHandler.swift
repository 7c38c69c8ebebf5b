import NIOCore
import NodePassCore

/// What a client pool connection reports to its pool. Called on the connection's event loop.
protocol ClientPoolConnectionDelegate: AnyObject, Sendable {
    /// The server sent this connection's ID; it is idle now.
    func poolConnectionEstablished(_ connection: PoolConnection)
    /// Bytes or an end of input came before the launch: the server took the connection; it is no longer idle.
    func poolConnectionClaimed(id: PoolID)
    /// The connection closed before it was handed off (or failed to give an ID).
    func poolConnectionClosed(_ channel: any Channel, id: PoolID?)
    /// v2: the TLS certificate of the connection was not the one the server announced (it closes next).
    func poolCertificateMismatched(_ channel: any Channel)
}

/// How a client pool connection reads its ID from the server's opening.
struct PoolIDReader {
    /// How many bytes the opening has.
    var length: Int
    /// The ID in the opening, or nil when it is not valid.
    var parse: (ByteBuffer) -> PoolID?
    /// What to answer once the ID is read (v2: the confirmation), if anything.
    var reply: ((PoolID) -> [UInt8])?
    /// The ticket of a relay launched on the connection, when the session's relays resume.
    var ticket: ((PoolID) -> V2ResumeTicket)?

    /// Makes a reader.
    init(
        length: Int,
        parse: @escaping (ByteBuffer) -> PoolID?,
        reply: ((PoolID) -> [UInt8])? = nil,
        ticket: ((PoolID) -> V2ResumeTicket)? = nil
    ) {
        self.length = length
        self.parse = parse
        self.reply = reply
        self.ticket = ticket
    }

    /// v1: 8 lowercase hex characters.
    static var v1: PoolIDReader {
        PoolIDReader(length: PoolID.wireLength) { try? PoolID(parsing: $0.readableBytesView) }
    }
}

/// The client side of a pool connection before its launch: reads the ID (8 hex characters in v1), then holds
/// what the server relays early (user bytes may come before the `launch://` line) until the connection is
/// handed off.
///
/// The channel must have `autoRead` off; the handler reads while it holds less than `maximumEarlyBytes`.
final class ClientPoolConnectionHandler: ChannelInboundHandler, PoolConnectionHolder {
    typealias InboundIn = ByteBuffer

    /// The most bytes held before the launch; reading pauses above it.
    static let maximumEarlyBytes = EarlyBytes.maximum

    private enum State {
        case awaitingID(ByteBuffer)
        case idle(PoolID)
        case claimed(PoolID)
        case handedOff
    }

    private var state: State = .awaitingID(ByteBuffer())
    private var early = EarlyBytes()
    private var timeout: Scheduled<Void>?
    private var context: ChannelHandlerContext?
    /// The relay behind this handler, connected at the hand-off.
    private let glue: GlueHandler
    private let idReadTimeout: TimeAmount
    private let claimTimeout: TimeAmount
    private let delegate: any ClientPoolConnectionDelegate
    private let idReader: PoolIDReader

    /// Makes the handler; `claimTimeout` bounds the wait for a launch once the server used the connection.
    init(
        delegate: any ClientPoolConnectionDelegate,
        glue: GlueHandler,
        idReader: PoolIDReader = .v1,
        idReadTimeout: TimeAmount,
        claimTimeout: TimeAmount
    ) {
        self.delegate = delegate
        self.glue = glue
        self.idReader = idReader
        self.idReadTimeout = idReadTimeout
        self.claimTimeout = claimTimeout
    }

    private var id: PoolID? {
        switch self.state {
        case .idle(let id), .claimed(let id): id
        case .awaitingID, .handedOff: nil
        }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        self.timeout = context.eventLoop.scheduleTask(in: self.idReadTimeout) {
            channel.close(promise: nil)
        }
        context.read()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = self.unwrapInboundIn(data)
        switch self.state {
        case .awaitingID(var pending):
            pending.writeBuffer(&buffer)
            guard pending.readableBytes >= self.idReader.length else {
                self.state = .awaitingID(pending)
                return
            }
            let idBytes = pending.readSlice(length: self.idReader.length) ?? ByteBuffer()
            guard let id = self.idReader.parse(idBytes) else {
                self.state = .awaitingID(ByteBuffer())
                context.close(promise: nil)
                return
            }
            self.timeout?.cancel()
            self.timeout = nil
            self.state = .idle(id)
            if let reply = self.idReader.reply?(id) {
                var buffer = context.channel.allocator.buffer(capacity: reply.count)
                buffer.writeBytes(reply)
                context.writeAndFlush(NIOAny(buffer), promise: nil)
            }
            self.delegate.poolConnectionEstablished(
                PoolConnection(
                    channel: context.channel,
                    id: id,
                    owner: 0,
                    holder: self,
                    resume: self.idReader.ticket?(id)
                )
            )
            if pending.readableBytes > 0 {
                self.early.hold(&pending)
                self.claim(context: context, id: id)
            }
        case .idle(let id):
            self.early.hold(&buffer)
            self.claim(context: context, id: id)
        case .claimed:
            self.early.hold(&buffer)
        case .handedOff:
            context.fireChannelRead(data)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        switch self.state {
        case .awaitingID, .idle, .claimed:
            if self.early.wantsMoreReads {
                context.read()
            }
        case .handedOff:
            context.fireChannelReadComplete()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard case ChannelEvent.inputClosed = event else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        switch self.state {
        case .awaitingID:
            context.close(promise: nil)
        case .idle:
            // The server closed an idle connection (full pool, restart): it is lost, not used.
            context.close(promise: nil)
        case .claimed:
            self.early.endOfInput()
        case .handedOff:
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timeout?.cancel()
        self.timeout = nil
        switch self.state {
        case .handedOff:
            break
        case .awaitingID:
            self.state = .handedOff
            self.delegate.poolConnectionClosed(context.channel, id: nil)
        case .idle(let id), .claimed(let id):
            self.state = .handedOff
            self.delegate.poolConnectionClosed(context.channel, id: id)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func claim(context: ChannelHandlerContext, id: PoolID) {
        guard case .idle = self.state else { return }
        self.state = .claimed(id)
        self.delegate.poolConnectionClaimed(id: id)
        let channel = context.channel
        self.timeout = context.eventLoop.scheduleTask(in: self.claimTimeout) {
            channel.close(promise: nil)
        }
    }

    /// Ends the waiting phase: connects the `GlueHandler` behind this handler to `partner` and passes on the
    /// bytes and the end of input received so far; from now on every event passes through.
    /// Must run on the channel's event loop. Returns false when the connection is no longer usable.
    func handOff(to consumer: PoolConnectionConsumer) -> Bool {
        guard self.id != nil, let context = self.context else { return false }
        self.timeout?.cancel()
        self.timeout = nil
        self.state = .handedOff
        return self.early.handOff(context: context, to: consumer, glue: self.glue)
    }
}

@available(*, unavailable)
extension ClientPoolConnectionHandler: Sendable {}
