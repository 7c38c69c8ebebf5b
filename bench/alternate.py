#!/usr/bin/env python3
"""Throughput of two or more tunnel configurations measured in turn, A B A B ..., so that a machine whose
speed drifts during a run (other tenants, frequency) treats them alike; bench.py measures one row after the
other. Each round starts a fresh server + client (v2, a random key) per configuration and pushes SIZE MiB
from the user's side into a sink behind the client over STREAMS connections; it reports the median MiB/s
and the median CPU seconds per GiB of both tunnel processes together.

    python3 bench/alternate.py --nodepass .build/release/nodepass --query "&tls=1" --query "&tls=1&resume=1"
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from callgrind import free_port

MiB = 1 << 20


class Sink:
    """Accepts connections and counts what they carry; `wait(n)` returns once n of them have ended. A
    connection of at most one byte is a probe, counted apart."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.probes = 0
        self.ended = 0
        self.bytes = 0
        self.counts: List[int] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        buffer = bytearray(MiB)
        count = 0
        with conn:
            while (n := conn.recv_into(buffer)) > 0:
                count += n
        with self.changed:
            if count <= 1:
                self.probes += 1
                return
            self.ended += 1
            self.bytes += count
            self.counts.append(count)
            self.changed.notify_all()

    def wait(self, streams: int, timeout: float) -> int:
        with self.changed:
            if not self.changed.wait_for(lambda: self.ended >= streams, timeout):
                raise RuntimeError(f"only {self.ended} of {streams} streams ended within {timeout:.0f}s")
            return self.bytes


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe(port: int) -> None:
    """Sends one byte to the tunnel's user port and waits (at most 2 s) for the tunnel to close it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"?")
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
    except OSError:
        time.sleep(0.2)


def transfer(binary: str, query: str, size: int, streams: int) -> Tuple[float, float]:
    """One transfer through a fresh tunnel into a fresh sink: (MiB/s, tunnel CPU s per GiB)."""
    sink = Sink()
    tunnel, user = free_port(), free_port()
    env = dict(os.environ, NODEPASS_KEY=secrets.token_hex(16))
    procs = [subprocess.Popen([binary, f"server://127.0.0.1:{tunnel}/127.0.0.1:{user}?log=warn{query}"], env=env)]
    try:
        procs.append(subprocess.Popen([binary, f"client://127.0.0.1:{tunnel}/127.0.0.1:{sink.port}?log=warn"],
                                      env=env))
        # Probes (one byte each) until one reaches the sink through the tunnel.
        deadline = time.monotonic() + 30
        while sink.probes == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{query}: no probe went through the tunnel within 30s")
            probe(user)
        block = os.urandom(MiB)
        per_stream = size // streams

        def send() -> None:
            with socket.create_connection(("127.0.0.1", user), timeout=60) as conn:
                for _ in range(per_stream):
                    conn.sendall(block)

        before = sum(cpu_seconds(p.pid) for p in procs)
        started = time.monotonic()
        senders = [threading.Thread(target=send) for _ in range(streams)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        received = sink.wait(streams, 120)
        seconds = time.monotonic() - started
        cpu = sum(cpu_seconds(p.pid) for p in procs) - before
        if received != per_stream * streams * MiB:
            raise RuntimeError(f"{query}: the sink got {received} bytes of {per_stream * streams * MiB} "
                               f"(streams: {sink.counts})")
        return received / MiB / seconds, cpu / (received / (1 << 30))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodepass", default=".build/release/nodepass")
    parser.add_argument("--query", action="append", required=True, help="appended to the server's URL (repeatable)")
    parser.add_argument("--size", type=int, default=1024, help="MiB per transfer")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    results: Dict[str, List[Tuple[float, float]]] = {q: [] for q in args.query}
    for _ in range(args.rounds):
        for query in args.query:
            results[query].append(transfer(args.nodepass, query, args.size, args.streams))
    print(f"| server query | MiB/s (median of {args.rounds}) | tunnel CPU s per GiB (median) | MiB/s range |")
    print("|---|---|---|---|")
    for query, runs in results.items():
        speeds = sorted(r[0] for r in runs)
        print(f"| `{query}` | {statistics.median(speeds):,.0f} | {statistics.median(r[1] for r in runs):.2f} | "
              f"{speeds[0]:,.0f}-{speeds[-1]:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
