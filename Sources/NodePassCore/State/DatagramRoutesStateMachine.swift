import NIOCore

/// Why a datagram was dropped (the label of the drop counter).
public enum DatagramDrop: String, Hashable, Sendable, CaseIterable {
    /// A new flow came while UDP_MAX_FLOWS flows were live.
    case flowLimit = "flow_limit"
    /// No datagram carrier could be had (no idle pool connection of a client that carries UDP).
    case noCarrier = "no_carrier"
    /// The carrier's or the socket's write buffer was full: UDP has no back-pressure.
    case congested
    /// A reply for a flow that this side has forgotten.
    case unknownFlow = "unknown_flow"
    /// More datagrams than are held came while the flow's socket was opening.
    case opening
    /// The flow's socket to TARGET could not be opened.
    case target
}

/// The side with the users of UDP (`nodepass/2.1`): the flow of each user's address, the carrier each
/// flow travels on, flows idle too long, and the bound on flows.
///
/// A flow is a user's source address. Its first datagram gets the next flow number of the carrier with
/// the fewest flows, and the flow stays on that carrier until it is forgotten (idle, ended by the other
/// side, or its carrier closed). Pure: time comes in as `NIODeadline` values, carriers are named by the
/// caller.
public struct DatagramRoutesStateMachine<Address: Hashable> {
    /// Where a user's datagram goes.
    public enum Route: Hashable {
        /// Send it as a `datagram` frame of `flow` on `carrier` (`isNew`: the flow's first datagram).
        case send(carrier: UInt64, flow: UInt32, isNew: Bool)
        /// There is no carrier: open one (`carrierOpened`) and ask again, or drop the datagram.
        case needsCarrier
        /// Drop it.
        case drop(DatagramDrop)
    }

    private struct Flow {
        var carrier: UInt64
        var number: UInt32
        var lastActive: NIODeadline
    }

    private struct Carrier {
        var nextFlow: UInt32 = 1
        var users: [UInt32: Address] = [:]
    }

    private var flows: [Address: Flow] = [:]
    private var carriers: [UInt64: Carrier] = [:]
    /// The most flows at once.
    public let maximumFlows: Int
    /// A flow that carried nothing for this long is forgotten.
    public let idleTimeout: TimeAmount

    /// Makes an empty table of at most `maximumFlows` flows.
    public init(maximumFlows: Int, idleTimeout: TimeAmount) {
        self.maximumFlows = maximumFlows
        self.idleTimeout = idleTimeout
    }

    /// The number of live flows.
    public var flowCount: Int { self.flows.count }
    /// The number of open carriers.
    public var carrierCount: Int { self.carriers.count }

    /// The number of flows on `carrier`.
    public func flowCount(carrier: UInt64) -> Int {
        self.carriers[carrier]?.users.count ?? 0
    }

    /// A datagram came from the user at `address` at `now`.
    public mutating func datagramFromUser(_ address: Address, now: NIODeadline) -> Route {
        if var flow = self.flows[address] {
            flow.lastActive = now
            self.flows[address] = flow
            return .send(carrier: flow.carrier, flow: flow.number, isNew: false)
        }
        guard self.flows.count < self.maximumFlows else { return .drop(.flowLimit) }
        // The carrier with the fewest flows; ties go to the lowest identifier, so the choice is stable.
        guard
            let id = self.carriers.min(by: { ($0.value.users.count, $0.key) < ($1.value.users.count, $1.key) })?.key,
            var carrier = self.carriers[id]
        else { return .needsCarrier }
        // After 2^32 - 1 flows the numbers start over: skip those still in use.
        var number = carrier.nextFlow
        while carrier.users[number] != nil || number == 0 { number &+= 1 }
        carrier.nextFlow = number &+ 1
        carrier.users[number] = address
        self.carriers[id] = carrier
        self.flows[address] = Flow(carrier: id, number: number, lastActive: now)
        return .send(carrier: id, flow: number, isNew: true)
    }

    /// A carrier is open and takes new flows.
    public mutating func carrierOpened(_ id: UInt64) {
        if self.carriers[id] == nil { self.carriers[id] = Carrier() }
    }

    /// A carrier closed: its flows are forgotten. Returns how many.
    @discardableResult
    public mutating func carrierClosed(_ id: UInt64) -> Int {
        guard let carrier = self.carriers.removeValue(forKey: id) else { return 0 }
        for address in carrier.users.values { self.flows[address] = nil }
        return carrier.users.count
    }

    /// A datagram of `flow` came back on `carrier` at `now`: the user to send it to, nil when the flow is
    /// unknown (drop it).
    public mutating func datagramFromService(carrier: UInt64, flow: UInt32, now: NIODeadline) -> Address? {
        guard let address = self.carriers[carrier]?.users[flow] else { return nil }
        self.flows[address]?.lastActive = now
        return address
    }

    /// The other side forgot `flow` of `carrier`; returns whether it was live here.
    @discardableResult
    public mutating func flowEnded(carrier: UInt64, flow: UInt32) -> Bool {
        guard let address = self.carriers[carrier]?.users.removeValue(forKey: flow) else { return false }
        self.flows[address] = nil
        return true
    }

    /// Forgets the flows idle at `now` for `idleTimeout` or longer; returns them, to send `end` for each.
    public mutating func expire(now: NIODeadline) -> [(carrier: UInt64, flow: UInt32)] {
        var expired: [(carrier: UInt64, flow: UInt32)] = []
        for (address, flow) in self.flows where now - flow.lastActive >= self.idleTimeout {
            expired.append((flow.carrier, flow.number))
            self.flows[address] = nil
            self.carriers[flow.carrier]?.users[flow.number] = nil
        }
        return expired
    }
}
