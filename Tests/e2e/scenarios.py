"""Traffic scenarios shared by test_traffic.py (ours <-> ours) and test_interop.py (ours <-> Go).

Each function drives real traffic through an already started Tunnel and
asserts on what came back. Every socket operation has a timeout and every
thread is joined under a deadline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

from support.data import MiB, PatternStream
from support.ports import free_port, url_host
from support.probes import http_probe
from support.processes import ProcessManager
from support.sockets import connect, recv_all, recv_exact
from support.tunnel import Tunnel
from support.waiting import wait_for

# --------------------------------------------------------------------------- HTTP


def start_http_service(pm: ProcessManager, root: Path, host: str = "127.0.0.1"):
    """python3 -m http.server in root (which gets a 5 MiB random file); returns (port, sha256)."""
    root.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(5 * MiB)
    (root / "blob.bin").write_bytes(payload)
    (root / "probe.txt").write_bytes(b"nodepass-probe\n")
    port = free_port(host)
    proc = pm.start("http-service", [sys.executable, "-m", "http.server", str(port), "--bind", host,
                                     "--directory", str(root)])
    probe = http_probe("/probe.txt", b"nodepass-probe\n")
    wait_for(lambda: proc.alive() and probe(host, port), 15, f"http.server on port {port}")
    return port, hashlib.sha256(payload).hexdigest()


def curl_download(tunnel: Tunnel, expected_sha256: str, out_dir: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (Debian package: curl)")
    out = out_dir / "downloaded.bin"
    url = f"http://{url_host(tunnel.host)}:{tunnel.target_port}/blob.bin"
    result = subprocess.run([curl, "--silent", "--show-error", "--fail", "--noproxy", "*", "--max-time", "60",
                             "--output", str(out), url], capture_output=True, timeout=90)
    assert result.returncode == 0, f"curl exited {result.returncode}: {result.stderr.decode(errors='replace')}"
    data = out.read_bytes()
    assert len(data) == 5 * MiB, f"downloaded {len(data)} bytes, expected {5 * MiB}"
    assert hashlib.sha256(data).hexdigest() == expected_sha256, "downloaded file differs from the served one"


# --------------------------------------------------------------------------- half-close


def digest_probe(host: str, port: int, timeout: float = 3.0) -> bool:
    """Readiness probe for the digest service, which answers only after EOF."""
    with connect(host, port, timeout) as s:
        s.sendall(b"ready?")
        s.shutdown(socket.SHUT_WR)
        return recv_all(s, 4096) == hashlib.sha256(b"ready?").hexdigest().encode()


def half_close_digest(tunnel: Tunnel, size: int = MiB) -> None:
    """Send size bytes, shut down writing, and still get the service's SHA-256 of them back."""
    payload = os.urandom(size)
    with connect(tunnel.host, tunnel.target_port, timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s, limit=4096)
    expected = hashlib.sha256(payload).hexdigest().encode()
    assert reply == expected, (f"digest service replied {reply[:100]!r} ({len(reply)} bytes) after half-close, "
                               f"expected {expected!r}")


# --------------------------------------------------------------------------- integrity


class StreamResult:
    def __init__(self, index: int):
        self.index = index
        self.sent_digest: Optional[str] = None
        self.recv_digest: Optional[str] = None
        self.sent_bytes = 0
        self.recv_bytes = 0
        self.error: Optional[str] = None


def run_stream(host: str, port: int, base: bytes, index: int, blocks: int, result: StreamResult,
                io_timeout: float) -> None:
    pattern = PatternStream(base, index)
    try:
        sock = connect(host, port, timeout=io_timeout)
    except OSError as exc:
        result.error = f"connect: {exc!r}"
        return
    send_error: List[str] = []

    def sender() -> None:
        digest = hashlib.sha256()
        try:
            for i in range(blocks):
                block = pattern.block(i)
                digest.update(block)
                sock.sendall(block)
                result.sent_bytes += len(block)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            send_error.append(f"send after {result.sent_bytes} bytes: {exc!r}")
        result.sent_digest = digest.hexdigest()

    thread = threading.Thread(target=sender, name=f"send-{index}", daemon=True)
    thread.start()
    digest = hashlib.sha256()
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    try:
        while True:
            n = sock.recv_into(buf)
            if n == 0:
                break
            digest.update(view[:n])
            result.recv_bytes += n
    except OSError as exc:
        result.error = f"recv after {result.recv_bytes} bytes: {exc!r}"
    finally:
        thread.join(io_timeout)
        sock.close()
    result.recv_digest = digest.hexdigest()
    if send_error and not result.error:
        result.error = send_error[0]


