import Testing

@testable import NodePassCore

@Suite struct TunnelURLTests {
    @Test func parsesServerWithIPv4() throws {
        let url = try TunnelURL.parse("server://127.0.0.1:10101/127.0.0.1:8080?log=debug")
        #expect(url.role == .server)
        #expect(url.key == nil)
        #expect(url.tunnel == HostPort(host: "127.0.0.1", port: 10101))
        #expect(url.target == HostPort(host: "127.0.0.1", port: 8080))
        #expect(url.logLevel == .debug)
    }

    @Test func parsesClientWithIPv6AndEmptyHost() throws {
        let url = try TunnelURL.parse("client://[::1]:10101/:8080")
        #expect(url.role == .client)
        #expect(url.tunnel == HostPort(host: "::1", port: 10101))
        #expect(url.tunnel.description == "[::1]:10101")
        #expect(url.target == HostPort(host: "", port: 8080))
        #expect(url.target.dialHost == "localhost")
        #expect(url.logLevel == .info)
    }

    @Test func keepsTheKeyButNeverPrintsIt() throws {
        let url = try TunnelURL.parse("server://s3cret@:10101/:8080")
        #expect(url.key == "s3cret")
        #expect(!url.redacted.contains("s3cret"))
        #expect(url.redacted.contains("***@"))
    }

    @Test func parsesTheMetricsAddress() throws {
        let url = try TunnelURL.parse("server://:1/:2?log=warn&metrics=127.0.0.1:9090")
        #expect(url.metrics == HostPort(host: "127.0.0.1", port: 9090))
        #expect(url.logLevel == .warn)
        #expect(try TunnelURL.parse("server://:1/:2").metrics == nil)
        #expect(throws: NodePassError(.invalidURL, "")) {
            try TunnelURL.parse("server://:1/:2?metrics=127.0.0.1")
        }
    }

    /// `pool=PORT` fixes the server's pool port (v1 and v2), for a firewall; the client follows the server.
    @Test func poolFixesTheServersPoolPort() throws {
        let url = try TunnelURL.parse("server://:10101/:8080?pool=10102")
        #expect(url.poolPort == 10102)
        #expect(url.redacted.hasSuffix("&pool=10102"))
        #expect(try TunnelURL.parse(url.canonical).poolPort == 10102)
        #expect(try TunnelURL.parse("server://k3y@:10101/:8080?pool=65535&tls=0").poolPort == 65535)
        #expect(try TunnelURL.parse("server://:10101/:8080").poolPort == nil)
        #expect(try TunnelURL.parse("server://192.0.2.1:10101/127.0.0.1:8080?pool=8080").poolPort == 8080)
        for text in [
            "client://:10101/:8080?pool=10102", "server://:10101/:8080?pool=10101", "server://:10101/:8080?pool=0",
            "server://:10101/:8080?pool=65536", "server://:10101/:8080?pool=+1", "server://:10101/:8080?pool=",
            "server://:10101/127.0.0.1:8080?pool=8080",
        ] {
            #expect(throws: NodePassError(.invalidURL, ""), "\(text)") { try TunnelURL.parse(text) }
        }
    }

    /// What a server with a key logs for pairing: a client URL that parses, without a key, IPv6 in brackets.
    @Test func thePairingCommandIsAClientURLWithoutTheKey() throws {
        let reverse = PairingCommand.message(host: "2001:db8::7", port: 10101, mode: .reverse)
        #expect(reverse.hasSuffix(#"nodepass "client://[2001:db8::7]:10101/TARGET_HOST:PORT""#))
        #expect(reverse.contains("the service") && !reverse.contains("NAT"))
        let guessed = PairingCommand.message(host: "192.0.2.2", port: 10101, mode: .reverse, guessed: true)
        #expect(guessed.contains("behind NAT, the public address instead of 192.0.2.2"))
        #expect(guessed.hasSuffix(#"nodepass "client://192.0.2.2:10101/TARGET_HOST:PORT""#))
        let forward = PairingCommand.message(host: "203.0.113.7", port: 10101, mode: .forward)
        #expect(forward.contains("where users connect"))
        let url = try #require(forward.split(separator: "\"").dropFirst().first)
        let filled = url.replacing("TARGET_HOST:PORT", with: "127.0.0.1:5432")
        let parsed = try TunnelURL.parse(String(filled), environmentKey: "k3y")
        #expect(parsed.role == .client && parsed.tunnel == HostPort(host: "203.0.113.7", port: 10101))
        let keys = [PairingCommand.freshKey(), PairingCommand.freshKey()]
        #expect(keys[0] != keys[1])
        #expect(keys.allSatisfy { $0.count == 32 && $0.allSatisfy(\.isHexDigit) })
    }

    @Test func schemeIsCaseInsensitive() throws {
        #expect(try TunnelURL.parse("SERVER://:1/:2").role == .server)
    }

    @Test(arguments: [
        "",
        "garbage",
        "ftp://x:1/y:2",
        "server://127.0.0.1/127.0.0.1:80",
        "server://127.0.0.1:70000/127.0.0.1:80",
        "server://127.0.0.1:0/127.0.0.1:80",
        "server://127.0.0.1:80",
        "server://127.0.0.1:80/",
        "server://127.0.0.1:80/127.0.0.1",
        "server://127.0.0.1:-1/127.0.0.1:80",
        "server://127.0.0.1:+80/127.0.0.1:80",
        "server://127.0.0.1:00080000/127.0.0.1:80",
        "server://[::1:80/127.0.0.1:80",
        "server://[::1]/127.0.0.1:80",
        "server://[zz]:80/127.0.0.1:80",
        "server://::1:80/127.0.0.1:80",
        "server://@h:80/h:81",
        "server://h:80/h:81?log=verbose",
        "server://h:80/h:81?colour=1",
        "server://h o:80/h:81",
        "server://h\u{0}:80/h:81",
        "server://hé:80/h:81",
        "client://h:80/h:81\n",
        "server://" + String(repeating: "a", count: 5000) + ":1/h:2",
    ])
    func refusesBadURLs(_ text: String) {
        #expect(throws: NodePassError(.invalidURL, "")) {
            try TunnelURL.parse(text)
        }
    }

    @Test func messagesNameTheProblem() {
        do {
            _ = try TunnelURL.parse("server://127.0.0.1:70000/127.0.0.1:80")
            Issue.record("expected an error")
        } catch {
            #expect(error.message.contains("70000"))
            #expect(error.message.contains("1 to 65535"))
        }
        do {
            _ = try TunnelURL.parse("ftp://x:1/y:2")
            Issue.record("expected an error")
        } catch {
            #expect(error.message.contains("ftp"))
        }
    }

    @Test(arguments: LogLevel.allCases)
    func acceptsEveryLogLevel(_ level: LogLevel) throws {
        #expect(try TunnelURL.parse("client://h:1/h:2?log=\(level.rawValue)").logLevel == level)
    }
}
