/// Version facts of this build.
public enum NodePassVersion {
    /// The program's version.
    public static let current = "0.1.0"
    /// The wire protocols this build speaks.
    public static let protocols = "v1 (NodePass 1.0 compatible, no key, TCP), v2 (with a key, TCP and UDP)"
}
