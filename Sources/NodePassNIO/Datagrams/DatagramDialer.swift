import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NodePassCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The flows of every datagram carrier of one process on the side that dials, bounded by UDP_MAX_FLOWS
/// together (each flow holds a socket): a peer that launches many carriers gets no more sockets.
final class DatagramFlowBudget: Sendable {
    private let used = Atomic<Int>(0)
    let maximum: Int

    init(maximum: Int) {
        self.maximum = maximum
    }

    /// Takes one flow; false when the bound is reached.
    func take() -> Bool {
        var current = self.used.load(ordering: .relaxed)
        while current < self.maximum {
            let (exchanged, original) = self.used.compareExchange(
                expected: current,
                desired: current + 1,
                ordering: .relaxed
            )
            if exchanged { return true }
            current = original
        }
        return false
    }

    /// Gives back `count` flows.
    func give(_ count: Int) {
        guard count > 0 else { return }
        self.used.subtract(count, ordering: .relaxed)
    }
}

/// The side that dials, for one datagram carrier (`nodepass/2.1`): each flow gets a UDP socket of its own
/// towards TARGET, opened on the first datagram of the flow; what the service sends back on it returns over
/// the carrier as datagrams of that flow. The bookkeeping is a `DialedFlowsStateMachine`; everything runs on
/// the carrier's event loop.
final class DatagramDialer: CarrierDelegate {
    private var flows: DialedFlowsStateMachine<any Channel>
    private let target: SocketAddress
    private let loop: any EventLoop
    private let budget: DatagramFlowBudget
    private let metrics: DatagramMetrics
    private let logger: Logger
    private var carrier: CarrierHandler?
    private var sweep: Scheduled<Void>?
    private let warnings = LimitLogClock()
    /// Sockets written since the last flush.
    private var unflushed: [any Channel] = []
    /// Whether the carrier's flush is due at the end of this event-loop tick.
    private var carrierFlushDue = false

    /// Makes the dialer of one carrier on `loop`; `target` is TARGET's address.
    init(target: SocketAddress, loop: any EventLoop, budget: DatagramFlowBudget, pipelines: Pipelines) {
        self.flows = DialedFlowsStateMachine(
            maximumFlows: pipelines.configuration.udpMaxFlows,
            idleTimeout: pipelines.configuration.udpIdleTimeout
        )
        self.target = target
        self.loop = loop
        self.budget = budget
        self.metrics = pipelines.metrics.datagrams
        self.logger = pipelines.logger
    }

    /// The carrier's handler, on the carrier's event loop; the caller hands the pool connection to it, then
    /// calls `started()`, or `carrierClosed(_:)` when the hand-off failed.
    func makeCarrier(id: UInt64) -> CarrierHandler {
        let handler = CarrierHandler(id: id, delegate: self, logger: self.logger)
        self.carrier = handler
        return handler
    }

    /// The carrier is in place: flows idle too long are looked for from now on.
    func started() {
        self.scheduleSweep()
    }

    private func scheduleSweep() {
        let period = DatagramUsers.sweepPeriod(idleTimeout: self.flows.idleTimeout)
        self.sweep = self.loop.assumeIsolated().scheduleTask(in: period) { [weak self] in
            guard let self, self.carrier != nil else { return }
            self.expire()
            self.scheduleSweep()
        }
    }

    /// `count` flows were forgotten.
    private func flowsEnded(_ count: Int) {
        guard count > 0 else { return }
        self.metrics.flows.decrement(by: Double(count))
        self.budget.give(count)
    }

    // MARK: CarrierDelegate

    func carrier(_ id: UInt64, received frame: DatagramFrame) {
        switch frame {
        case .datagram(let flow, let payload):
            switch self.flows.datagramArrived(flow: flow, payload: payload, now: .now()) {
            case .send(let socket):
                self.send(payload, on: socket)
            case .open:
                guard self.budget.take() else {
                    _ = self.flows.socketFailed(flow: flow)
                    self.metrics.dropped(.flowLimit)
                    self.warn("UDP_MAX_FLOWS reached; datagrams of new flows are dropped")
                    self.carrier?.writeEnd(flow: flow)
                    return
                }
                self.metrics.flows.increment()
                self.open(flow: flow)
            case .held:
                break
            case .drop(let reason):
                self.metrics.dropped(reason)
            }
        case .end(let flow):
            let ended = self.flows.flowEnded(flow: flow)
            if ended.live { self.flowsEnded(1) }
            ended.socket?.close(promise: nil)
        }
    }

    func carrierReadComplete(_ id: UInt64) {
        for socket in self.unflushed { socket.flush() }
        self.unflushed.removeAll(keepingCapacity: true)
    }

    func carrierClosed(_ id: UInt64) {
        self.sweep?.cancel()
        self.sweep = nil
        let closed = self.flows.closeAll()
        self.flowsEnded(closed.flows)
        for socket in closed.sockets { socket.close(promise: nil) }
        self.carrier = nil
    }

    // MARK: flows

    private func send(_ payload: ByteBuffer, on socket: any Channel) {
        guard socket.canTakeDatagram() else {
            self.metrics.dropped(.congested)
            return
        }
        socket.write(payload, promise: nil)
        self.unflushed.append(socket)
        self.metrics.datagramsUpstream.increment()
        self.metrics.bytesUpstream.increment(by: payload.readableBytes)
    }

