import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NodePassCore
import NodePassNIO

/// The master's HTTP API: NodePass 1.14's paths, methods, JSON fields and status codes under `PREFIX/v1`.
enum MasterAPI {
    /// The largest request body read (a URL is at most 4 KiB; metadata at most 64 tags of 256 bytes each).
    static let maximumBodySize = 64 * 1024

    /// The router of a master whose API lives under `base` (`/api/v1` by default).
    static func router(base: String, core: MasterCore, info: MasterInfoSource, logger: Logger) -> Router<MasterContext>
    {
        let router = Router(context: MasterContext.self)
        router.add(middleware: ResponseShapeMiddleware())
        router.add(middleware: APIKeyMiddleware(key: core.key, logger: logger))
        let api = router.group(RouterPath(base))

        api.get("instances") { request, _ in
            guard !request.uri.path.hasSuffix("/") else { throw APIFailure(400, "Instance ID is required") }
            return json(await core.views)
        }
        api.post("instances") { request, _ in
            guard !request.uri.path.hasSuffix("/") else { throw APIFailure(400, "Instance ID is required") }
            let body = try await decodeBody(CreateRequest.self, request)
            let view = try await core.create(url: body.url, alias: body.alias).get()
            return json(view, status: .created)
        }
        api.get("instances/{id}") { _, context in
            json(try await core.view(try instanceID(context)).get())
        }
        api.patch("instances/{id}") { request, context in
            let id = try instanceID(context)
            _ = try await core.view(id).get()
            let patch = try await decodeBody(InstancePatch.self, request, emptyIs: "{}")
            return json(try await core.patch(id, patch).get())
        }
        api.put("instances/{id}") { request, context in
            let id = try instanceID(context)
            _ = try await core.view(id).get()
            let body = try await decodeBody(PutRequest.self, request)
            return json(try await core.replaceURL(id, url: body.url).get())
        }
        api.delete("instances/{id}") { _, context in
            _ = try await core.delete(try instanceID(context)).get()
            return Response(status: .noContent)
        }
        api.get("events") { request, _ in
            guard let subscription = await core.subscribe() else {
                throw APIFailure(503, "Too many event-stream subscribers")
            }
            let headers: HTTPFields = [
                .contentType: "text/event-stream", .cacheControl: "no-cache", .connection: "keep-alive",
            ]
            return Response(
                status: .ok,
                headers: headers,
                body: ResponseBody { writer in
                    // Ends when the client leaves (the wait is cancelled) or the hub ends every stream.
                    _ = try? await request.body.consumeWithCancellationOnInboundClose { _ in
                        for await frame in subscription.frames { try await writer.write(frame) }
                    }
                    try? await writer.finish(nil)
                }
            )
        }
        api.get("info") { _, _ in
            json(await info.info(identity: core.identity))
        }
        api.post("info") { request, _ in
            let body = try await decodeBody(AliasRequest.self, request)
            try await core.setAlias(body.alias ?? "").get()
            return json(await info.info(identity: core.identity))
        }
        api.get("tcping") { request, _ in
            guard let target = request.uri.queryParameters.get("target"), !target.isEmpty else {
                throw APIFailure(400, "Target address required")
            }
            return json(await info.tcping(target))
        }
        api.get("openapi.json") { _, _ in
            Response(
                status: .ok,
                headers: [.contentType: "application/json"],
                body: ResponseBody(byteBuffer: ByteBuffer(string: OpenAPIDocument.json(base: base)))
            )
        }
        api.get("docs") { _, _ in
            Response(
                status: .ok,
                headers: [.contentType: "text/html; charset=utf-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(string: OpenAPIDocument.html(base: base)))
            )
        }
        // Every other method on a known path: 405, as NodePass answers.
        let known: [(RouterPath, [HTTPRequest.Method])] = [
            ("instances", [.get, .post]), ("instances/{id}", [.get, .patch, .put, .delete]), ("events", [.get]),
            ("info", [.get, .post]), ("tcping", [.get]), ("openapi.json", [.get]), ("docs", [.get]),
        ]
        for (path, allowed) in known {
            for method in [HTTPRequest.Method.get, .post, .put, .patch, .delete, .head] where !allowed.contains(method)
            {
                api.on(path, method: method) { _, _ -> Response in throw APIFailure(405, "Method not allowed") }
            }
        }
        return router
    }

    private static func instanceID(_ context: MasterContext) throws -> String {
        guard let id = context.parameters.get("id").map(Self.percentDecoded), !id.isEmpty else {
            throw APIFailure(400, "Instance ID is required")
        }
        return id
    }

    /// `text` with its `%XX` escapes decoded (`%2A%2A…` is the key record's `********`); an escape that is not
    /// two hex digits stays as it is.
    static func percentDecoded(_ text: String) -> String {
        guard text.contains("%") else { return text }
        var bytes: [UInt8] = []
        var rest = Substring(text).utf8[...]
        while let first = rest.first {
            if first == UInt8(ascii: "%"), rest.count >= 3,
                let byte = UInt8(String(decoding: rest.dropFirst().prefix(2), as: UTF8.self), radix: 16)
            {
                bytes.append(byte)
                rest = rest.dropFirst(3)
            } else {
                bytes.append(first)
                rest = rest.dropFirst()
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The body as `Value`, or 400 `Invalid request body`; an empty body reads as `emptyIs` when given.
    private static func decodeBody<Value: Decodable>(
        _ type: Value.Type,
        _ request: Request,
        emptyIs: String? = nil
    ) async throws -> Value {
        var body = try await request.body.collect(upTo: Self.maximumBodySize)
        if body.readableBytes == 0, let emptyIs { body = ByteBuffer(string: emptyIs) }
        guard let value = MasterJSON.decode(type, from: body) else {
            throw APIFailure(400, "Invalid request body")
        }
        return value
    }

    /// A JSON response: `value`, then a newline.
    static func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) -> Response {
        var buffer = ByteBuffer(bytes: MasterJSON.encode(value))
        buffer.writeString("\n")
        return Response(
            status: status,
            headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: buffer)
        )
    }

    private struct CreateRequest: Decodable {
        var url: String
        var alias: String?
    }

    private struct PutRequest: Decodable {
        var url: String
    }

    private struct AliasRequest: Decodable {
        var alias: String?
    }
}

/// What a handler knows of a request: the peer's address besides Hummingbird's own.
struct MasterContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let peer: SocketAddress?

    init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.peer = source.channel.remoteAddress
    }

