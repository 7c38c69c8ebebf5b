#!/usr/bin/env python3
"""Instructions per new connection, counted by callgrind: repeatable where timings are not.

One side of the tunnel (server or client) runs under `valgrind --tool=callgrind`, the other side and the
target run natively. Sequential connections (connect, 64-byte request, its echo, close) go through the
tunnel twice: a short run and a long one. The difference of the two totals divided by the difference of
the connection counts is the user-space cost of one connection, start-up and pool warm-up excluded.

    python3 bench/callgrind.py --nodepass .build/release/nodepass --side client --protocol v1
    python3 bench/callgrind.py --nodepass OLD --nodepass NEW ...   (several binaries: one table, same run)
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional


def free_port() -> int:
    """A free loopback port below the ephemeral range (an outgoing connection cannot take it meanwhile)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = secrets.randbelow(low - 20000) + 20000
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise RuntimeError(f"timed out waiting for {what}")


class EchoServer:
    """A threaded echo server: the tunnel's target."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)


def round_trip(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"x" * 64)
            received = b""
            while len(received) < 64:
                chunk = conn.recv(64 - len(received))
                if not chunk:
                    return False
                received += chunk
            return received == b"x" * 64
    except OSError:
        return False


def measure(binary: str, other: str, side: str, protocol: str, connections: int, workdir: Path) -> int:
    """The callgrind total (instructions) of `side` after `connections` sequential connections."""
    tunnel, user = free_port(), free_port()
    target = EchoServer()
    key = "" if protocol == "v1" else secrets.token_hex(16) + "@"
    # v2-tlsN[-resume]: that tls mode, with resume=1 on the server's URL when asked.
    query = "?log=warn"
    if protocol != "v1":
        query += "&tls=" + protocol.split("-")[1].removeprefix("tls") + ("&resume=1" if protocol.endswith("-resume") else "")
    server_url = f"server://{key}127.0.0.1:{tunnel}/127.0.0.1:{user}{query}"
    client_url = f"client://{key}127.0.0.1:{tunnel}/127.0.0.1:{target.port}?log=warn"
    out = workdir / f"callgrind.{side}.{connections}.{os.getpid()}.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    env = dict(os.environ, MIN_POOL_CAPACITY="16")
    server_cmd = ([*valgrind, binary] if side == "server" else [other]) + [server_url]
    client_cmd = ([*valgrind, binary] if side == "client" else [other]) + [client_url]
    logs = [open(workdir / f"{name}.log", "wb") for name in ("server", "client")]
    procs: List[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(server_cmd, env=env, stdout=logs[0], stderr=subprocess.STDOUT))
        time.sleep(0.1)  # the client retries anyway; this only spares it a first failed dial
        procs.append(subprocess.Popen(client_cmd, env=env, stdout=logs[1], stderr=subprocess.STDOUT))
        wait_until(lambda: round_trip(user), 120, "the first connection through the tunnel")
        for number in range(connections):
            if not round_trip(user):
                raise RuntimeError(f"connection {number} through the tunnel failed")
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
        target.sock.close()
    match = re.search(rb"^(?:summary|totals): (\d+)", out.read_bytes(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"no total in {out}")
    return int(match.group(1))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodepass", action="append", required=True, help="binary to measure (repeatable)")
    parser.add_argument("--other", help="binary for the side not measured (default: the measured one)")
    parser.add_argument("--side", choices=["server", "client"], action="append")
    parser.add_argument("--protocol", action="append",
                        choices=["v1", "v2-tls0", "v2-tls1", "v2-tls0-resume", "v2-tls1-resume"])
    parser.add_argument("--short", type=int, default=100, help="connections in the short run")
    parser.add_argument("--long", type=int, default=1100, help="connections in the long run")
    parser.add_argument("--repeat", type=int, default=1, help="measurements of each row, alternating the binaries")
    args = parser.parse_args(argv)
    sides = args.side or ["client", "server"]
    protocols = args.protocol or ["v1", "v2-tls0"]
    # How many pool connections the server writes to before their launch (and so how much bookkeeping a
    # connection costs) depends on timing: repeat, alternating the binaries, and report the median and range.
    print("| binary | protocol | side | instructions per connection (median) | range |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="np-callgrind-") as tmp:
        workdir = Path(tmp)
        for protocol in protocols:
            for side in sides:
                results: dict = {binary: [] for binary in args.nodepass}
                for _ in range(max(1, args.repeat)):
                    for binary in args.nodepass:
                        other = args.other or binary
                        short = measure(binary, other, side, protocol, args.short, workdir)
                        long = measure(binary, other, side, protocol, args.long, workdir)
                        results[binary].append((long - short) / (args.long - args.short) / 1000)
                for binary, values in results.items():
                    values.sort()
                    median = values[len(values) // 2]
                    print(f"| {binary} | {protocol} | {side} | {median:.1f} k | {values[0]:.1f}-{values[-1]:.1f} k |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
