import Foundation
import NIOCore
import Testing

@testable import NodePassCore

@Suite struct V2URLTests {
    @Test func aKeySelectsV2WithEncryptedDataByDefault() throws {
        let url = try TunnelURL.parse("server://k3y@:10101/:8080")
        #expect(url.protocolVersion == 2)
        #expect(url.effectiveDataTLS == .inMemory)
        #expect(url.mode == .auto)
        let v1 = try TunnelURL.parse("server://:10101/:8080")
        #expect(v1.protocolVersion == 1)
        #expect(v1.effectiveDataTLS == .plain)
    }

    @Test func serverOptionsParseAndPrintBack() throws {
        let url = try TunnelURL.parse("server://k3y@:1/:2?tls=2&crt=/etc/np/c.pem&key=/etc/np/k.pem&mode=1")
        #expect(url.dataTLS == .files)
        #expect(url.certificateFile == "/etc/np/c.pem")
        #expect(url.privateKeyFile == "/etc/np/k.pem")
        #expect(url.mode == .reverse)
        #expect(!url.redacted.contains("k3y"))
        #expect(try TunnelURL.parse(url.redacted.replacingOccurrences(of: "***", with: "k3y")) == url)
        #expect(try TunnelURL.parse("server://k3y@:1/:2?tls=0").effectiveDataTLS == .plain)
    }

    @Test(arguments: [
        ("server://:1/:2?tls=1", "needs protocol v2"),
        ("server://:1/:2?mode=2", "needs protocol v2"),
        ("client://k@:1/:2?tls=1", "set on the server"),
        ("client://k@:1/:2?mode=1", "set on the server"),
        ("server://k@:1/:2?tls=3", "is not 0"),
        ("server://k@:1/:2?tls=", "is not 0"),
        ("server://k@:1/:2?tls=01", "is not 0"),
        ("server://k@:1/:2?mode=9", "is not 0"),
        ("server://k@:1/:2?tls=2", "needs both"),
        ("server://k@:1/:2?tls=2&crt=a.pem", "needs both"),
        ("server://k@:1/:2?crt=a.pem&key=b.pem", "go with tls=2"),
        ("server://k@:1/:2?tls=1&key=b.pem", "go with tls=2"),
        ("server://k@:1/:2?crt=", "needs a file path"),
        ("server://@:1/:2", "empty"),
        ("server://:1/:2?noudp=1", "needs protocol v2"),
        ("client://k@:1/:2?notcp=1", "set on the server"),
        ("server://k@:1/:2?noudp=2", "is not 0 or 1"),
        ("server://k@:1/:2?notcp=", "is not 0 or 1"),
        ("server://k@:1/:2?notcp=1&noudp=1", "nothing to carry"),
        ("server://:1/:2?resume=1", "needs protocol v2"),
        ("client://k@:1/:2?resume=1", "set on the server"),
        ("server://k@:1/:2?resume=yes", "is not 0 or 1"),
    ])
    func badV2OptionsAreRefusedWithAReason(text: String, reason: String) {
        do {
            _ = try TunnelURL.parse(text)
            Issue.record("\(text) was accepted")
        } catch {
            #expect(error.code == .invalidURL)
            #expect(error.message.contains(reason), "\(error.message)")
        }
    }

    @Test func resumeIsOffUnlessTheServerAsks() throws {
        #expect(try TunnelURL.parse("server://k@:1/:2").resume == false)
        let url = try TunnelURL.parse("server://k@:1/:2?resume=1")
        #expect(url.resume)
        #expect(url.redacted.hasSuffix("&resume=1"))
        #expect(try TunnelURL.parse(url.canonical).resume)
        #expect(try TunnelURL.parse("server://k@:1/:2?resume=0").resume == false)
    }

    @Test func notcpAndNoudpChooseWhatTheTunnelCarries() throws {
        #expect(try TunnelURL.parse("server://k@:1/:2").transports == [.tcp, .udp])
        let udpOnly = try TunnelURL.parse("server://k@:1/:2?notcp=1")
        #expect(udpOnly.transports == [.udp])
        #expect(udpOnly.redacted.hasSuffix("&notcp=1"))
        #expect(try TunnelURL.parse(udpOnly.redacted.replacingOccurrences(of: "***", with: "k")) == udpOnly)
        #expect(try TunnelURL.parse("server://k@:1/:2?noudp=1").transports == [.tcp])
        #expect(try TunnelURL.parse("server://k@:1/:2?noudp=1&noudp=0").transports == [.tcp, .udp])
    }

    @Test func errorMessagesNeverEchoTheKey() {
        for text in [
            "s3cretvalue@host:1/x:2", "server://s3cretvalue@host:1", "server://s3cretvalue@host:99999/x:2",
            "server://s3cretvalue@h:1/x:2?bogus=1",
        ] {
            do {
                _ = try TunnelURL.parse(text)
                Issue.record("\(text) was accepted")
            } catch {
                #expect(!error.message.contains("s3cretvalue"), "\(error.message)")
            }
        }
    }

    @Test func heartbeatMonitorDeclaresDeathAfterThreeSilentPeriods() {
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var monitor = HeartbeatMonitor(interval: .seconds(1), now: start)
        #expect(!monitor.isDead(now: start + .seconds(3)))
        #expect(monitor.isDead(now: start + .milliseconds(3001)))
        monitor.messageReceived(now: start + .seconds(2))
        #expect(!monitor.isDead(now: start + .seconds(5)))
        #expect(monitor.isDead(now: start + .milliseconds(5001)))
        // A late, out-of-order timestamp does not move the clock back.
        monitor.messageReceived(now: start)
        #expect(!monitor.isDead(now: start + .seconds(5)))
    }
}

@Suite struct V2KeySourceTests {
    @Test func theEnvironmentKeyIsUsedWhenTheURLHasNone() throws {
        let url = try TunnelURL.parse("server://:1/:2?tls=0", environmentKey: "from-env")
        #expect(url.key == "from-env")
        #expect(url.protocolVersion == 2)
        #expect(try TunnelURL.parse("server://:1/:2", environmentKey: "").key == nil)
        #expect(try TunnelURL.parse("server://:1/:2", environmentKey: nil).key == nil)
    }

    @Test func aKeyInBothPlacesIsRefused() {
        #expect(throws: NodePassError(.invalidURL, "")) {
            try TunnelURL.parse("server://k@:1/:2", environmentKey: "other")
        }
    }

    @Test func errorsNeverQuoteAKeyThatHoldsSlashes() {
        // A base64 key with '/' is cut at the first '/', and the parts would land in messages.
        for text in ["server://ab/cd+ef@host:1/x:2", "client://s3cr/3t@h:99999/x:2", "server://k3y@h:1/x:2?t=s3cr3t"] {
            do {
                _ = try TunnelURL.parse(text)
                Issue.record("\(text) was accepted")
            } catch {
                for part in ["ab", "cd+ef", "s3cr", "3t", "s3cr3t"] {
                    #expect(!error.message.contains("'\(part)"), "\(error.message)")
                }
            }
        }
    }
}