    var maxUploadSize: Int { MasterAPI.maximumBodySize }
}

/// A refused request: its status and the message of its `{"error": …}` body.
struct APIFailure: HTTPResponseError {
    let status: HTTPResponse.Status
    let message: String

    init(_ code: Int, _ message: String) {
        self.status = HTTPResponse.Status(code: code)
        self.message = message
    }

    func response(from request: Request, context: some RequestContext) throws -> Response {
        self.response
    }

    var response: Response {
        MasterAPI.json(["error": self.message], status: self.status)
    }
}

extension Result where Failure == MasterAPIError {
    /// The value, or the error as the API answers it.
    func get() throws(APIFailure) -> Success {
        switch self {
        case .success(let value): return value
        case .failure(let error): throw APIFailure(error.status, error.message)
        }
    }
}

/// Every answer has NodePass's CORS headers and, when it is an error, a `{"error": …}` body; any `OPTIONS`
/// request is answered 200 before the key is checked (browsers send it without one).
struct ResponseShapeMiddleware: RouterMiddleware {
    typealias Context = MasterContext

    static let cors: HTTPFields = [
        HTTPField.Name("Access-Control-Allow-Origin")!: "*",
        HTTPField.Name("Access-Control-Allow-Methods")!: "GET, PATCH, POST, PUT, DELETE, OPTIONS",
        HTTPField.Name("Access-Control-Allow-Headers")!: "Content-Type, Authorization, X-API-Key, Cache-Control",
    ]

    func handle(
        _ request: Request,
        context: MasterContext,
        next: (Request, MasterContext) async throws -> Response
    ) async throws -> Response {
        var response: Response
        if request.method == .options {
            response = Response(status: .ok)
        } else {
            do {
                response = try await next(request, context)
            } catch let failure as APIFailure {
                response = failure.response
            } catch let error as any HTTPResponseError {
                let message =
                    switch error.status.code {
                    case 404: "Not found"
                    case 413: "Request body too large"
                    default: error.status.reasonPhrase
                    }
                response = APIFailure(error.status.code, message).response
            } catch {
                response = APIFailure(500, "Internal error").response
            }
        }
        response.headers.append(contentsOf: Self.cors)
        return response
    }
}

/// Every endpoint but the API's description needs `X-API-Key`; a refusal is logged with the peer's address
/// (at most once a second, so that a flood of guesses does not flood the log).
struct APIKeyMiddleware: RouterMiddleware {
    typealias Context = MasterContext
    static let header = HTTPField.Name("X-API-Key")!

    let key: APIKey
    let logger: Logger
    private let logClock = LimitLogClock()

    init(key: APIKey, logger: Logger) {
        self.key = key
        self.logger = logger
    }

    func handle(
        _ request: Request,
        context: MasterContext,
        next: (Request, MasterContext) async throws -> Response
    ) async throws -> Response {
        // Unknown paths (no endpoint) answer 404 to anyone; the description is public.
        guard let endpoint = context.endpointPath, !endpoint.hasSuffix("/openapi.json"), !endpoint.hasSuffix("/docs")
        else { return try await next(request, context) }
        guard let given = request.headers[Self.header] else {
            self.refused(context, "no API key")
            throw APIFailure(401, "Unauthorized: API key required")
        }
        guard self.key.matches(given[...]) else {
            self.refused(context, "wrong API key")
            throw APIFailure(401, "Unauthorized: Invalid API key")
        }
        return try await next(request, context)
    }

    private func refused(_ context: MasterContext, _ why: String) {
        guard self.logClock.isDue() else { return }
        self.logger.warning(
            "API request refused: \(why)",
            metadata: ["np.peer": "\(context.peer.map { "\($0)" } ?? "unknown")"]
        )
    }
}
