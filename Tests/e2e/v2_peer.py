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
ALPN_SEALED = "nodepass/2.2"  # v2 with UDP and sealed pool connections (tls 3 on the wire)
ALPN_RESUME = "nodepass/2.3"  # 2.2 with resumable relays
TLS_SEALED = 3
RESUMES = 4  # bit 2 of the transports byte under nodepass/2.3
SEAL_OVERHEAD = 12 + 16  # nonce, tag
SEAL_MAX_PLAINTEXT = 65535 - SEAL_OVERHEAD
SEAL_RECORDS_PER_KEY = 1 << 24
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


def tls_client_context(alpn: bool = True, datagrams: bool = False, sealed: bool = False,
                       resume: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        names = [ALPN_DATAGRAMS, ALPN] if datagrams else [ALPN]
        names = [ALPN_SEALED] + names if sealed else names
        ctx.set_alpn_protocols([ALPN_RESUME] + names if resume else names)
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
    resumes: bool = False  # nodepass/2.3: relays resume


class ServerRefused(Exception):
    """The server sent a failure frame or closed the connection."""


def parse_parameters(raw: bytes, with_transports: bool = False, with_resume: bool = False):
    """(mode, tls, pool port, heartbeat, session ID, fingerprint, transports or None, resumes); the length
    must fit."""
    mode, tls, port, heartbeat = struct.unpack(">BBHI", raw[:8])
    session_id = raw[8:24]
    has_certificate = tls in (1, 2)  # 3: sealed, no certificate
    end = 56 if has_certificate else 24
    fingerprint = raw[24:56] if has_certificate else b""
    transports = None
    resumes = False
    if with_transports:
        transports = raw[end]
        if with_resume:
            resumes = bool(transports & RESUMES)
            transports &= ~RESUMES
        assert transports in (1, 2, 3), f"unknown transports byte {transports}"
        end += 1
    assert len(raw) == end, f"parameters of {len(raw)} bytes, expected {end}"
    return mode, tls, port, heartbeat, session_id, fingerprint, transports, resumes


class Control:
    """A TLS control connection to a v2 server."""

    def __init__(self, host: str, port: int, alpn: bool = True, timeout: float = 10.0, datagrams: bool = False,
                 sealed: bool = False, resume: bool = False):
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = tls_client_context(alpn, datagrams, sealed, resume).wrap_socket(raw)
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
        mode, tls, port, heartbeat, session_id, fingerprint, transports, resumes = parse_parameters(
            raw, with_transports=self.alpn in (ALPN_DATAGRAMS, ALPN_SEALED, ALPN_RESUME),
            with_resume=self.alpn == ALPN_RESUME)
        assert tls != TLS_SEALED or self.alpn in (ALPN_SEALED, ALPN_RESUME), "sealed without nodepass/2.2"
        return Session(mode, tls, port, heartbeat, session_id, fingerprint, mac(k, b"session secret", t, session_id),
                       transports, resumes)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def handshake(host: str, port: int, key: str, datagrams: bool = False,
              sealed: bool = False, resume: bool = False) -> Tuple[Control, Session]:
    control = Control(host, port, datagrams=datagrams or sealed or resume, sealed=sealed or resume, resume=resume)
    control.hello()
    return control, control.authenticate(derive_key(key))


class PoolConnection:
    """A pool connection: reads the server's nonce; the caller decides what to answer."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.nonce = recv_exact(self.sock, 32)

    def answer(self, session: Session, client_nonce: Optional[bytes] = None, resume: bool = False) -> bytes:
        """The session ID and the proof (`pool resume` for a connection that resumes a relay); a sealed
        session's client nonce follows (fresh unless given)."""
        label = b"pool resume" if resume else b"pool client"
        message = session.session_id + mac(session.secret, label, self.nonce)
        if session.tls == TLS_SEALED:
            self.client_nonce = client_nonce or os.urandom(32)
            message += self.client_nonce
        self.sock.sendall(message)
        return message

    def finish(self, session: Session) -> int:
        """After answer(): TLS if the session says so (pinning the fingerprint), or the seal, then the ID
        message."""
        sock = self.sock
        if session.tls == TLS_SEALED:
            keys = seal_keys(session.secret, self.nonce, self.client_nonce)
            self.sock = sock = SealedStream(self.sock, send_key=keys[0], receive_key=keys[1])
        elif session.tls:
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
        except (ConnectionResetError, ssl.SSLError, SealBroken):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- sealed pool connections


def seal_keys(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> Tuple[bytes, bytes]:
    """(client to server, server to client) keys of a sealed pool connection."""
    return (mac(secret, b"pool seal client", server_nonce, client_nonce),
            mac(secret, b"pool seal server", server_nonce, client_nonce))


def next_seal_key(key: bytes) -> bytes:
    return hmac.new(key, b"pool seal next key", hashlib.sha256).digest()


def seal_record(key: bytes, number: int, plaintext: bytes) -> bytes:
    """Record `number` of a direction (under the key of its period: the caller gives that key)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert len(plaintext) <= SEAL_MAX_PLAINTEXT
    nonce = bytes(4) + number.to_bytes(8, "big")
    length = (SEAL_OVERHEAD + len(plaintext)).to_bytes(2, "big")
    return length + nonce + AESGCM(key).encrypt(nonce, plaintext, length)


class SealBroken(Exception):
    """A record did not open, came out of order, or the stream ended without its end record."""


class SealedStream:
    """One side of a sealed pool connection, with the socket calls the tests use (sendall, recv)."""

    def __init__(self, sock, send_key: bytes, receive_key: bytes):
        self.raw = sock
        self.send_key, self.send_number = send_key, 0
        self.receive_key, self.receive_number = receive_key, 0
        self.received = b""  # opened bytes not read yet
        self.ended = False

    def settimeout(self, timeout) -> None:
        self.raw.settimeout(timeout)

    def _next_number(self, number: int, key: bytes) -> Tuple[int, bytes]:
        number += 1
        return number, (next_seal_key(key) if number % SEAL_RECORDS_PER_KEY == 0 else key)

    def send_record(self, plaintext: bytes) -> bytes:
        record = seal_record(self.send_key, self.send_number, plaintext)
        self.send_number, self.send_key = self._next_number(self.send_number, self.send_key)
        self.raw.sendall(record)
        return record

    def sendall(self, data: bytes) -> None:
        for start in range(0, len(data), SEAL_MAX_PLAINTEXT):
            self.send_record(data[start:start + SEAL_MAX_PLAINTEXT])

    def send_end(self) -> None:
        self.send_record(b"")

    def _read_record(self) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            head = recv_exact(self.raw, 2)
        except ConnectionError:
            raise SealBroken("the stream ended without its end record") from None
        length = int.from_bytes(head, "big")
        if length < SEAL_OVERHEAD:
            raise SealBroken(f"a record of {length} bytes")
        body = recv_exact(self.raw, length)
        nonce = bytes(4) + self.receive_number.to_bytes(8, "big")
        if body[:12] != nonce:
            raise SealBroken("a record out of order")
        try:
            plaintext = AESGCM(self.receive_key).decrypt(nonce, body[12:], head)
        except InvalidTag:
            raise SealBroken("a record that does not open") from None
        self.receive_number, self.receive_key = self._next_number(self.receive_number, self.receive_key)
        if plaintext:
            self.received += plaintext
        else:
            self.ended = True

    def recv(self, n: int) -> bytes:
        while not self.received and not self.ended:
            self._read_record()
        data, self.received = self.received[:n], self.received[n:]
        return data

    def close(self) -> None:
        try:
            self.raw.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- resumable relays (nodepass/2.3)

RESUME_DATA, RESUME_END, RESUME_ACK, RESUME_CLOSE = 0x01, 0x02, 0x03, 0x04


def resume_key(secret: bytes, pool_nonce: bytes, pool_id: bytes) -> bytes:
    """R = HMAC(S, "resume key" || Np || ID): the key of the relay launched on pool connection ID."""
    return mac(secret, b"resume key", pool_nonce, pool_id)


def resume_request(key: bytes, relay_id: bytes, nonce: bytes, count: int) -> bytes:
    """The client's request on a resume connection whose server nonce is `nonce`."""
    c = count.to_bytes(8, "big")
    return relay_id + c + mac(key, b"resume client", nonce, relay_id, c)


def resume_reply(key: bytes, relay_id: bytes, nonce: bytes, count: int) -> bytes:
    """The server's answer that the relay goes on, having received `count` positions."""
    c = count.to_bytes(8, "big")
    return b"\x00" + c + mac(key, b"resume server", nonce, relay_id, c)


def data_frame(data: bytes) -> bytes:
    return struct.pack(">BH", RESUME_DATA, len(data)) + data


def ack_frame(count: int) -> bytes:
    return struct.pack(">BQ", RESUME_ACK, count)


def read_resume_frame(sock) -> Tuple[int, object]:
    """(type, payload): the bytes of a data frame, the count of an ack, None for end and close."""
    kind = recv_exact(sock, 1)[0]
    if kind == RESUME_DATA:
        (length,) = struct.unpack(">H", recv_exact(sock, 2))
        assert length > 0, "an empty data frame"
        return kind, recv_exact(sock, length)
    if kind == RESUME_ACK:
        return kind, struct.unpack(">Q", recv_exact(sock, 8))[0]
    assert kind in (RESUME_END, RESUME_CLOSE), f"unknown frame type {kind}"
    return kind, None


def read_resume_data(sock) -> bytes:
    """The next data frame's bytes, skipping acks."""
    while True:
        kind, payload = read_resume_frame(sock)
        if kind == RESUME_DATA:
            return payload
        assert kind == RESUME_ACK, f"expected data, got frame type {kind}"
