import NIOCore

/// Why a v2 peer gave up, as sent in a `failure` message.
public enum V2FailureReason: UInt8, Hashable, Sendable {
    /// The peer did not prove that it holds the key.
    case authenticationFailed = 1
    /// The peer asked for a protocol version this side does not speak.
    case unsupportedVersion = 2
    /// The peer broke the protocol (unexpected or malformed message).
    case protocolViolation = 3
    /// The server already serves as many clients as it accepts.
    case tooManyClients = 4
    /// This side has no key (protocol v1) and cannot speak v2.
    case noKey = 5
    /// Any other code (from a newer peer).
    case other = 255
}

/// A message of the v2 control channel, carried in one `V2Frame`.
public enum V2Message: Hashable, Sendable {
    /// The only protocol version this implementation speaks.
    public static let version: UInt8 = 2
    /// The ALPN protocol name a v2 client offers on the control channel's TLS handshake.
    public static let alpn = "nodepass/2"
    /// The ALPN protocol name of v2 with UDP: offered (first) and preferred by the sides that carry UDP.
    public static let alpnDatagrams = "nodepass/2.1"
    /// The ALPN protocol name of v2 with UDP and sealed pool connections (`V2PoolSeal`): offered first and
    /// preferred by the sides that seal.
    public static let alpnSealed = "nodepass/2.2"
    /// The ALPN protocol name of `nodepass/2.2` with resumable relays (`V2Resume`, when the server's URL has
    /// `resume=1`): offered first and preferred by the sides that resume.
    public static let alpnResume = "nodepass/2.3"
    /// Every v2 protocol name, the preferred first.
    public static let alpnNames = [alpnResume, alpnSealed, alpnDatagrams, alpn]

    /// Whether the protocol `alpn` may seal pool connections (`nodepass/2.2` and later).
    public static func seals(_ alpn: String?) -> Bool {
        alpn == Self.alpnSealed || alpn == Self.alpnResume
    }
    /// Length of a handshake nonce in bytes.
    public static let nonceLength = 32
    /// Length of a proof (HMAC-SHA256) in bytes.
    public static let proofLength = 32
    /// The longest failure text sent; longer text is cut.
    public static let maximumFailureText = 200

    /// Client to server, first message: the version it speaks and its fresh nonce.
    case hello(version: UInt8, nonce: [UInt8])
    /// Server to client: the version it speaks and its fresh nonce.
    case challenge(version: UInt8, nonce: [UInt8])
    /// Client to server: the client's proof of the key.
    case authenticate(proof: [UInt8])
    /// Server to client: the server's proof of the key, over the transcript and the encoded parameters.
    case welcome(proof: [UInt8], parameters: [UInt8])
    /// Either way: the sender gives up, for this reason; the connection closes after it.
    case failure(V2FailureReason, text: String)
    /// Either way, every heartbeat period after the handshake.
    case heartbeat
    /// Either way, after the handshake: the sender relays a user over the pool connection with this ID.
    case launch(PoolID)
    /// `nodepass/2.1`, from the side with the users: the pool connection with this ID becomes a datagram
    /// carrier.
    case launchDatagrams(PoolID)
    /// A frame type this version does not know (ignored after the handshake).
    case unknown(type: UInt8)

    /// The frame type of each message.
    public enum Kind: UInt8, Sendable {
        /// `hello`
        case hello = 0x01
        /// `challenge`
        case challenge = 0x02
        /// `authenticate`
        case authenticate = 0x03
        /// `welcome`
        case welcome = 0x04
        /// `failure`
        case failure = 0x05
        /// `heartbeat`
        case heartbeat = 0x10
        /// `launch`
        case launch = 0x11
        /// `launchDatagrams`
        case launchDatagrams = 0x12
    }

    /// The message as a frame.
    public var frame: V2Frame {
        var payload = ByteBuffer()
        let kind: UInt8
        switch self {
        case .hello(let version, let nonce):
            kind = Kind.hello.rawValue
            payload.writeInteger(version)
            payload.writeBytes(nonce)
        case .challenge(let version, let nonce):
            kind = Kind.challenge.rawValue
            payload.writeInteger(version)
            payload.writeBytes(nonce)
        case .authenticate(let proof):
            kind = Kind.authenticate.rawValue
            payload.writeBytes(proof)
        case .welcome(let proof, let parameters):
            kind = Kind.welcome.rawValue
            payload.writeBytes(proof)
            payload.writeBytes(parameters)
        case .failure(let reason, let text):
            kind = Kind.failure.rawValue
            payload.writeInteger(reason.rawValue)
            payload.writeBytes(Array(text.utf8.prefix(Self.maximumFailureText)))
        case .heartbeat:
            kind = Kind.heartbeat.rawValue
        case .launch(let id):
            kind = Kind.launch.rawValue
            payload.writeInteger(id.value)
        case .launchDatagrams(let id):
            kind = Kind.launchDatagrams.rawValue
            payload.writeInteger(id.value)
        case .unknown(let type):
            kind = type
        }
        return V2Frame(type: kind, payload: payload)
    }

    /// Writes the message as one frame into `buffer`.
    public func write(to buffer: inout ByteBuffer) {
        self.frame.write(to: &buffer)
    }

    /// Decodes a frame; throws `.protocolViolation` when a known type has the wrong payload.
    public init(frame: V2Frame) throws(NodePassError) {
        var payload = frame.payload
        guard let kind = Kind(rawValue: frame.type) else {
            self = .unknown(type: frame.type)
            return
        }
        switch kind {
        case .hello, .challenge:
            guard payload.readableBytes == 1 + Self.nonceLength,
                let version = payload.readInteger(as: UInt8.self),
                let nonce = payload.readBytes(length: Self.nonceLength)
            else {
                throw NodePassError(.protocolViolation, "\(kind) message of \(frame.payload.readableBytes) bytes")
            }
            self = kind == .hello ? .hello(version: version, nonce: nonce) : .challenge(version: version, nonce: nonce)
        case .authenticate:
            guard payload.readableBytes == Self.proofLength, let proof = payload.readBytes(length: Self.proofLength)
            else {
                throw NodePassError(.protocolViolation, "authenticate message of \(frame.payload.readableBytes) bytes")
            }
            self = .authenticate(proof: proof)
        case .welcome:
            guard payload.readableBytes > Self.proofLength, let proof = payload.readBytes(length: Self.proofLength)
            else {
                throw NodePassError(.protocolViolation, "welcome message of \(frame.payload.readableBytes) bytes")
            }
            self = .welcome(proof: proof, parameters: Array(payload.readableBytesView))
        case .failure:
            guard let code = payload.readInteger(as: UInt8.self) else {
                throw NodePassError(.protocolViolation, "empty failure message")
            }
            let printable = payload.readableBytesView.prefix(Self.maximumFailureText).map {
                $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: "?")
            }
            self = .failure(V2FailureReason(rawValue: code) ?? .other, text: String(decoding: printable, as: UTF8.self))
        case .heartbeat:
            guard payload.readableBytes == 0 else {
                throw NodePassError(.protocolViolation, "heartbeat message with a payload")
            }
            self = .heartbeat
        case .launch, .launchDatagrams:
            guard payload.readableBytes == 4, let value = payload.readInteger(as: UInt32.self) else {
                throw NodePassError(.protocolViolation, "\(kind) message of \(frame.payload.readableBytes) bytes")
            }
            self = kind == .launch ? .launch(PoolID(value)) : .launchDatagrams(PoolID(value))
        }
    }
}
