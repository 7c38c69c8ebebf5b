import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import NodePassCore

/// The side with the users of UDP (`nodepass/2.1`): the UDP listener on TARGET, the route of each user's
/// datagrams (a `DatagramRoutesStateMachine`), and the datagram carriers, one per client session, each
/// launched over an idle pool connection when a datagram needs it.
///
/// Everything runs on one event loop, the listener's, which is also the loop of every pool connection on
/// this side (the server's data loop in reverse mode, the client's forward loop).
final class DatagramUsers: CarrierDelegate {
    /// The most a datagram read takes: more than the largest UDP payload, so none is cut.
    static let readSize = 65_536
    /// Datagrams read per system call on the listener (recvmmsg); each gets `readSize` of the read buffer.
    static let vectorReads = 8
    /// Reads of the listener each time the event loop finds it readable: one (of up to `vectorReads`
    /// datagrams), since the loop finds it again if more is waiting, while a second read would mostly find
    /// nothing (a wasted system call).
    static let listenerReadsPerEvent: UInt = 1
    /// Reads of a flow's socket each time the event loop finds it readable (one datagram each, until one
    /// finds nothing): a service's burst to one flow drains in a few turns of the loop instead of one turn
    /// per datagram, which overflowed the socket's buffer in a debug build.
    static let flowReadsPerEvent: UInt = 16
    /// The kernel buffers of the listener and of each flow's socket: a burst waits there while the tunnel
    /// catches up, instead of being dropped (the kernel caps them at net.core.rmem_max and wmem_max).
    static let listenerBuffer = 4 * 1024 * 1024
    static let flowBuffer = 1024 * 1024

    /// How often flows idle for `idleTimeout` are looked for.
    static func sweepPeriod(idleTimeout: TimeAmount) -> TimeAmount {
        max(.milliseconds(10), min(.seconds(1), .nanoseconds(idleTimeout.nanoseconds / 4)))
    }

    private var routes: DatagramRoutesStateMachine<SocketAddress>
    private var carriers: [UInt64: (handler: CarrierHandler, owner: UInt64)] = [:]
    private var nextCarrier: UInt64 = 0
    private var listener: (any Channel)?
    private var listenerUnflushed = false
    private var carriersUnflushed = false
    private var sweep: Scheduled<Void>?
    private let flowLimitWarnings = LimitLogClock()
    private let noCarrierWarnings = LimitLogClock()
    private let loop: any EventLoop
    private let launcher: Launcher
    private let metrics: DatagramMetrics
    private let logger: Logger

    private init(loop: any EventLoop, launcher: Launcher, configuration: Configuration, pipelines: Pipelines) {
        self.routes = DatagramRoutesStateMachine(
            maximumFlows: configuration.udpMaxFlows,
            idleTimeout: configuration.udpIdleTimeout
        )
        self.loop = loop
        self.launcher = launcher
        self.metrics = pipelines.metrics.datagrams
        self.logger = pipelines.logger
    }

