"""A NodePass server + client pair in front of a service, and the environment NodePass processes get."""

from __future__ import annotations

import re
import time
from typing import Callable, Dict, List, Optional

from .go_original import is_go_binary
from .ports import free_port, url_host
from .probes import echo_probe
from .processes import Proc, ProcessManager
from .procfs import TCP_ESTABLISHED, TcpSocket, is_listening, tcp_sockets
from .waiting import ProcessDied, wait_for

# Environment every NodePass process gets unless a test overrides it.
DEFAULT_ENV = {
    "SERVICE_COOLDOWN": "500ms",
    "REPORT_INTERVAL": "1s",
    "SHUTDOWN_TIMEOUT": "3s",
}
SHUTDOWN_TIMEOUT_S = 3.0


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


def pool_port(tunnel: Tunnel) -> int:
    """The pool port the tunnel's server announced in its start line."""

    def announced():
        match = re.search(r"server started .*np\.pool=(\d+)", tunnel.server.output())
        return int(match.group(1)) if match else None

    return wait_for(announced, 10, "the server's start line with its pool port")
