"""A second, independent implementation of the v2 client side, written in Python from docs/PROTOCOL.md.

The attack tests use it to act as a legitimate client (to record what it sends) and as an attacker (to
replay, to guess, to send garbage). Nothing here is shared with the Swift code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

ALPN = "nodepass/2"
ALPN_DATAGRAMS = "nodepass/2.1"  # v2 with UDP
HELLO, CHALLENGE, AUTHENTICATE, WELCOME, FAILURE, HEARTBEAT, LAUNCH = 0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11
LAUNCH_DATAGRAMS = 0x12
CARRIES_TCP, CARRIES_UDP = 1, 2
DATAGRAM, END = 0x01, 0x02
MAX_DATAGRAM = 65527
FAILURE_REASONS = {1: "authentication failed", 2: "unsupported version", 3: "protocol violation",
                   4: "too many clients", 5: "no key"}


def derive_key(key: str) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", key.encode(), b"nodepass/2 key", 210000, 32)


def mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), "sha256").digest()


def transcript(nc: bytes, ns: bytes, fingerprint: bytes) -> bytes:
    return hashlib.sha256(b"nodepass/2" + nc + ns + fingerprint).digest()


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


def recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_frame(sock) -> Tuple[int, bytes]:
    kind, length = struct.unpack(">BH", recv_exact(sock, 3))
    return kind, recv_exact(sock, length)


def tls_client_context(alpn: bool = True, datagrams: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols([ALPN_DATAGRAMS, ALPN] if datagrams else [ALPN])
    return ctx


def datagram_frame(flow: int, payload: bytes) -> bytes:
    return struct.pack(">BIH", DATAGRAM, flow, len(payload)) + payload


def end_frame(flow: int) -> bytes:
    return struct.pack(">BIH", END, flow, 0)


def read_datagram_frame(sock) -> Tuple[int, int, bytes]:
    """One frame of a datagram carrier: (kind, flow, payload)."""
    kind, flow, length = struct.unpack(">BIH", recv_exact(sock, 7))
    if kind not in (DATAGRAM, END) or length > MAX_DATAGRAM or (kind == END and length):
        raise AssertionError(f"bad carrier frame header: kind {kind}, length {length}")
    return kind, flow, recv_exact(sock, length)


@dataclass
class Session:
    mode: int
    tls: int
    pool_port: int
    heartbeat_ms: int
    session_id: bytes
    data_fingerprint: bytes
    secret: bytes
    transports: Optional[int] = None  # nodepass/2.1 only: CARRIES_TCP | CARRIES_UDP


class ServerRefused(Exception):
    """The server sent a failure frame or closed the connection."""


def parse_parameters(raw: bytes, with_transports: bool = False):
    """(mode, tls, pool port, heartbeat, session ID, fingerprint, transports or None); the length must fit."""
    mode, tls, port, heartbeat = struct.unpack(">BBHI", raw[:8])
    session_id = raw[8:24]
    end = 56 if tls else 24
    fingerprint = raw[24:56] if tls else b""
    transports = None
    if with_transports:
        transports = raw[end]
        assert transports in (1, 2, 3), f"unknown transports byte {transports}"
        end += 1
    assert len(raw) == end, f"parameters of {len(raw)} bytes, expected {end}"
    return mode, tls, port, heartbeat, session_id, fingerprint, transports


class Control:
    """A TLS control connection to a v2 server."""

    def __init__(self, host: str, port: int, alpn: bool = True, timeout: float = 10.0, datagrams: bool = False):
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = tls_client_context(alpn, datagrams).wrap_socket(raw)
        self.alpn = self.sock.selected_alpn_protocol()
        self.sock.settimeout(timeout)
        self.fingerprint = hashlib.sha256(self.sock.getpeercert(binary_form=True)).digest()
        self.sent = []  # the frames this side sent, for replay tests

    def send(self, kind: int, payload: bytes = b"") -> None:
        data = frame(kind, payload)
        self.sent.append(data)
        self.sock.sendall(data)

    def expect(self, kind: int) -> bytes:
        got, payload = read_frame(self.sock)
        if got == FAILURE:
            reason = FAILURE_REASONS.get(payload[0], "?") if payload else "?"
            raise ServerRefused(f"failure: {reason}: {payload[1:].decode(errors='replace')}")
        if got != kind:
            raise AssertionError(f"expected frame type {kind}, got {got}")
        return payload

    def hello(self, nc: Optional[bytes] = None) -> bytes:
        """Sends hello; returns the server nonce from the challenge."""
        self.nc = nc or os.urandom(32)
        self.send(HELLO, bytes([2]) + self.nc)
        challenge = self.expect(CHALLENGE)
        assert challenge[0] == 2 and len(challenge) == 33
        self.ns = challenge[1:]
        return self.ns

    def authenticate(self, k: bytes) -> Session:
        """Proves the key and checks the server's proof."""
        t = transcript(self.nc, self.ns, self.fingerprint)
        self.send(AUTHENTICATE, mac(k, b"client proof", t))
        welcome = self.expect(WELCOME)
        proof, raw = welcome[:32], welcome[32:]
        if not hmac.compare_digest(proof, mac(k, b"server proof", t, raw)):
            raise AssertionError("the server's proof does not verify")
        mode, tls, port, heartbeat, session_id, fingerprint, transports = parse_parameters(
            raw, with_transports=self.alpn == ALPN_DATAGRAMS)
        return Session(mode, tls, port, heartbeat, session_id, fingerprint, mac(k, b"session secret", t, session_id),
                       transports)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def handshake(host: str, port: int, key: str, datagrams: bool = False) -> Tuple[Control, Session]:
    control = Control(host, port, datagrams=datagrams)
    control.hello()
    return control, control.authenticate(derive_key(key))


class PoolConnection:
    """A pool connection: reads the server's nonce; the caller decides what to answer."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.nonce = recv_exact(self.sock, 32)

    def answer(self, session: Session) -> bytes:
        message = session.session_id + mac(session.secret, b"pool client", self.nonce)
        self.sock.sendall(message)
        return message

    def finish(self, session: Session) -> int:
        """After answer(): TLS if the session says so (pinning the fingerprint), then the ID message."""
        sock = self.sock
        if session.tls:
            sock = tls_client_context(alpn=False).wrap_socket(self.sock)
            seen = hashlib.sha256(sock.getpeercert(binary_form=True)).digest()
            assert seen == session.data_fingerprint, "data certificate does not match the pinned fingerprint"
            self.sock = sock
        message = recv_exact(sock, 36)
        pool_id = message[:4]
        assert hmac.compare_digest(message[4:], mac(session.secret, b"pool server", self.nonce, pool_id))
        sock.sendall(mac(session.secret, b"pool confirm", self.nonce, pool_id))
        return struct.unpack(">I", pool_id)[0]

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closes (EOF or reset) without sending anything more."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