def echo_stream_in_background(host: str, port: int, mib: int, io_timeout: float = 60.0):
    """One stream of `integrity`, started in a thread: returns the thread and its StreamResult, whose byte
    counts show its progress."""
    result = StreamResult(0)
    thread = threading.Thread(target=run_stream, name="stream-0", daemon=True,
                              args=(host, port, os.urandom(MiB), 0, mib, result, io_timeout))
    thread.start()
    return thread, result


def integrity(tunnel: Tunnel, streams: int, mib_per_stream: int, deadline_s: float) -> None:
    """streams parallel connections, each sending mib_per_stream MiB to an echo service while reading the
    echo; SHA-256 of what was sent must equal SHA-256 of what came back, for each stream."""
    # Start from a full pool, so this measures relaying rather than pool growth (and the original Go
    # client's launch-before-ID race cannot hit freshly dialled pool connections).
    tunnel.wait_pool(min(streams, 16), timeout=15)
    base = os.urandom(MiB)
    results = [StreamResult(i) for i in range(streams)]
    threads = [threading.Thread(target=run_stream, name=f"stream-{i}", daemon=True,
                                args=(tunnel.host, tunnel.target_port, base, i, mib_per_stream, results[i], 60.0))
               for i in range(streams)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline_s - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"streams still running after {deadline_s:.0f}s: {stuck}"
    expected = mib_per_stream * MiB
    problems = []
    for r in results:
        if r.error or r.recv_bytes != expected or r.sent_digest != r.recv_digest:
            problems.append(f"stream {r.index}: sent {r.sent_bytes} received {r.recv_bytes} of {expected}, "
                            f"digests {'match' if r.sent_digest == r.recv_digest else 'DIFFER'}, error {r.error}")
    assert not problems, "\n".join(problems)
    total = streams * expected
    print(f"integrity: {total // MiB} MiB echoed over {streams} streams in {elapsed:.1f}s "
          f"({total / MiB / elapsed:.1f} MiB/s each way)")


# --------------------------------------------------------------------------- burst


def burst(tunnel: Tunnel, count: int = 200, io_timeout: float = 30.0) -> None:
    """count connections opened at once; each echoes a unique message after all are open."""
    barrier = threading.Barrier(count, timeout=60)
    outcomes: List[Optional[str]] = [None] * count

    def one(i: int) -> None:
        message = f"burst-{i:03d}-{os.urandom(6).hex()}\n".encode()
        sock = None
        try:
            sock = connect(tunnel.host, tunnel.target_port, timeout=io_timeout)
            barrier.wait()
            sock.sendall(message)
            reply = recv_exact(sock, len(message))
            outcomes[i] = "ok" if reply == message else f"wrong reply {reply!r} for {message!r}"
        except threading.BrokenBarrierError:
            outcomes[i] = "barrier broken (another connection failed to open)"
        except OSError as exc:
            barrier.abort()
            outcomes[i] = f"{exc!r}"
        finally:
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, 2 * io_timeout + 10 - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    failed = {i: o for i, o in enumerate(outcomes) if o != "ok"}
    detail = "; ".join(f"#{i}: {o}" for i, o in list(failed.items())[:10])
    go_drops = tunnel.known_go_client_drops()
    if tunnel.client_is_go and failed:
        # Only hangs the original client itself logged as dropped launches are forgiven.
        timeouts = sum(1 for o in failed.values() if o is not None and "timed out" in o)
        assert timeouts == len(failed) and len(failed) <= go_drops, (
            f"{len(failed)} of {count} burst connections failed, more than the {go_drops} launches the Go client "
            f"dropped itself: {detail}")
        print(f"burst: {len(failed)} of {count} connections hung on launches the Go client dropped ('Get failed'), "
              "a known race of the original client")
    else:
        assert not failed, f"{len(failed)} of {count} burst connections failed: {detail}"
    print(f"burst: {count - len(failed)} connections echoed in {elapsed:.1f}s")
