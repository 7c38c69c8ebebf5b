import NIOCore
import NodePassCore
import NodePassNIO
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The subscribers of the event stream (`GET …/events`), each with its own bounded queue of frames: a
/// subscriber that reads too slowly loses the events that do not fit, and never holds up the others.
final class EventHub: Sendable {
    /// The most subscribers at once; one more is refused (503).
    let maximumSubscribers: Int
    private let state = Mutex<State>(State())

    private struct State: ~Copyable {
        var next: UInt64 = 0
        var subscribers: [UInt64: AsyncStream<ByteBuffer>.Continuation] = [:]
        /// The latest view of every instance, for the `log` events that instances send from any thread.
        var views: [String: InstanceView] = [:]
    }

    init(maximumSubscribers: Int) {
        self.maximumSubscribers = maximumSubscribers
    }

    /// A new subscriber whose stream starts with `initial` (one `initial` event per view) and has room for
    /// `room` more frames; nil when there are too many subscribers.
    func subscribe(initial: [InstanceView], room: Int) -> (id: UInt64, frames: AsyncStream<ByteBuffer>)? {
        let (stream, continuation) = AsyncStream<ByteBuffer>.makeStream(
            bufferingPolicy: .bufferingOldest(initial.count + room + 1)
        )
        let id: UInt64? = self.state.withLock { state in
            guard state.subscribers.count < self.maximumSubscribers else { return nil }
            state.next += 1
            continuation.yield(ByteBuffer(string: "retry: 3000\n\n"))
            for view in initial { continuation.yield(Self.frame(.initial, view)) }
            state.subscribers[state.next] = continuation
            return state.next
        }
        guard let id else { return nil }
        continuation.onTermination = { [weak self] _ in self?.unsubscribe(id) }
        return (id, stream)
    }

    private func unsubscribe(_ id: UInt64) {
        _ = self.state.withLock { $0.subscribers.removeValue(forKey: id) }
    }

    /// Sends an event about `view` to every subscriber.
    func publish(_ kind: MasterEventKind, _ view: InstanceView?) {
        let frame = Self.frame(kind, view)
        self.state.withLock { state in
            if let view {
                if kind == .delete { state.views[view.id] = nil } else { state.views[view.id] = view }
            }
            for continuation in state.subscribers.values { continuation.yield(frame) }
        }
    }

    /// Keeps `views` for the `log` events of their instances (at start, before any event).
    func remember(_ views: [InstanceView]) {
        self.state.withLock { state in
            for view in views { state.views[view.id] = view }
        }
    }

    /// Sends a `log` event: `line` was logged by instance `id`.
    func log(_ id: String, _ line: String) {
        self.state.withLock { state in
            guard !state.subscribers.isEmpty, let view = state.views[id] else { return }
            let frame = Self.frame(.log, view, logs: line)
            for continuation in state.subscribers.values { continuation.yield(frame) }
        }
    }

    /// How often the streams get a comment line, so that a stream to a peer that has gone is noticed.
    static let keepAlivePeriod = TimeAmount.seconds(15)

    /// Sends an SSE comment (`: keep-alive`), which clients ignore, to every subscriber.
    func keepAlive() {
        self.state.withLock { state in
            for continuation in state.subscribers.values { continuation.yield(ByteBuffer(string: ": keep-alive\n\n")) }
        }
    }

    /// Ends every stream (after a `shutdown` event, or when the API key changed).
    func endAll() {
        let ended = self.state.withLock { state in
            defer { state.subscribers = [:] }
            return Array(state.subscribers.values)
        }
        for continuation in ended { continuation.finish() }
    }

    var subscriberCount: Int { self.state.withLock { $0.subscribers.count } }

    /// One server-sent event: `event: instance` and the JSON of the event on one `data:` line.
    static func frame(_ kind: MasterEventKind, _ view: InstanceView?, logs: String = "") -> ByteBuffer {
        let event = InstanceEvent(type: kind.rawValue, time: Self.now(), instance: view, logs: logs)
        var buffer = ByteBuffer(string: "event: instance\ndata: ")
        buffer.writeBytes(MasterJSON.encode(event))
        buffer.writeString("\n\n")
        return buffer
    }

    /// The time now in RFC 3339, UTC, with nanoseconds.
    static func now() -> String {
        wallClock(utc: true, separator: "T", fractionDigits: 9) + "Z"
    }
}

/// The data of an event: `instance` is null in a `shutdown` event.
struct InstanceEvent: Encodable {
    var type: String
    var time: String
    var instance: InstanceView?
    var logs: String

    enum CodingKeys: String, CodingKey {
        case type, time, instance, logs
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(self.type, forKey: .type)
        try container.encode(self.time, forKey: .time)
        try container.encode(self.instance, forKey: .instance)
        try container.encode(self.logs, forKey: .logs)
    }
}

/// The API's JSON: keys sorted, `/` not escaped.
enum MasterJSON {
    static func encode(_ value: some Encodable) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Our own values always encode; an empty object is the safe answer if one ever did not.
        return (try? Array(encoder.encode(value))) ?? Array("{}".utf8)
    }

    static func decode<Value: Decodable>(_ type: Value.Type, from buffer: ByteBuffer) -> Value? {
        try? JSONDecoder().decode(type, from: Data(buffer.readableBytesView))
    }
}
