#!/usr/bin/env python3
"""Soak run: hours of connection churn through NodePass, watching memory and file descriptors.

    python3 bench/soak.py [--minutes 30] [--rate 500] [--held 1000] [--protocols v1,v2] [--nodepass PATH]

For each protocol it starts a NodePass server and client on loopback (v2 with a random key and tls=1) in
front of one echo service, holds HELD connections open through each tunnel, and opens, uses (a 64-byte
echo) and closes RATE connections a second through each, all at once (at most 1000 of them open at a
time per tunnel: a slot that finds them all busy is counted as missed). Every 10 s it records RSS and the
number of open file descriptors of every NodePass process. At the end it prints a Markdown table and
writes JSON: RSS drift after warm-up (the first 20 % of the run) is (last - first) / first of the
warm samples, and the spread is (max - min) / min.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = b"s" * 64
MAX_IN_FLIGHT = 1000  # churn round trips open at once, per tunnel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> tuple:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def echo_server(port: int):
    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # a peer that went away, or the end of the run
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)


class Tunnel:
    def __init__(self, name: str, binary: str, service_port: int, key: str | None, logs: Path):
        self.name = name
        self.tunnel_port, self.user_port = free_port(), free_port()
        prefix = f"{key}@" if key else ""
        query = "?log=warn" + ("&tls=1" if key else "")
        env = dict(os.environ, SEMAPHORE_LIMIT="8192", MAX_POOL_CAPACITY="1024")
        self.procs = []
        for role, url in (("server", f"server://{prefix}127.0.0.1:{self.tunnel_port}/127.0.0.1:{self.user_port}{query}"),
                          ("client", f"client://{prefix}127.0.0.1:{self.tunnel_port}/127.0.0.1:{service_port}?log=warn")):
            log = open(logs / f"{name}-{role}.log", "wb")
            self.procs.append((role, subprocess.Popen([binary, url], stdout=log, stderr=log, env=env,
                                                      stdin=subprocess.DEVNULL)))
            if role == "server":
                time.sleep(0.5)  # the server binds before the client's first attempt (startup, not a sync point)
        self.ok = self.failed = self.missed = 0

    def stop(self):
        for _, p in self.procs:
            p.send_signal(signal.SIGTERM)
        for _, p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def one_round_trip(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        writer.write(PAYLOAD)
        await writer.drain()
        ok = await asyncio.wait_for(reader.readexactly(len(PAYLOAD)), 10) == PAYLOAD
        writer.close()
        return ok
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False


async def wait_ready(tunnel: Tunnel, deadline: float):
    while time.monotonic() < deadline:
        if await one_round_trip(tunnel.user_port):
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"{tunnel.name}: no round trip through the tunnel within the start deadline")


async def hold(tunnel: Tunnel, count: int, stop: asyncio.Event):
    held = []
    for _ in range(count):
        try:
            held.append(await asyncio.open_connection("127.0.0.1", tunnel.user_port))
        except OSError:
            tunnel.failed += 1
    while not stop.is_set():  # a byte through every held connection each 10 s keeps them in use
        for reader, writer in held:
            try:
                writer.write(b"h")
                await writer.drain()
                await asyncio.wait_for(reader.readexactly(1), 10)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                tunnel.failed += 1
        try:
            await asyncio.wait_for(stop.wait(), 10)
        except asyncio.TimeoutError:
            pass
    for _, writer in held:
        writer.close()
    return len(held)


async def churn(tunnel: Tunnel, rate: int, stop: asyncio.Event):
    pending = set()
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += interval
        if len(pending) >= MAX_IN_FLIGHT:
            # The tunnel (or this machine) is behind: count the slot as missed rather than pile up sockets.
            tunnel.missed += 1
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            continue
        task = asyncio.ensure_future(one_round_trip(tunnel.user_port))
        pending.add(task)

        def done(t, tunnel=tunnel):
            pending.discard(t)
            if t.result():
                tunnel.ok += 1
            else:
                tunnel.failed += 1

        task.add_done_callback(done)
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    if pending:
        await asyncio.wait(pending, timeout=15)


async def main_async(a) -> int:
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    service_port = free_port()
    server = await echo_server(service_port)
    tunnels = []
    for protocol in a.protocols.split(","):
        key = secrets.token_hex(16) if protocol == "v2" else None
        tunnels.append(Tunnel(protocol, a.nodepass, service_port, key, logs))
    stop = asyncio.Event()
    samples = []
    started = time.monotonic()
    try:
        for t in tunnels:
            await wait_ready(t, time.monotonic() + 30)
        holders = [asyncio.ensure_future(hold(t, a.held, stop)) for t in tunnels]
        churners = [asyncio.ensure_future(churn(t, a.rate, stop)) for t in tunnels]
        end = started + a.minutes * 60
        while time.monotonic() < end:
            await asyncio.sleep(min(10, max(0.0, end - time.monotonic())))
            row = {"t": round(time.monotonic() - started)}
            for t in tunnels:
                for role, p in t.procs:
                    if p.poll() is not None:
                        raise SystemExit(f"{t.name} {role} exited with {p.returncode}")
                    rss, fds = proc_status(p.pid)
                    row[f"{t.name}.{role}.rss_kib"] = rss
                    row[f"{t.name}.{role}.fds"] = fds
                row[f"{t.name}.ok"], row[f"{t.name}.failed"], row[f"{t.name}.missed"] = t.ok, t.failed, t.missed
            samples.append(row)
            print(json.dumps(row), flush=True)
        stop.set()
        await asyncio.gather(*holders, *churners)
    finally:
        stop.set()
        for t in tunnels:
            t.stop()
        server.close()

    warm = [s for s in samples if s["t"] >= a.minutes * 60 * 0.2] or samples
    summary = {"minutes": a.minutes, "rate_per_tunnel": a.rate, "held_per_tunnel": a.held, "tunnels": {}}
    lines = [f"### Soak: {a.minutes} min, {a.rate} new connections/s and {a.held} held per tunnel",
             "", "| process | RSS first warm (MiB) | RSS last (MiB) | drift | spread | fds min-max | round trips ok / failed / missed |",
             "|---|---|---|---|---|---|---|"]
    for t in tunnels:
        for role, _ in t.procs:
            rss = [s[f"{t.name}.{role}.rss_kib"] for s in warm]
            fds = [s[f"{t.name}.{role}.fds"] for s in warm]
            drift = (rss[-1] - rss[0]) / rss[0]
            spread = (max(rss) - min(rss)) / min(rss)
            summary["tunnels"][f"{t.name}.{role}"] = {"rss_first_kib": rss[0], "rss_last_kib": rss[-1],
                                                      "drift": drift, "spread": spread,
                                                      "fds_min": min(fds), "fds_max": max(fds)}
            lines.append(f"| {t.name} {role} | {rss[0] / 1024:.1f} | {rss[-1] / 1024:.1f} | {drift:+.1%} | "
                         f"{spread:.1%} | {min(fds)}-{max(fds)} | {t.ok:,} / {t.failed:,} / {t.missed:,} |")
        summary["tunnels"][t.name] = {"ok": t.ok, "failed": t.failed, "missed": t.missed}
    Path(a.out_json).write_text(json.dumps({"summary": summary, "samples": samples}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=int, default=500, help="new connections per second, per tunnel")
    ap.add_argument("--held", type=int, default=1000, help="connections held open, per tunnel")
    ap.add_argument("--protocols", default="v1,v2")
    ap.add_argument("--nodepass", default=str(REPO / ".build/release/nodepass"))
    ap.add_argument("--logs", default="/tmp/nodepass-soak")
    ap.add_argument("--out-json", default="/tmp/nodepass-soak/soak.json")
    a = ap.parse_args()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    return asyncio.run(main_async(a))


if __name__ == "__main__":
    sys.exit(main())
