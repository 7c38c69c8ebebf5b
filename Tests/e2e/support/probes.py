"""Readiness probes: one full round trip of a service's protocol, True when the expected answer came back."""

from __future__ import annotations

import secrets
from typing import Callable

from .data import MiB
from .ports import url_host
from .sockets import connect, recv_all, recv_exact


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
