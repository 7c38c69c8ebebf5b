import NIOCore
import Testing

@testable import NodePassCore

@Suite struct BackoffTests {
    @Test func firstRetryAfterTheCooldownThenDoublingUpToTheCeiling() {
        var backoff = Backoff(base: .seconds(5), healthyAfter: .seconds(15))
        var delays: [TimeAmount] = []
        for _ in 0..<8 { delays.append(backoff.nextDelay(jitter: 0.999_999)) }
        #expect(delays[0] == .seconds(5))
        #expect(delays[1] > .milliseconds(9_990) && delays[1] <= .seconds(10))
        #expect(delays[2] > .milliseconds(19_990) && delays[2] <= .seconds(20))
        #expect(delays[3] > .milliseconds(39_990) && delays[3] <= .seconds(40))
        for delay in delays[4...] { #expect(delay > .milliseconds(59_990) && delay <= .minutes(1)) }
    }

    @Test func jitterSpreadsBetweenHalfAndAllButNeverBelowTheCooldown() {
        var low = Backoff(base: .seconds(5), healthyAfter: .seconds(15))
        var high = Backoff(base: .seconds(5), healthyAfter: .seconds(15))
        _ = low.nextDelay(jitter: 0)
        _ = high.nextDelay(jitter: 0)
        let lowSecond = low.nextDelay(jitter: 0)
        let highSecond = high.nextDelay(jitter: 0.999_999)
        #expect(lowSecond == .seconds(5))
        #expect(highSecond > lowSecond)
        let lowThird = low.nextDelay(jitter: 0)
        #expect(lowThird == .seconds(10))
    }

    @Test func healthySessionResetsShortOneDoesNot() {
        var backoff = Backoff(base: .seconds(1), healthyAfter: .seconds(15))
        _ = backoff.nextDelay(jitter: 1)
        _ = backoff.nextDelay(jitter: 1)
        backoff.sessionEnded(uptime: .seconds(3))
        #expect(backoff.nextDelay(jitter: 1) == .seconds(4))
        backoff.sessionEnded(uptime: .seconds(15))
        #expect(backoff.nextDelay(jitter: 1) == .seconds(1))
    }

    /// The client resets after every completed handshake: however short the session, the next wait is the
    /// cooldown, and only failed attempts double it.
    @Test func aSuccessStartsTheWaitsOver() {
        var backoff = Backoff(base: .seconds(1))
        for _ in 0..<5 {
            #expect(backoff.nextDelay(jitter: 1) == .seconds(1))
            backoff.reset()
        }
        _ = backoff.nextDelay(jitter: 1)
        #expect(backoff.nextDelay(jitter: 1) == .seconds(2))
        backoff.sessionEnded(uptime: .hours(1))
        #expect(backoff.nextDelay(jitter: 1) == .seconds(4))
        backoff.reset()
        #expect(backoff.nextDelay(jitter: 1) == .seconds(1))
    }

    @Test func cooldownLongerThanAMinuteIsTheCeiling() {
        var backoff = Backoff(base: .minutes(2), healthyAfter: .seconds(15))
        #expect(backoff.nextDelay(jitter: 0.5) == .minutes(2))
        #expect(backoff.nextDelay(jitter: 0) == .minutes(2))
        #expect(backoff.nextDelay(jitter: 1) == .minutes(2))
    }
}
