"""Separate hosts for the end-to-end tests: network namespaces joined by veth pairs, which the test makes and
removes itself (root only; `ip` from Debian's iproute2).

    user (this process) --10.N.1.0/24-- server --10.N.2.0/24-- client --10.N.3.0/24-- service

The user is the test process's own namespace; the other three are new ones. Only neighbours reach each other
(no routing): the user reaches the server's front address, the client the server's back address, the client
the service. The link between server and client can be taken down and the client moved to a new address.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from typing import List, Sequence

import pytest


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Hosts:
    """Four hosts in a row; see the module's description. Use as a context manager, or call `remove`."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        net = 100 + secrets.randbelow(150)
        self.server_ns = f"np-{tag}-server"
        self.client_ns = f"np-{tag}-client"
        self.service_ns = f"np-{tag}-service"
        # Interface names (at most 15 characters): the user's end, then each namespace's ends.
        self.user_if = f"np{tag}user"
        self.server_front_if, self.server_back_if = f"np{tag}sf", f"np{tag}sb"
        self.client_front_if, self.client_back_if = f"np{tag}cf", f"np{tag}cb"
        self.service_if = f"np{tag}v"
        self.user_addr = f"10.{net}.1.1"
        self.server_front = f"10.{net}.1.2"
        self.server_back = f"10.{net}.2.1"
        self.client_front = f"10.{net}.2.2"
        self.client_front_moved = f"10.{net}.2.3"
        self.client_back = f"10.{net}.3.1"
        self.service_addr = f"10.{net}.3.2"
        self._made: List[str] = []

    def make(self) -> "Hosts":
        try:
            for ns in (self.server_ns, self.client_ns, self.service_ns):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            self._pair(None, self.user_if, self.user_addr, self.server_ns, self.server_front_if, self.server_front)
            self._pair(self.server_ns, self.server_back_if, self.server_back, self.client_ns, self.client_front_if,
                       self.client_front)
            self._pair(self.client_ns, self.client_back_if, self.client_back, self.service_ns, self.service_if,
                       self.service_addr)
        except Exception:
            self.remove()
            raise
        return self

    def _pair(self, left_ns, left_if: str, left_addr: str, right_ns: str, right_if: str, right_addr: str) -> None:
        """A veth pair between two hosts (left_ns None: this process's namespace), each end addressed in a
        /24 and up."""
        _ip("link", "add", left_if, "type", "veth", "peer", "name", right_if)
        if left_ns is not None:
            _ip("link", "set", left_if, "netns", left_ns)
        _ip("link", "set", right_if, "netns", right_ns)
        for ns, name, addr in ((left_ns, left_if, left_addr), (right_ns, right_if, right_addr)):
            prefix = ["-n", ns] if ns else []
            _ip(*prefix, "addr", "add", f"{addr}/24", "dev", name)
            _ip(*prefix, "link", "set", name, "up")

    def remove(self) -> None:
        """Deletes the namespaces; their veth ends, and so the pairs, go with them."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
        self._made = []
        subprocess.run(["ip", "link", "del", self.user_if], capture_output=True, timeout=15)

    def __enter__(self) -> "Hosts":
        return self.make()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- running things

    @staticmethod
    def inside(ns: str, args: Sequence[str]) -> List[str]:
        """`args` run in namespace `ns` (`ip netns exec` replaces itself with the command: same process)."""
        return ["ip", "netns", "exec", ns, *args]

    def run(self, ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.inside(ns, args), capture_output=True, text=True, timeout=timeout, check=True)

    # ---- faults

    def set_link(self, up: bool) -> None:
        """Takes the link between server and client down, or brings it up again (the client's end)."""
        _ip("-n", self.client_ns, "link", "set", self.client_front_if, "up" if up else "down")

    def move_client(self) -> None:
        """The client's front address changes: the new one is added and the old one removed, as when a
        mobile host changes networks. Connections bound to the old address are left dead."""
        # The new address is a secondary one in the same /24: promoted when the old (primary) one goes,
        # instead of going with it.
        self.run(self.client_ns, "sysctl", "-q", "-w", f"net.ipv4.conf.{self.client_front_if}.promote_secondaries=1")
        _ip("-n", self.client_ns, "addr", "add", f"{self.client_front_moved}/24", "dev", self.client_front_if)
        _ip("-n", self.client_ns, "addr", "del", f"{self.client_front}/24", "dev", self.client_front_if)


def needs_namespaces() -> None:
    """Skips the test when namespaces cannot be made here."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("ip not installed (Debian package: iproute2)")
    probe = f"np-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=15)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=15)


def port_in_namespace() -> int:
    """A port for a listener in a fresh namespace: nothing else listens there, so any port below the
    ephemeral range (from 32768) does."""
    return 10_000 + secrets.randbelow(20_000)
