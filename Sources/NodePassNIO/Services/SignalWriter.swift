import NIOCore
import NodePassCore

/// Writes signals (launches) to one control channel from any thread, coalescing those that come while a
/// write is on its way: a burst of users costs the control channel a few TLS records and system calls,
/// not one of each per user. Order is kept.
final class SignalWriter: Sendable {
    let channel: any Channel
    /// Whether launches go out as v2 frames (else as v1 `launch://` lines).
    private let isV2: Bool
    /// Signals not yet handed to the channel; non-nil while a write task is scheduled.
    private let pending = Locked<ByteBuffer?>(nil)

    init(channel: any Channel, isV2: Bool = false) {
        self.channel = channel
        self.isV2 = isV2
    }

    /// Sends the launch of the pool connection `id`, in the channel's protocol (`.datagrams`: v2 only).
    func sendLaunch(_ id: PoolID, _ launch: PoolLaunch = .stream) {
        switch (self.isV2, launch) {
        case (true, .stream): self.send { V2Message.launch(id).write(to: &$0) }
        case (true, .datagrams): self.send { V2Message.launchDatagrams(id).write(to: &$0) }
        case (false, _): self.send { Signal.launch(id).write(to: &$0) }
        }
    }

    /// Appends a signal that `encode` writes; it goes out with the others pending.
    func send(_ encode: (inout ByteBuffer) -> Void) {
        let schedule = self.pending.withLock { pending -> Bool in
            guard var buffer = pending else {
                var buffer = self.channel.allocator.buffer(capacity: 64)
                encode(&buffer)
                pending = buffer
                return true
            }
            // Taken out while it grows, so that the write does not copy it.
            pending = nil
            encode(&buffer)
            pending = buffer
            return false
        }
        guard schedule else { return }
        self.channel.eventLoop.execute {
            guard
                let buffer = self.pending.withLock({ pending in
                    defer { pending = nil }
                    return pending
                })
            else { return }
            self.channel.writeAndFlush(buffer, promise: nil)
        }
    }
}
