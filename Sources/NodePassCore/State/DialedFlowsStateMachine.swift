import NIOCore

/// The side that dials, for one datagram carrier (`nodepass/2.1`): the socket towards TARGET of each flow,
/// the datagrams that wait while a socket opens, flows idle too long, and the bound on flows.
///
/// Pure: time comes in as `NIODeadline` values; a socket is whatever the caller sends datagrams with.
public struct DialedFlowsStateMachine<Socket> {
    /// What to do with a datagram that came on the carrier.
    public enum Arrival {
        /// Send it on this socket.
        case send(Socket)
        /// A new flow: open its socket (`socketOpened` or `socketFailed` follows); the datagram is held.
        case open
        /// The flow's socket is opening: the datagram is held.
        case held
        /// Drop it.
        case drop(DatagramDrop)
    }

    private enum FlowSocket {
        case opening(held: [ByteBuffer])
        case open(Socket)
    }

    private struct Flow {
        var socket: FlowSocket
        var lastActive: NIODeadline
    }

    private var flows: [UInt32: Flow] = [:]
    /// The most flows at once.
    public let maximumFlows: Int
    /// A flow that carried nothing for this long is forgotten.
    public let idleTimeout: TimeAmount
    /// The most datagrams held per flow while its socket opens.
    public static var maximumHeld: Int { 16 }

    /// Makes an empty table of at most `maximumFlows` flows.
    public init(maximumFlows: Int, idleTimeout: TimeAmount) {
        self.maximumFlows = maximumFlows
        self.idleTimeout = idleTimeout
    }

    /// The number of live flows.
    public var flowCount: Int { self.flows.count }

    /// A datagram of `flow` came on the carrier at `now`.
    public mutating func datagramArrived(flow number: UInt32, payload: ByteBuffer, now: NIODeadline) -> Arrival {
        guard var flow = self.flows[number] else {
            guard self.flows.count < self.maximumFlows else { return .drop(.flowLimit) }
            self.flows[number] = Flow(socket: .opening(held: [payload]), lastActive: now)
            return .open
        }
        flow.lastActive = now
        switch flow.socket {
        case .open(let socket):
            self.flows[number] = flow
            return .send(socket)
        case .opening(var held):
            guard held.count < Self.maximumHeld else {
                self.flows[number] = flow
                return .drop(.opening)
            }
            held.append(payload)
            flow.socket = .opening(held: held)
            self.flows[number] = flow
            return .held
        }
    }

    /// The socket of `flow` opened: returns the datagrams to send on it now, or nil when the flow was
    /// forgotten meanwhile (close the socket).
    public mutating func socketOpened(flow number: UInt32, socket: Socket) -> [ByteBuffer]? {
        guard var flow = self.flows[number], case .opening(let held) = flow.socket else { return nil }
        flow.socket = .open(socket)
        self.flows[number] = flow
        return held
    }

    /// The socket of `flow` could not be opened: the flow is forgotten. Returns how many datagrams it held
    /// (dropped), to send `end` when it was live.
    public mutating func socketFailed(flow number: UInt32) -> Int? {
        guard let flow = self.flows.removeValue(forKey: number), case .opening(let held) = flow.socket else {
            return nil
        }
        return held.count
    }

    /// The service answered on the socket of `flow` at `now`; false when the flow is forgotten (drop it).
    public mutating func replyArrived(flow number: UInt32, now: NIODeadline) -> Bool {
        guard self.flows[number] != nil else { return false }
        self.flows[number]?.lastActive = now
        return true
    }

    /// The other side forgot `flow`: whether it was live here, and its socket to close if it had one open.
    public mutating func flowEnded(flow number: UInt32) -> (live: Bool, socket: Socket?) {
        guard let flow = self.flows.removeValue(forKey: number) else { return (false, nil) }
        guard case .open(let socket) = flow.socket else { return (true, nil) }
        return (true, socket)
    }

    /// Forgets the flows idle at `now` for `idleTimeout` or longer; returns them with their sockets (to
    /// close) to send `end` for each.
    public mutating func expire(now: NIODeadline) -> [(flow: UInt32, socket: Socket?)] {
        var expired: [(flow: UInt32, socket: Socket?)] = []
        for (number, flow) in self.flows where now - flow.lastActive >= self.idleTimeout {
            self.flows[number] = nil
            if case .open(let socket) = flow.socket {
                expired.append((number, socket))
            } else {
                expired.append((number, nil))
            }
        }
        return expired
    }

    /// The carrier closed: every flow is forgotten; returns how many there were and the sockets to close.
    public mutating func closeAll() -> (flows: Int, sockets: [Socket]) {
        defer { self.flows = [:] }
        let sockets = self.flows.values.compactMap { flow -> Socket? in
            if case .open(let socket) = flow.socket { return socket }
            return nil
        }
        return (self.flows.count, sockets)
    }
}
