import NodePassCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Where a master keeps its state: `master.json` in its state directory, replaced whole on every change
/// (written to a temporary file, flushed to disk, renamed over the old one, the directory flushed), so that
/// a crash or `kill -9` at any moment leaves either the old state or the new one, never a mix. The file
/// holds the API key: the directory is made 0700, the file 0600. A lock on the directory keeps a second
/// master off it.
public struct StateStore: Sendable {
    public let directory: String
    public var file: String { self.directory + "/master.json" }
    private var temporaryFile: String { self.directory + "/master.json.tmp" }

    public init(directory: String) {
        self.directory = directory
    }

    /// The directory from the environment: `STATE_DIRECTORY` (set by systemd for `StateDirectory=`; the
    /// first of several), else `$XDG_STATE_HOME/nodepass`, else `$HOME/.local/state/nodepass`.
    public static func directory(environment: [String: String]) throws(NodePassError) -> String {
        if let systemd = environment["STATE_DIRECTORY"]?.split(separator: ":").first, !systemd.isEmpty {
            return String(systemd)
        }
        if let xdg = environment["XDG_STATE_HOME"], xdg.hasPrefix("/") {
            return xdg + "/nodepass"
        }
        guard let home = environment["HOME"], home.hasPrefix("/") else {
            throw NodePassError(
                .invalidEnvironment,
                "no state directory: set STATE_DIRECTORY (or XDG_STATE_HOME, or HOME) to where the master may keep its state"
            )
        }
        return home + "/.local/state/nodepass"
    }

    /// Makes the directory (and its parents) if missing, and takes its lock for the life of the process;
    /// an error names the directory when it cannot be used or another master holds it.
    public func prepare() throws(NodePassError) {
        var path = ""
        for part in self.directory.split(separator: "/") {
            path += "/" + part
            if mkdir(path, 0o700) != 0 && errno != EEXIST {
                throw self.failure("cannot make the state directory")
            }
        }
        let lock = open(self.directory + "/lock", O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        guard lock >= 0 else { throw self.failure("cannot use the state directory") }
        guard flock(lock, LOCK_EX | LOCK_NB) == 0 else {
            close(lock)
            throw NodePassError(
                .invalidState,
                "another master uses the state directory \(self.directory); give each master its own (STATE_DIRECTORY)"
            )
        }
        // The descriptor stays open (and locked) until the process exits.
    }

    /// The saved state, checked; nil when there is none yet. A damaged file is an error, and stays as it
    /// is for the operator to look at.
    public func load() throws(NodePassError) -> MasterState? {
        let descriptor = open(self.file, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
            if errno == ENOENT { return nil }
            throw self.failure("cannot read the state file \(self.file)")
        }
        defer { close(descriptor) }
        let (bytes, readError) = readToEnd(descriptor, limit: Self.maximumFileSize)
        if let readError {
            errno = readError
            throw self.failure("cannot read the state file \(self.file)")
        }
        guard bytes.count <= Self.maximumFileSize else {
            throw NodePassError(.invalidState, "the state file \(self.file) is larger than any master writes")
        }
        do {
            return try JSONDecoder().decode(MasterState.self, from: Data(bytes)).validated()
        } catch let error as NodePassError {
            throw NodePassError(.invalidState, "the state file \(self.file) is damaged: \(error.message)")
        } catch {
            throw NodePassError(
                .invalidState,
                "the state file \(self.file) is damaged (not the JSON a master writes): move it aside to start afresh"
            )
        }
    }

    /// The largest state file read: 1024 instances of a few KiB each.
    static let maximumFileSize = 16 << 20

    /// Replaces the saved state with `state`, durably.
    public func save(_ state: MasterState) throws(NodePassError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        let data: Data
        do {
            data = try encoder.encode(state)
        } catch {
            throw NodePassError(.invalidState, "cannot encode the state", underlying: error)
        }
        let descriptor = open(self.temporaryFile, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw self.failure("cannot write \(self.temporaryFile)") }
        var written = 0
        let complete: Bool = data.withUnsafeBytes { buffer in
            while written < buffer.count {
                let count = write(descriptor, buffer.baseAddress.map { $0 + written }, buffer.count - written)
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { return false }
                written += count
            }
            return fsync(descriptor) == 0
        }
        let closed = close(descriptor) == 0
        guard complete, closed else { throw self.failure("cannot write \(self.temporaryFile)") }
        guard rename(self.temporaryFile, self.file) == 0 else { throw self.failure("cannot replace \(self.file)") }
        let directory = open(self.directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard directory >= 0 else { throw self.failure("cannot flush the state directory") }
        defer { close(directory) }
        guard fsync(directory) == 0 else { throw self.failure("cannot flush the state directory") }
    }

    private func failure(_ what: String) -> NodePassError {
        let reason = String(cString: strerror(errno))
        return NodePassError(.invalidState, "\(what) (\(self.directory)): \(reason)")
    }
}

/// Reads `descriptor` until its end, or until more than `limit` bytes have come; `error` is the `errno` of a
/// read that failed (the bytes are then those read before it).
func readToEnd(_ descriptor: Int32, limit: Int) -> (bytes: [UInt8], error: Int32?) {
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while bytes.count <= limit {
        let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        guard count >= 0 else { return (bytes, errno) }
        if count == 0 { break }
        bytes += chunk[0..<count]
    }
    return (bytes, nil)
}