    /// Listens for users' datagrams on `host:port` on `loop`, launching carriers from `launcher`'s idle pool
    /// connections. The listener's close closes the carriers.
    static func bind(
        host: String,
        port: Int,
        on loop: any EventLoop,
        launcher: Launcher,
        pipelines: Pipelines
    ) async throws(NodePassError) -> any Channel {
        let made = try? await loop.submit {
            NIOLoopBound(
                DatagramUsers(
                    loop: loop,
                    launcher: launcher,
                    configuration: pipelines.configuration,
                    pipelines: pipelines
                ),
                eventLoop: loop
            )
        }.get()
        guard let users = made else {
            throw NodePassError(.bindFailed, "cannot listen for UDP: the event loop is shutting down")
        }
        let bootstrap = DatagramBootstrap(group: loop)
            .channelOption(
                .recvAllocator,
                value: FixedSizeRecvByteBufferAllocator(capacity: Self.readSize * Self.vectorReads)
            )
            .channelOption(.datagramVectorReadMessageCount, value: Self.vectorReads)
            .channelOption(.maxMessagesPerRead, value: Self.listenerReadsPerEvent)
            .channelOption(.socketOption(.so_rcvbuf), value: SocketOptionValue(Self.listenerBuffer))
            .channelOption(.socketOption(.so_sndbuf), value: SocketOptionValue(Self.listenerBuffer))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(UsersListenerHandler(users: users.value))
                }
            }
        var bound: (any Channel)?
        var lastError: (any Error)?
        // No host: every address, IPv6 and IPv4 (or IPv4 only where IPv6 is off).
        for candidate in host.isEmpty ? ["::", "0.0.0.0"] : [host] where bound == nil {
            do {
                bound = try await bootstrap.bind(host: candidate, port: port).get()
            } catch {
                lastError = error
            }
        }
        guard let channel = bound else {
            throw NodePassError(
                .bindFailed,
                "cannot listen for UDP on \(HostPort(host: host, port: port)) (noudp=1 turns UDP off)",
                underlying: lastError
            )
        }
        do {
            try await loop.submit {
                users.value.listener = channel
                users.value.scheduleSweep()
                launcher.ownerLostHook = { owner in
                    loop.execute { users.value.ownerLost(owner) }
                }
            }.get()
        } catch {
            try? await channel.close()
            throw NodePassError(.bindFailed, "cannot listen for UDP: the event loop is shutting down")
        }
        return channel
    }

    // MARK: users' datagrams

    fileprivate func datagramFromUser(_ envelope: AddressedEnvelope<ByteBuffer>) {
        let now = NIODeadline.now()
        var route = self.routes.datagramFromUser(envelope.remoteAddress, now: now)
        if case .needsCarrier = route, self.openCarrier() {
            route = self.routes.datagramFromUser(envelope.remoteAddress, now: now)
        }
        switch route {
        case .send(let id, let flow, let isNew):
            if isNew {
                self.metrics.flows.increment()
                self.logger.debug(
                    "UDP flow started",
                    metadata: ["np.peer": "\(envelope.remoteAddress)", "np.flow": "\(flow)"]
                )
                // With several clients, each gets a carrier as soon as it can, so that new flows spread.
                _ = self.openCarrier()
            }
            guard let carrier = self.carriers[id]?.handler, carrier.write(flow: flow, payload: envelope.data) else {
                self.dropped(.congested)
                return
            }
            self.carriersUnflushed = true
            self.metrics.datagramsUpstream.increment()
            self.metrics.bytesUpstream.increment(by: envelope.data.readableBytes)
        case .needsCarrier:
            self.dropped(.noCarrier)
        case .drop(let reason):
            self.dropped(reason)
        }
    }

    fileprivate func usersRead() {
        guard self.carriersUnflushed else { return }
        self.carriersUnflushed = false
        for carrier in self.carriers.values { carrier.handler.flush() }
    }

    fileprivate func listenerClosed() {
        self.listener = nil
        self.sweep?.cancel()
        self.sweep = nil
        for carrier in self.carriers.values { carrier.handler.close() }
    }

    private func dropped(_ reason: DatagramDrop) {
        self.metrics.dropped(reason)
        let message: Logger.Message
        switch reason {
        case .flowLimit:
            guard self.flowLimitWarnings.isDue() else { return }
            message = "UDP_MAX_FLOWS reached; datagrams of new flows are dropped"
        case .noCarrier:
            guard self.noCarrierWarnings.isDue() else { return }
            message = "no client carries UDP now (none connected, or no idle pool connection); datagram dropped"
        case .congested, .unknownFlow, .opening, .target: return
        }
        self.logger.warning(message, metadata: ["np.flows": "\(self.routes.flowCount)"])
    }

    // MARK: carriers

    /// Launches a carrier over an idle pool connection of a client that carries UDP and has no carrier yet;
    /// false when there is none.
    private func openCarrier() -> Bool {
        // Asked before the launcher's lock is taken: a role never waits for its pool's lock under its own.
        let candidates = (self.launcher.owners?.datagramOwners ?? []).subtracting(self.carriers.values.map(\.owner))
        guard !candidates.isEmpty else { return false }
        let taken = self.launcher.takeForCarrier { candidates.contains($0) }
        guard let (connection, signals) = taken else { return false }
        // Every pool connection of this side is on this loop.
        guard connection.channel.eventLoop === self.loop else {
            connection.channel.close(promise: nil)
            return false
        }
        self.nextCarrier += 1
        let id = self.nextCarrier
        let handler = CarrierHandler(id: id, delegate: self, logger: self.logger)
        guard connection.handOff(toCarrier: handler) else {
            connection.channel.close(promise: nil)
            return false
        }
        signals.sendLaunch(connection.id, .datagrams)
        self.carriers[id] = (handler, connection.owner)
        self.routes.carrierOpened(id)
        self.logger.debug("datagram carrier launched", metadata: ["np.pool.id": "\(connection.id)"])
        return true
    }

    private func ownerLost(_ owner: UInt64?) {
        for carrier in self.carriers.values where owner == nil || carrier.owner == owner {
            carrier.handler.close()
        }
    }

    func carrier(_ id: UInt64, received frame: DatagramFrame) {
        switch frame {
        case .datagram(let flow, let payload):
            guard let address = self.routes.datagramFromService(carrier: id, flow: flow, now: .now()) else {
                self.metrics.dropped(.unknownFlow)
                return
            }
            guard let listener = self.listener else { return }
            guard listener.canTakeDatagram() else {
                self.metrics.dropped(.congested)
                return
            }
            listener.write(AddressedEnvelope(remoteAddress: address, data: payload), promise: nil)
            self.listenerUnflushed = true
            self.metrics.datagramsDownstream.increment()
            self.metrics.bytesDownstream.increment(by: payload.readableBytes)
        case .end(let flow):
            if self.routes.flowEnded(carrier: id, flow: flow) {
                self.metrics.flows.decrement()
            }
        }
    }

    func carrierReadComplete(_ id: UInt64) {
        guard self.listenerUnflushed else { return }
        self.listenerUnflushed = false
        self.listener?.flush()
    }

    func carrierClosed(_ id: UInt64) {
        guard self.carriers.removeValue(forKey: id) != nil else { return }
        let forgotten = self.routes.carrierClosed(id)
        self.metrics.flows.decrement(by: Double(forgotten))
        self.logger.debug("datagram carrier closed", metadata: ["np.flows": "\(forgotten)"])
    }

    // MARK: idle flows

    private func scheduleSweep() {
        let period = Self.sweepPeriod(idleTimeout: self.routes.idleTimeout)
        self.sweep = self.loop.assumeIsolated().scheduleTask(in: period) { [weak self] in
            guard let self, self.listener != nil else { return }
            self.expire()
            self.scheduleSweep()
        }
    }

    private func expire() {
        let expired = self.routes.expire(now: .now())
        guard !expired.isEmpty else { return }
        self.metrics.flows.decrement(by: Double(expired.count))
        for (carrier, flow) in expired {
            self.carriers[carrier]?.handler.writeEnd(flow: flow)
        }
        for carrier in self.carriers.values { carrier.handler.flush() }
        self.logger.debug("UDP flows ended (idle)", metadata: ["np.flows": "\(expired.count)"])
    }
}

/// The handler of the UDP listener on TARGET: passes each user's datagram to `DatagramUsers`.
private final class UsersListenerHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    private let users: DatagramUsers

    init(users: DatagramUsers) {
        self.users = users
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.users.datagramFromUser(self.unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.users.usersRead()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.users.listenerClosed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // An ICMP error about an earlier reply (the user went away): that datagram is lost, the listener stays.
    }
}
