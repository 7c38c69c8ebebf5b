"""Process, port and tunnel helpers for the NodePass end-to-end tests.

No fixed sleeps are used for synchronisation: every wait polls for an event
(a listening socket, an established connection, a successful round trip)
under an explicit deadline with a short, growing backoff.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
HELPER_SERVERS = HERE / "helpers" / "servers.py"

# Environment every NodePass process gets unless a test overrides it.
DEFAULT_ENV = {
    "SERVICE_COOLDOWN": "500ms",
    "REPORT_INTERVAL": "1s",
    "SHUTDOWN_TIMEOUT": "3s",
}
SHUTDOWN_TIMEOUT_S = 3.0

MiB = 1024 * 1024
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------- Go original

_GO_BINARIES: set = set()


def register_go_binary(path: str) -> None:
    """Mark path as the original Go NodePass 1.0.1 (conftest does this for the peer and, with
    NODEPASS_IS_GO=1, for the binary under test)."""
    _GO_BINARIES.add(os.path.realpath(path))


def is_go_binary(path: str) -> bool:
    return os.path.realpath(path) in _GO_BINARIES


# --------------------------------------------------------------------------- waiting


class WaitTimeout(AssertionError):
    """A bounded wait ended before its event happened (fails the test)."""


class ProcessDied(AssertionError):
    """A process that a wait depends on has exited: waiting longer is pointless."""


def wait_for(predicate: Callable[[], object], timeout: float, what: str, first_delay: float = 0.02,
             max_delay: float = 0.25) -> object:
    """Call predicate until it returns a truthy value or timeout seconds pass.

    The short sleeps between attempts are backoff for polling an event, never
    a synchronisation by themselves.
    """
    deadline = time.monotonic() + timeout
    delay = first_delay
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ProcessDied:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)


# --------------------------------------------------------------------------- ports


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


_given_ports: set = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (32768 unless configured)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, below the ephemeral range: a port from `bind(0)` can be taken by
    any outgoing connection (a pool connection of the previous test) before the process under test binds
    it. Never the same port twice in a session."""
    low = min(_ephemeral_low(), 65536)
    rng = secrets.SystemRandom()
    if low > 11000:
        for _ in range(200):
            port = rng.randrange(10000, low)
            if port in _given_ports:
                continue
            with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _given_ports.add(port)
            return port
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.settimeout(timeout)
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    got = 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_all(sock: socket.socket, limit: int = 64 * MiB) -> bytes:
    chunks = []
    got = 0
    while got <= limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- /proc sockets

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str


