/// Version facts of this build.
public enum NodePassVersion {
    /// The program's version.
    public static let current = "0.1.0"
    /// Protocol v1 as the start-up line and `--version` describe it.
    public static let v1 = "v1 (NodePass 1.0 compatible, no key, TCP)"
    /// Protocol v2 as the start-up line and `--version` describe it.
    public static let v2 = "v2 (with a key, TCP and UDP)"
    /// The wire protocols this build speaks.
    public static let protocols = "\(v1), \(v2)"

    /// The protocol a tunnel speaks: v2 with a key, else v1.
    public static func spoken(keyed: Bool) -> String {
        keyed ? Self.v2 : Self.v1
    }
}
