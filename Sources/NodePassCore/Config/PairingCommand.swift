/// What a server with a key logs once at start, so that pairing a client is a copy and paste.
public enum PairingCommand {
    /// The line to log: the client's command with this server's `host` (as clients reach it) and tunnel
    /// `port`. The key stays out of it (it never appears in a log; on the client's machine it goes in
    /// `NODEPASS_KEY`, out of the process list), and the client's TARGET is for the reader to fill in.
    /// `guessed`: the server listens on every address and `host` is only this machine's first one.
    public static func message(host: String, port: Int, mode: TunnelMode, guessed: Bool = false) -> String {
        let target =
            mode == .forward ? "where users connect on that machine" : "the service, as that machine reaches it"
        let address = guessed ? "; behind NAT, the public address instead of \(host)" : ""
        return """
            to pair a client, set NODEPASS_KEY to this server's key on its machine and run (TARGET: \(target)\
            \(address)): nodepass "client://\(HostPort(host: host, port: port))/TARGET_HOST:PORT"
            """
    }

    /// A fresh key for `nodepass key`: 16 random bytes in hex (32 characters, as `openssl rand -hex 16`).
    public static func freshKey() -> String {
        randomHex(bytes: 16)
    }
}
