import Testing

@testable import NodePassCore

@Suite struct MasterURLTests {
    @Test func aBareURLServesPlainHTTPUnderApiV1() throws {
        let url = try MasterURL.parse("master://0.0.0.0:9090")
        #expect(url.listen == HostPort(host: "0.0.0.0", port: 9090))
        #expect(url.prefix == "/api")
        #expect(url.apiBase == "/api/v1")
        #expect(url.tls == .plain)
        #expect(url.logLevel == .info)
        #expect(url.metrics == nil)
        #expect(url.description == "master://0.0.0.0:9090/api?log=info&tls=0")
    }

    @Test func thePathIsThePrefixWithoutItsLastSlash() throws {
        #expect(try MasterURL.parse("master://:9090/").prefix == "/api")
        #expect(try MasterURL.parse("master://:9090/admin").apiBase == "/admin/v1")
        #expect(try MasterURL.parse("master://:9090/admin/").prefix == "/admin")
        #expect(try MasterURL.parse("master://[::1]:9090/a/b-c_d.e~f?log=debug").prefix == "/a/b-c_d.e~f")
        #expect(try MasterURL.parse("MASTER://[::1]:9090").listen == HostPort(host: "::1", port: 9090))
    }

    @Test func aPrefixWithAnEmptyDotOrOddSegmentIsRefused() {
        for text in [
            "master://:9090//api", "master://:9090/a//b", "master://:9090/..", "master://:9090/a/./b",
            "master://:9090/a%2fb", "master://:9090/a:b", "master://:9090/" + String(repeating: "a", count: 200),
        ] {
            #expect(throws: NodePassError(.invalidURL, "")) { try MasterURL.parse(text) }
        }
    }

    @Test func tlsAndItsFilesGoTogether() throws {
        let files = try MasterURL.parse("master://:9090?tls=2&crt=/etc/np/api.crt&key=/etc/np/api.key")
        #expect(files.tls == .files)
        #expect(files.certificateFile == "/etc/np/api.crt")
        #expect(files.privateKeyFile == "/etc/np/api.key")
        #expect(try MasterURL.parse("master://:9090?tls=1").tls == .inMemory)
        for text in [
            "master://:9090?tls=2", "master://:9090?tls=2&crt=a.crt", "master://:9090?crt=a.crt&key=a.key",
            "master://:9090?tls=1&key=a.key", "master://:9090?tls=3", "master://:9090?tls=", "master://:9090?crt=",
        ] {
            #expect(throws: NodePassError(.invalidURL, "")) { try MasterURL.parse(text) }
        }
    }

    @Test func everyOtherMistakeIsRefusedWithAMessage() throws {
        for text in [
            "", "master://", "master://9090", "master://:0", "server://:1/:2", "master://:9090?log=loud",
            "master://:9090?pool=1", "master://:9090?metrics=9100", "master://:9090 /api", "master://:9090/ä",
        ] {
            #expect(throws: NodePassError(.invalidURL, "")) { try MasterURL.parse(text) }
        }
        let url = try MasterURL.parse("master://:9090?log=warn&metrics=127.0.0.1:9100")
        #expect(url.logLevel == .warn)
        #expect(url.metrics == HostPort(host: "127.0.0.1", port: 9100))
    }
}
