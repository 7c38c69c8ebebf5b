#!/usr/bin/env python3
"""Many tunnels in one master against the same tunnels as separate processes, side by side in one run.

For N instances (N/2 server and client pairs, protocol v2, each pair in front of its own small TCP echo
service), it measures:
- the master: memory (RSS and PSS) idle, then with the N instances running; the time from the first
  POST /instances to every instance reporting "running" and a byte echoed through every pair; the time for
  a restarted master to bring all of them back;
- the same N tunnels as N separate nodepass processes: their memory (summed PSS and RSS) and the time until
  a byte is echoed through every pair.

Usage: bench/master_scale.py --nodepass .build/release/nodepass [--instances 100] [--out-md FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import List

from udpbench import free_port, wait_for as wait

KEY = "0123456789abcdef0123456789abcdef"
ENV = dict(os.environ, SERVICE_COOLDOWN="200ms", REPORT_INTERVAL="1s")


def memory_kib(pids: List[int]) -> tuple:
    """Summed (RSS, PSS) in KiB."""
    rss = pss = 0
    for pid in pids:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        rss += int(re.search(r"^Rss:\s+(\d+)", rollup, re.M).group(1))
        pss += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
    return rss, pss


def echo_server(stop: threading.Event) -> int:
    """A TCP echo service on a free port, in a thread."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def echoes(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


def all_echo(ports: List[int]) -> bool:
    return all(echoes(p) for p in ports)


def pair_urls(service_port: int) -> tuple:
    tunnel, users = free_port(), free_port()
    server = f"server://{KEY}@127.0.0.1:{tunnel}/127.0.0.1:{users}?log=warn"
    client = f"client://{KEY}@127.0.0.1:{tunnel}/127.0.0.1:{service_port}?log=warn"
    return server, client, users


class Master:
    def __init__(self, binary: str, state: str, port: int):
        self.log = open(Path(state) / "master.log", "ab")
        self.proc = subprocess.Popen([binary, f"master://127.0.0.1:{port}?log=info"], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(ENV, STATE_DIRECTORY=state))
        self.base = f"http://127.0.0.1:{port}/api/v1"
        log_path = Path(state) / "master.log"
        wait(lambda: "master started" in log_path.read_text(), 30, "the master")
        self.key = re.findall(r"np\.key=([0-9a-f]{32})", log_path.read_text())[-1]

    def call(self, method: str, path: str, body=None):
        request = urllib.request.Request(self.base + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None)
        request.add_header("X-API-Key", self.key)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def all_running(self) -> bool:
        return all(i["status"] == "running" for i in self.call("GET", "/instances")[1:])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodepass", required=True)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--out-md")
    args = parser.parse_args()
    pairs = args.instances // 2
    stop = threading.Event()
    services = [echo_server(stop) for _ in range(pairs)]
    rows = []

    with tempfile.TemporaryDirectory() as state:
        port = free_port()
        master = Master(args.nodepass, state, port)
        time.sleep(1)
        idle_rss, idle_pss = memory_kib([master.proc.pid])
        start = time.monotonic()
        user_ports = []
        for service in services:
            server, client, users = pair_urls(service)
            master.call("POST", "/instances", {"url": server})
            master.call("POST", "/instances", {"url": client})
            user_ports.append(users)
        wait(master.all_running, 120, "every instance running")
        wait(lambda: all_echo(user_ports), 120, "an echo through every pair")
        started = time.monotonic() - start
        time.sleep(3)  # let the pools fill and settle before measuring memory
        rss, pss = memory_kib([master.proc.pid])
        master.stop()
        master = Master(args.nodepass, state, port)
        start = time.monotonic()
        wait(lambda: all_echo(user_ports), 120, "an echo through every pair after a restart")
        resumed = time.monotonic() - start
        master.stop()
        rows.append(("one master", rss, pss, idle_rss, idle_pss, started, resumed))

    processes = []
    try:
        start = time.monotonic()
        user_ports = []
        for service in services:
            server, client, users = pair_urls(service)
            for url in (server, client):
                processes.append(subprocess.Popen([args.nodepass, url], stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL, env=ENV))
            user_ports.append(users)
        wait(lambda: all_echo(user_ports), 120, "an echo through every pair (processes)")
        started = time.monotonic() - start
        time.sleep(3)
        rss, pss = memory_kib([p.pid for p in processes])
        rows.append((f"{len(processes)} processes", rss, pss, None, None, started, None))
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(30)
        stop.set()

    n = args.instances
    lines = [f"| {n} instances ({pairs} v2 tls=1 pairs, idle pools) | RSS MiB | PSS MiB | PSS per instance KiB | "
             f"start to traffic s | restart to traffic s |", "|---|---|---|---|---|---|"]
    base_pss = rows[1][2]
    for name, rss, pss, idle_rss, idle_pss, started, resumed in rows:
        per = (pss - (idle_pss or 0)) / n
        extra = f" (idle master: {idle_rss / 1024:.1f} RSS, {idle_pss / 1024:.1f} PSS)" if idle_pss else ""
        lines.append(f"| {name}{extra} | {rss / 1024:.1f} | {pss / 1024:.1f} (x{pss / base_pss:.2f}) | {per:.0f} | "
                     f"{started:.1f} | {'' if resumed is None else f'{resumed:.1f}'} |")
    text = "\n".join(lines)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")


if __name__ == "__main__":
    main()
