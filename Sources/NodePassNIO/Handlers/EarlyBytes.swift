import NIOCore

/// What a pool connection receives before it is handed off to its relay (the side with the users starts
/// relaying before the other side has read the launch), held up to a bound and passed on in order.
struct EarlyBytes {
    /// Reading pauses once this many bytes are held (one more read may bring more: the relay's read size).
    /// The launch normally comes within a round trip; a peer that never sends it holds at most this much
    /// per connection, for the claim timeout (and on the client, on at most MAX_POOL_CAPACITY connections:
    /// `DialQueueStateMachine.maximumClaimed`).
    static let maximum = 64 * 1024

    private var buffer = ByteBuffer()
    private(set) var inputEnded = false

    /// Whether another read may be issued.
    var wantsMoreReads: Bool { !self.inputEnded && self.buffer.readableBytes < Self.maximum }

    mutating func hold(_ data: inout ByteBuffer) {
        self.buffer.writeBuffer(&data)
    }

    mutating func endOfInput() {
        self.inputEnded = true
    }

    /// Passes on what was held to `consumer`: to `glue` (the `GlueHandler` after `context`), then connects
    /// it to the partner; or to the carrier's handler, first put right after `context`. Returns false when
    /// the channel is closed.
    mutating func handOff(
        context: ChannelHandlerContext,
        to consumer: PoolConnectionConsumer,
        glue: GlueHandler
    ) -> Bool {
        guard context.channel.isActive else { return false }
        if case .carrier(let handler) = consumer {
            do {
                try context.pipeline.syncOperations.addHandler(handler, position: .after(context.handler))
            } catch {
                return false
            }
        }
        // The held bytes and end of input reach the glue before its partner is known: it passes them on
        // first when it connects, before any move to the splice engine can start.
        if self.buffer.readableBytes > 0 {
            let held = self.buffer
            self.buffer = ByteBuffer()
            context.fireChannelRead(NIOAny(held))
            context.fireChannelReadComplete()
        }
        if self.inputEnded {
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        }
        switch consumer {
        case .relay(let partner): return glue.connect(to: partner)
        case .carrier: return true
        }
    }
}