def tcp_sockets(pid: int) -> List[TcpSocket]:
    """TCP sockets (v4 and v6) owned by process pid, read from /proc."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[9] not in inodes:
                continue
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            found.append(TcpSocket(local_port, remote_port, parts[3]))
    return found


def is_listening(pid: int, port: int) -> bool:
    return any(s.state == TCP_LISTEN and s.local_port == port for s in tcp_sockets(pid))


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process whose stdout and stderr go to files."""

    def __init__(self, name: str, args: Sequence[str], popen: subprocess.Popen, stdout_path: Path,
                 stderr_path: Path, files):
        self.name = name
        self.args = list(args)
        self.popen = popen
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self._files = files

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL and reap (bounded)."""
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after grace seconds; always reaps and closes the log files."""
        try:
            if self.alive():
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=10)
        finally:
            for f in self._files:
                try:
                    f.close()
                except OSError:
                    pass

    def output(self) -> str:
        text = ""
        for path in (self.stdout_path, self.stderr_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return ANSI.sub("", text)

    def tail(self, lines: int = 60) -> str:
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            try:
                content = ANSI.sub("", path.read_text(errors="replace")).splitlines()
            except OSError:
                content = ["<unreadable>"]
            shown = content[-lines:]
            skipped = len(content) - len(shown)
            head = f"--- {self.name} (pid {self.pid}, rc {self.popen.poll()}) {label}: {path}"
            if skipped:
                head += f" [last {len(shown)} of {len(content)} lines]"
            parts.append(head + "\n" + "\n".join(shown))
        return "\n".join(parts)


class ProcessManager:
    """Starts processes for one test and stops all of them at its end."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.procs: List[Proc] = []
        self._names: Dict[str, int] = {}

    def start(self, name: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None) -> Proc:
        count = self._names.get(name, 0) + 1
        self._names[name] = count
        unique = name if count == 1 else f"{name}-{count}"
        out_path = self.log_dir / f"{unique}.stdout.log"
        err_path = self.log_dir / f"{unique}.stderr.log"
        out = open(out_path, "wb")
        err = open(err_path, "wb")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        popen = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=full_env,
                                 cwd=cwd, start_new_session=True)
        proc = Proc(unique, args, popen, out_path, err_path, [out, err])
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass

    def tails(self, lines: int = 60) -> str:
        return "\n\n".join(p.tail(lines) for p in self.procs)

    # ---- helper services

    def start_helper(self, mode: str, host: str = "127.0.0.1") -> "Service":
        """Start helpers/servers.py MODE on a free port and wait until it accepts."""
        port = free_port(host)
        proc = self.start(f"{mode}-service", [sys.executable, str(HELPER_SERVERS), mode, "--host", host,
                                               "--port", str(port)])
        def ready() -> bool:
            if not proc.alive():
                raise ProcessDied(f"{mode} service exited with code {proc.returncode()}")
            return is_listening(proc.pid, port)

        wait_for(ready, 15, f"{mode} service on port {port}")
        return Service(host, port, proc)


@dataclass
class Service:
    host: str
    port: int
    proc: Optional[Proc] = None


# --------------------------------------------------------------------------- probes


def echo_probe(host: str, port: int, timeout: float = 3.0) -> bool:
    """One full echo round trip of a unique token."""
    token = b"probe-" + secrets.token_hex(8).encode() + b"\n"
    with connect(host, port, timeout) as s:
        s.sendall(token)
        return recv_exact(s, len(token)) == token


def redis_probe(host: str, port: int, timeout: float = 3.0) -> bool:
    with connect(host, port, timeout) as s:
        s.sendall(b"PING\r\n")
        return recv_exact(s, 7) == b"+PONG\r\n"


def http_probe(path: str, expected: bytes) -> Callable[[str, int], bool]:
    def probe(host: str, port: int, timeout: float = 3.0) -> bool:
        request = f"GET {path} HTTP/1.0\r\nHost: {url_host(host)}:{port}\r\n\r\n".encode()
        with connect(host, port, timeout) as s:
            s.sendall(request)
            response = recv_all(s, limit=1 * MiB)
        head, _, body = response.partition(b"\r\n\r\n")
        return head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n", 1)[0] and body == expected

    return probe


# --------------------------------------------------------------------------- tunnel


class Tunnel:
    """A NodePass server + client pair in front of a service.

    user -> server TARGET (self.target_port) -> pool -> client -> service_host:service_port
    """

    def __init__(self, pm: ProcessManager, server_bin: str, client_bin: str, service_port: int, *,
                 host: str = "127.0.0.1", service_host: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, server_env: Optional[Dict[str, str]] = None,
                 client_env: Optional[Dict[str, str]] = None, log: str = "debug",
                 probe: Callable[[str, int], bool] = echo_probe):
        self.pm = pm
        self.server_bin = server_bin
        self.client_bin = client_bin
        self.host = host
        self.service_host = service_host or host
        self.service_port = service_port
        self.tunnel_port = free_port(host)
        self.target_port = free_port(host)
        self.log = log
        # Extra query parameters ("&name=value...") appended to each side's URL.
        self.server_query = ""
        self.client_query = ""
        # The v2 key of each side (None: v1).
        self.server_key: Optional[str] = None
        self.client_key: Optional[str] = None
        base = dict(DEFAULT_ENV)
        base.update(env or {})
        self.server_env = dict(base, **(server_env or {}))
        self.client_env = dict(base, **(client_env or {}))
        self.probe = probe
        self.server: Optional[Proc] = None
        self.client: Optional[Proc] = None
        self.server_is_go = is_go_binary(server_bin)
        self.client_is_go = is_go_binary(client_bin)

    # ---- URLs

    def use_key(self, key: str) -> "Tunnel":
        """Both sides speak v2 with this key."""
        self.server_key = key
        self.client_key = key
        return self

    @property
    def server_url(self) -> str:
        h = url_host(self.host)
        key = f"{self.server_key}@" if self.server_key else ""
        return f"server://{key}{h}:{self.tunnel_port}/{h}:{self.target_port}?log={self.log}{self.server_query}"

    @property
    def client_url(self) -> str:
        key = f"{self.client_key}@" if self.client_key else ""
        return (f"client://{key}{url_host(self.host)}:{self.tunnel_port}/"
                f"{url_host(self.service_host)}:{self.service_port}?log={self.log}{self.client_query}")

    # ---- processes

    def start_server(self, wait_listening: bool = True, timeout: float = 20.0) -> Proc:
        self.server = self.pm.start("server", [self.server_bin, self.server_url], env=self.server_env)
        if wait_listening:
            self.wait_server_listening(timeout)
        return self.server

    def start_client(self) -> Proc:
        self.client = self.pm.start("client", [self.client_bin, self.client_url], env=self.client_env)
        return self.client

    def start(self, timeout: float = 30.0) -> "Tunnel":
        """Server, then client; returns once a probe round trip has succeeded."""
        deadline = time.monotonic() + timeout
        self.start_server(timeout=timeout)
        self.start_client()
        self.wait_client_connected(max(1.0, deadline - time.monotonic()))
        self.wait_ready(max(1.0, deadline - time.monotonic()))
        return self

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.kill9()

    def kill_client(self) -> None:
        assert self.client is not None
        self.client.kill9()

    def stop(self) -> None:
        for proc in (self.client, self.server):
            if proc is not None:
                proc.stop()

    # ---- events

    def _assert_alive(self, proc: Optional[Proc], role: str) -> None:
        if proc is not None and not proc.alive():
            raise ProcessDied(f"{role} exited early with code {proc.returncode()}")

    def wait_server_listening(self, timeout: float = 20.0) -> None:
        """The server process listens on its tunnel port (checked in /proc, no connection made:
        the original server takes the first connection on that port as its client)."""

        def ready() -> bool:
            self._assert_alive(self.server, "server")
            return is_listening(self.server.pid, self.tunnel_port)

        wait_for(ready, timeout, f"server listening on tunnel port {self.tunnel_port}")

    def client_connections(self) -> List[TcpSocket]:
        assert self.client is not None
        return [s for s in tcp_sockets(self.client.pid) if s.state == TCP_ESTABLISHED]

    def wait_client_connected(self, timeout: float = 20.0) -> None:
        """The client holds an established control connection to the tunnel port and at least one
        other (pool) connection. Users must not reach the original server before that: it crashes."""

        def connected() -> bool:
            self._assert_alive(self.client, "client")
            self._assert_alive(self.server, "server")
            remote_ports = {s.remote_port for s in self.client_connections()}
            return self.tunnel_port in remote_ports and len(remote_ports - {self.tunnel_port}) >= 1

        wait_for(connected, timeout, "client control + pool connections to the server")

    def pool_connections(self) -> int:
        """Established client connections other than control and service dials: its pool."""
        others = {self.tunnel_port, self.service_port}
        return sum(1 for s in self.client_connections() if s.remote_port not in others)

    def wait_pool(self, count: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.pool_connections() >= count, timeout, f"{count} pool connections from the client")

    def known_go_client_drops(self) -> int:
        """How many launches the original Go client dropped with "Get failed": it registers a pool
        connection's ID only after reading it, so a launch that beats that read is lost and the user
        hangs (a race of the original client, v1.0.1)."""
        if not self.client_is_go or self.client is None:
            return 0
        return self.client.output().count("Get failed")

    def wait_ready(self, timeout: float = 20.0, probe: Optional[Callable[[str, int], bool]] = None) -> None:
        """Retry a full round trip through the tunnel until it succeeds."""
        probe = probe or self.probe

        def attempt() -> bool:
            self._assert_alive(self.server, "server")
            self._assert_alive(self.client, "client")
            return probe(self.host, self.target_port)

        wait_for(attempt, timeout, f"a round trip through the tunnel (target port {self.target_port})",
                 first_delay=0.05, max_delay=0.5)


# --------------------------------------------------------------------------- data


class PatternStream:
    """Cheap pseudo-random data: a 1 MiB random base block, rotated by a per-block offset
    and prefixed with (stream, block) counters, so every block of every stream differs."""

    BLOCK = MiB

    def __init__(self, base: bytes, stream: int):
        assert len(base) == self.BLOCK
        self.base = base
        self.stream = stream

    def block(self, index: int) -> bytes:
        k = (index * 7919 + self.stream * 104729 + 1) % self.BLOCK
        header = self.stream.to_bytes(8, "big") + index.to_bytes(8, "big")
        rotated = self.base[k:] + self.base[:k]
        return header + rotated[len(header):]
