import NIOCore
import Testing

@testable import NodePassCore

@Suite struct ConfigurationTests {
    @Test func defaultsWhenNothingIsSet() throws {
        let configuration = try Configuration(environment: [:])
        #expect(configuration.semaphoreLimit == 1024)
        #expect(configuration.minPoolCapacity == 16)
        #expect(configuration.maxPoolCapacity == 1024)
        #expect(configuration.reportInterval == .seconds(5))
        #expect(configuration.serviceCooldown == .seconds(5))
        #expect(configuration.shutdownTimeout == .seconds(5))
        #expect(configuration.udpIdleTimeout == .seconds(60))
        #expect(configuration.udpMaxFlows == 8192)
        #expect(configuration.relayBuffer == 64 * 1024)
        #expect(configuration.bufferBudget == 64 * 1024 * 1024)
    }

    @Test(arguments: [
        ("65536", 65536), ("64K", 65536), ("64KiB", 65536), ("1M", 1 << 20), ("2MiB", 2 << 20), ("1G", 1 << 30),
        ("3GiB", 3 << 30),
    ])
    func readsSizes(_ text: String, _ bytes: Int) throws {
        #expect(Configuration.parseSize(text) == bytes)
    }

    @Test func idleTimeoutDefaultsToAnHourAndZeroTurnsItOff() throws {
        #expect(try Configuration(environment: [:]).idleTimeout == .hours(1))
        #expect(try Configuration(environment: ["IDLE_TIMEOUT": "0"]).idleTimeout == nil)
    }

    @Test func spliceIsOnUnlessTurnedOff() throws {
        #expect(try Configuration(environment: [:]).splice)
        #expect(try Configuration(environment: ["NODEPASS_SPLICE": "1"]).splice)
        #expect(try !Configuration(environment: ["NODEPASS_SPLICE": "0"]).splice)
    }

    @Test func readsEveryVariable() throws {
        let configuration = try Configuration(environment: [
            "SEMAPHORE_LIMIT": "10", "MIN_POOL_CAPACITY": "2", "MAX_POOL_CAPACITY": "8",
            "REPORT_INTERVAL": "1s", "SERVICE_COOLDOWN": "500ms", "SHUTDOWN_TIMEOUT": "1m30s",
            "IDLE_TIMEOUT": "10m", "UDP_IDLE_TIMEOUT": "30s", "UDP_MAX_FLOWS": "100",
            "RELAY_BUFFER": "128K", "BUFFER_BUDGET": "1G", "RESUME_GRACE": "2m",
        ])
        #expect(configuration.resumeGrace == .minutes(2))
        #expect(configuration.relayBuffer == 128 * 1024)
        #expect(configuration.bufferBudget == 1 << 30)
        #expect(configuration.idleTimeout == .minutes(10))
        #expect(configuration.udpIdleTimeout == .seconds(30))
        #expect(configuration.udpMaxFlows == 100)
        #expect(configuration.semaphoreLimit == 10)
        #expect(configuration.minPoolCapacity == 2)
        #expect(configuration.maxPoolCapacity == 8)
        #expect(configuration.reportInterval == .seconds(1))
        #expect(configuration.serviceCooldown == .milliseconds(500))
        #expect(configuration.shutdownTimeout == .seconds(90))
    }

    @Test(arguments: [
        ("MIN_POOL_CAPACITY", "abc"), ("MIN_POOL_CAPACITY", "-1"), ("MIN_POOL_CAPACITY", "0"),
        ("SEMAPHORE_LIMIT", "1e3"), ("SEMAPHORE_LIMIT", "99999999999999999999"), ("MAX_POOL_CAPACITY", " 5"),
        ("REPORT_INTERVAL", "-1s"), ("REPORT_INTERVAL", "5"), ("REPORT_INTERVAL", "0s"),
        ("SERVICE_COOLDOWN", "5x"), ("SHUTDOWN_TIMEOUT", "25h"), ("SHUTDOWN_TIMEOUT", "1s2"),
        ("IDLE_TIMEOUT", "00"), ("IDLE_TIMEOUT", "-5m"), ("NODEPASS_SPLICE", "2"), ("NODEPASS_SPLICE", "off"),
        ("UDP_IDLE_TIMEOUT", "0"), ("UDP_IDLE_TIMEOUT", "1ms"), ("UDP_MAX_FLOWS", "0"), ("UDP_MAX_FLOWS", "2000000"),
        ("RELAY_BUFFER", "64KB"), ("RELAY_BUFFER", "1K"), ("RELAY_BUFFER", "32M"), ("RELAY_BUFFER", "-64K"),
        ("RELAY_BUFFER", "k"), ("RELAY_BUFFER", " 64K"), ("BUFFER_BUDGET", "64 M"), ("BUFFER_BUDGET", "512K"),
        ("BUFFER_BUDGET", "9999999999999G"), ("BUFFER_BUDGET", "2T"), ("BUFFER_BUDGET", "1.5M"),
        ("RESUME_GRACE", "0"), ("RESUME_GRACE", "1ms"), ("RESUME_GRACE", "30"), ("RESUME_GRACE", "25h"),
    ])
    func refusesBadValuesNamingTheVariable(_ name: String, _ value: String) {
        do {
            _ = try Configuration(environment: [name: value])
            Issue.record("\(name)=\(value) was accepted")
        } catch {
            #expect(error.code == .invalidEnvironment)
            #expect(error.message.contains(name))
            #expect(error.message.contains(value.trimmingPrefix(" ")))
        }
    }

    @Test func refusesMinimumAboveMaximum() {
        #expect(throws: NodePassError(.invalidEnvironment, "")) {
            try Configuration(environment: ["MIN_POOL_CAPACITY": "100", "MAX_POOL_CAPACITY": "10"])
        }
    }

    @Test(arguments: [
        ("5s", TimeAmount.seconds(5)), ("500ms", .milliseconds(500)), ("1m", .minutes(1)),
        ("1.5s", .milliseconds(1500)), ("1h", .hours(1)), ("250us", .microseconds(250)), ("1m30s", .seconds(90)),
    ])
    func parsesDurations(_ text: String, _ expected: TimeAmount) {
        #expect(DurationParser.parse(text) == expected)
    }

    @Test(arguments: ["", "s", "5", "ms", "5 s", "-5s", "5S", "..5s", String(repeating: "9", count: 80) + "s"])
    func refusesBadDurations(_ text: String) {
        #expect(DurationParser.parse(text) == nil)
    }
}