    private func open(flow: UInt32) {
        let dialer = NIOLoopBound(self, eventLoop: self.loop)
        DatagramBootstrap(group: self.loop)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: DatagramUsers.readSize))
            .channelOption(.maxMessagesPerRead, value: DatagramUsers.flowReadsPerEvent)
            .channelOption(.socketOption(.so_rcvbuf), value: SocketOptionValue(DatagramUsers.flowBuffer))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(FlowSocketHandler(dialer: dialer.value, flow: flow))
                }
            }
            .connect(to: self.target)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let socket):
                    guard let held = self.flows.socketOpened(flow: flow, socket: socket) else {
                        socket.close(promise: nil)
                        return
                    }
                    self.logger.debug("UDP flow started", metadata: ["np.flow": "\(flow)"])
                    for payload in held { self.send(payload, on: socket) }
                    socket.flush()
                case .failure(let error):
                    guard let held = self.flows.socketFailed(flow: flow) else { return }
                    self.flowsEnded(1)
                    self.metrics.dropped(.target, count: held)
                    self.warn("cannot open a UDP socket to the target", error: error)
                    self.carrier?.writeEnd(flow: flow)
                    self.carrier?.flush()
                }
            }
    }

    /// At most one warning a second: a flood of new flows must not flood the log.
    private func warn(_ message: Logger.Message, error: (any Error)? = nil) {
        guard self.warnings.isDue() else { return }
        var metadata: Logger.Metadata = ["np.target": "\(self.target)", "np.flows": "\(self.flows.flowCount)"]
        if let error { metadata["np.error"] = "\(UserFacingError.describe(error))" }
        self.logger.warning(message, metadata: metadata)
    }

    /// The service sent `payload` back on the socket of `flow`.
    fileprivate func reply(_ payload: ByteBuffer, flow: UInt32) {
        guard self.flows.replyArrived(flow: flow, now: .now()) else {
            self.metrics.dropped(.unknownFlow)
            return
        }
        guard let carrier = self.carrier, carrier.write(flow: flow, payload: payload) else {
            self.metrics.dropped(.congested)
            return
        }
        self.metrics.datagramsDownstream.increment()
        self.metrics.bytesDownstream.increment(by: payload.readableBytes)
    }

    /// A flow socket's read ended. The carrier is flushed once all the sockets that the event loop found
    /// readable together were read: one write on the carrier for their replies, not one per socket.
    fileprivate func repliesRead() {
        guard !self.carrierFlushDue else { return }
        self.carrierFlushDue = true
        self.loop.assumeIsolated().execute {
            self.carrierFlushDue = false
            self.carrier?.flush()
        }
    }

    private func expire() {
        let expired = self.flows.expire(now: .now())
        guard !expired.isEmpty else { return }
        self.flowsEnded(expired.count)
        for (flow, socket) in expired {
            socket?.close(promise: nil)
            self.carrier?.writeEnd(flow: flow)
            self.logger.debug("UDP flow ended (idle)", metadata: ["np.flow": "\(flow)"])
        }
        self.carrier?.flush()
    }
}

/// The handler of one flow's UDP socket on the side that dials: passes what the service sends back to the
/// flow's `DatagramDialer`.
private final class FlowSocketHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    private let dialer: DatagramDialer
    private let flow: UInt32
    private var firstRead = true

    init(dialer: DatagramDialer, flow: UInt32) {
        self.dialer = dialer
        self.flow = flow
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let payload = self.unwrapInboundIn(data).data
        self.dialer.reply(payload, flow: self.flow)
        if self.firstRead {
            // SwiftNIO keeps each socket's read buffer (64 KiB here, for the largest datagram) from its first
            // read on, and that read copies the whole buffer, so all its pages are in memory: 64 KiB per flow
            // for replies that are mostly a few hundred bytes. The pages past the reply go back to the kernel
            // once; later reads bring back only the pages they fill.
            self.firstRead = false
            payload.releasePagesPastWriterIndex()
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.dialer.repliesRead()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A connected UDP socket reports the ICMP errors of earlier datagrams (the service is not
        // listening): the datagrams are lost as they would be without the tunnel; the socket stays.
    }
}

extension ByteBuffer {
    /// Gives the kernel back the whole memory pages of this buffer's storage that lie past its written bytes
    /// (Linux `madvise(MADV_DONTNEED)`): they read as zeros afterwards and take memory again only when written.
    /// Only for bytes that nobody reads before writing them, such as the unfilled part of a read buffer.
    func releasePagesPastWriterIndex() {
        #if os(Linux)
        self.withVeryUnsafeBytes { storage in
            let page = Self.pageSize
            guard let base = storage.baseAddress, page > 0 else { return }
            let start = (Int(bitPattern: base) + self.writerIndex + page - 1) / page * page
            let end = (Int(bitPattern: base) + storage.count) / page * page
            guard end > start, let first = UnsafeMutableRawPointer(bitPattern: start) else { return }
            _ = madvise(first, end - start, MADV_DONTNEED)
        }
        #endif
    }

    #if os(Linux)
    private static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    #endif
}
