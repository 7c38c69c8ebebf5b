"""Loopback addresses and free ports."""

from __future__ import annotations

import secrets
import socket


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
