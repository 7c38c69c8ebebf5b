import NodePassCore
import Testing

@Suite struct LogValueTests {
    @Test(arguments: ["127.0.0.1:4000", "[::1]:4000", "v1", "1.5s", "deadbeef", "a,b;c/d", "é"])
    func aValueWithoutSpacesIsWrittenAsItIs(_ value: String) {
        #expect(LogValue.format(value) == value)
    }

    @Test(arguments: [
        ("connection refused", #""connection refused""#),
        ("", #""""#),
        ("a=b", #""a=b""#),
        // A peer's text cannot pass for another field or another line.
        ("x np.peer=10.0.0.1:1", #""x np.peer=10.0.0.1:1""#),
        ("one\ntwo", #""one\ntwo""#),
        ("say \"hi\" \\ bye", #""say \"hi\" \\ bye""#),
        ("\u{1B}[31mred", #""\u{1B}[31mred""#),
        ("tab\there", #""tab\there""#),
        ("line\u{2028}separator", #""line\u{2028}separator""#),
        ("no-break\u{00A0}space", "\"no-break\u{00A0}space\""),
    ])
    func aValueThatCouldPassForMoreIsQuoted(value: String, written: String) {
        #expect(LogValue.format(value) == written)
    }
}
