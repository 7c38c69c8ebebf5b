#!/usr/bin/env python3
"""UDP through the tunnel, side by side with a direct path and a user-space relay, in one run.

Rows: `direct` (the target itself), `socat-udp-chain` (two socat UDP relays, one fork per flow, the user-space
baseline), and NodePass for Swift over protocol v2 with `tls=0` and `tls=1` (`nodepass-v2-tls0`,
`nodepass-v2-tls1`). The target is bench/udpbench.c's echo (recvmmsg/sendmmsg), and dnsmasq for the DNS row.

Figures, for each row:
- datagrams per second at 64 and 1,200 bytes with loss at or under 1 %: the highest rate of a ladder that
  still delivers 99 % of the echoes (8 flows, `--seconds` per step);
- DNS queries per second: dnsperf against dnsmasq (20 clients, unpaced), the best of 200, 500 and 1,000
  queries outstanding with loss at or under 1 %;
- request/reply latency of one flow, p50 and p99 (64 bytes);
- memory per active flow: the proportional set size (PSS) of the row's processes and their children, with
  `--flows` flows held, less before, per flow held (PSS shares the pages of socat's forks fairly among them;
  socat answers only part of the flows within the 20 s it is given, and the table says how many).

`--previous BIN` adds a row for another build (`previous-v2-tls0`) to compare against in the same run;
`--repeat N` runs the rows N times, interleaved, and reports the median of each figure.

    python3 bench/udpbench.py --nodepass .build/release/nodepass [--previous BIN] [--repeat N] [--quick]
        [--out-md FILE]
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROWS = ("direct", "socat-udp-chain", "nodepass-v2-tls0", "nodepass-v2-tls1")
LADDER = [5_000, 10_000, 20_000, 40_000, 80_000, 120_000, 160_000, 240_000, 320_000]


def free_port() -> int:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = secrets.randbelow(low - 20000) + 20000
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


class Procs:
    """Every process a row starts; all are stopped when the row ends."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: List[subprocess.Popen] = []

    def start(self, name: str, args: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})),
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs = []


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    raise RuntimeError(f"timed out waiting for {what}")


def udp_round_trip(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.connect(("127.0.0.1", port))
        token = secrets.token_bytes(16)
        s.send(token)
        return s.recv(100) == token


def tree_pss_kib(pids: List[int]) -> int:
    """The PSS of `pids` and all their descendants."""
    total = 0
    seen = set()
    stack = list(pids)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            total += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
            for task in Path(f"/proc/{pid}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except (OSError, AttributeError):
            continue
    return total


class Row:
    """A path from a user port to a target port."""

    def __init__(self, name: str, nodepass: Optional[str], procs: Procs, previous: Optional[str] = None):
        self.name = name
        self.nodepass = nodepass
        self.previous = previous
        self.procs = procs
        self.pids: List[int] = []

    def start(self, target: int) -> int:
        """Starts the row in front of `target`; returns the port users send to."""
        if self.name == "direct":
            return target
        user = free_port()
        if self.name == "socat-udp-chain":
            middle = free_port()
            for listen, to in ((user, middle), (middle, target)):
                proc = self.procs.start("socat", ["socat", "-T", "30", f"UDP4-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
                                                  f"UDP4:127.0.0.1:{to}"])
                self.pids.append(proc.pid)
            return user
        tls = "0" if self.name.endswith("tls0") else "1"
        binary = self.previous if self.name.startswith("previous") else self.nodepass
        key = secrets.token_hex(16)
        tunnel = free_port()
        env = {"MIN_POOL_CAPACITY": "16", "UDP_MAX_FLOWS": "100000"}
        server = self.procs.start("server", [binary, f"server://{key}@127.0.0.1:{tunnel}/127.0.0.1:{user}"
                                                            f"?log=warn&tls={tls}&mode=1"], env)
        client = self.procs.start("client", [binary, f"client://{key}@127.0.0.1:{tunnel}/127.0.0.1:{target}"
                                                            "?log=warn"], env)
        self.pids += [server.pid, client.pid]
        return user


def run(cmd: List[str], timeout: float) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


def max_rate(tool: str, port: int, size: int, seconds: float) -> Dict[str, float]:
    """The highest rate with loss at or under 1 %: the ladder's last step passed, then two halvings (on a
    log scale) of the gap to the first step failed, so the figure is within 19 % of the true one."""

    def attempt(pps: float) -> Optional[Dict[str, float]]:
        out = run([tool, "rate", str(port), str(size), str(int(pps)), str(seconds), "8"], timeout=seconds + 30)
        match = re.search(r"sent (\d+) received (\d+)", out)
        if not match:
            return None
        sent, received = int(match.group(1)), int(match.group(2))
        loss = 1 - received / max(1, sent)
        return {"pps": received / seconds, "loss": loss} if loss <= 0.01 else None

    best = {"pps": 0.0, "loss": 0.0}
    passed, failed = 0.0, None
    for pps in LADDER:
        result = attempt(pps)
        if result is None:
            failed = pps
            break
        best, passed = result, pps
    if failed is not None and passed > 0:
        for _ in range(2):
            middle = (passed * failed) ** 0.5
            result = attempt(middle)
            if result is None:
                failed = middle
            else:
                best, passed = result, middle
    return best


def dns_query(port: int) -> bool:
    """One A query for bench.test over UDP, answered."""
    question = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05bench\x04test\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.connect(("127.0.0.1", port))
        s.send(question)
        return s.recv(512)[:2] == b"\x12\x34"


def dns_qps(port: int, queries: Path, seconds: int) -> Optional[Dict[str, float]]:
    """dnsperf's best queries per second with loss at or under 1 % (20 clients; 200, 500 and then 1,000
    queries outstanding: a path with more stages needs more in flight to stay busy), and its loss."""
    if shutil.which("dnsperf") is None:
        return None
    best: Optional[Dict[str, float]] = None
    for outstanding in (200, 500, 1000):
        out = run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds), "-c", "20",
                   "-q", str(outstanding)], timeout=seconds + 30)
        match = re.search(r"Queries per second:\s+([\d.]+)", out)
        lost = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out)
        if not match or not lost:
            continue
        result = {"qps": float(match.group(1)), "loss": float(lost.group(1)), "outstanding": outstanding}
        if best is None or (result["loss"] <= 1.0 and (best["loss"] > 1.0 or result["qps"] > best["qps"])):
            best = result
    return best


def measure(name: str, args, tool: str, workdir: Path) -> Dict[str, object]:
    result: Dict[str, object] = {}
    procs = Procs(workdir)
    try:
        target = free_port()
        procs.start("echo", [tool, "echo", str(target)])
        row = Row(name, args.nodepass, procs, args.previous)
        port = row.start(target)
        wait_for(lambda: udp_round_trip(port), 30, f"{name}: a datagram round trip")
        for size in (64, 1200):
            result[f"rate{size}"] = max_rate(tool, port, size, args.seconds)
        out = run([tool, "rr", str(port), "64", str(args.round_trips)], timeout=120)
        match = re.search(r"p50 ([\d.]+) p99 ([\d.]+) lost (\d+)", out)
        if match:
            result["rr"] = {"p50": float(match.group(1)), "p99": float(match.group(2)), "lost": int(match.group(3))}
        if row.pids:
            before = tree_pss_kib(row.pids)
            holder = subprocess.Popen([tool, "hold", str(port), str(args.flows), "30"], stdout=subprocess.PIPE,
                                      text=True)
            line = holder.stdout.readline()
            answered = int(line.split()[1]) if line.startswith("answered") else 0
            after = tree_pss_kib(row.pids)
            holder.kill()
            holder.wait(timeout=10)
            result["memory"] = {"flows": answered}
            # socat forks one process per flow and answers only some of the flows in time (counted, shown).
            if answered >= args.flows / 3:
                result["memory"]["per_flow_kib"] = (after - before) / answered
    finally:
        procs.stop()
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if os.access(dnsmasq, os.X_OK):
        procs = Procs(workdir)
        try:
            dns = free_port()
            procs.start("dnsmasq", [dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={dns}",
                                    "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                                    "--address=/bench.test/10.9.8.7", "--cache-size=10000"])
            row = Row(name, args.nodepass, procs, args.previous)
            port = row.start(dns)
            queries = workdir / "queries.txt"
            queries.write_text("".join(f"host{n}.bench.test A\n" for n in range(1000)))
            wait_for(lambda: dns_query(port), 30, f"{name}: dnsmasq answering")
            result["dns"] = dns_qps(port, queries, args.dns_seconds)
        finally:
            procs.stop()
    return result


def median_result(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Each figure's median over the runs (the runs that measured it)."""
    merged: Dict[str, object] = {}
    for figure in {key for run in runs for key in run}:
        values = [run[figure] for run in runs if isinstance(run.get(figure), dict)]
        if not values:
            continue
        merged[figure] = {
            field: statistics.median(v[field] for v in values if field in v)
            for field in values[0]
        }
    return merged


def markdown(results: Dict[str, Dict[str, object]], rows: List[str]) -> str:
    direct = results.get("direct", {})
    socat = results.get("socat-udp-chain", {})

    def ratio(value: Optional[float], reference: Optional[float], prefix: str) -> str:
        if value is None or not reference:
            return ""
        return f"{prefix}{value / reference:.2f}"

    def cell(value: Optional[float], key: Callable[[Dict[str, object]], Optional[float]], fmt: str) -> str:
        if value is None:
            return "—"
        parts = [ratio(value, key(direct), "×"), ratio(value, key(socat), "s×")]
        parts = [p for p in parts if p]
        return fmt.format(value) + (f" ({', '.join(parts)})" if parts else "")

    def get(r: Dict[str, object], *keys) -> Optional[float]:
        value: object = r
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        return float(value) if isinstance(value, (int, float)) else None

    figures = [
        ("Datagrams/s at 64 B, loss ≤ 1 %", lambda r: get(r, "rate64", "pps"), "{:,.0f}"),
        ("Datagrams/s at 1,200 B, loss ≤ 1 %", lambda r: get(r, "rate1200", "pps"), "{:,.0f}"),
        ("DNS queries/s (dnsperf, dnsmasq)", lambda r: get(r, "dns", "qps"), "{:,.0f}"),
        ("DNS queries lost (%)", lambda r: get(r, "dns", "loss"), "{:.2f}"),
        ("Request/reply p50 (µs)", lambda r: get(r, "rr", "p50"), "{:,.1f}"),
        ("Request/reply p99 (µs)", lambda r: get(r, "rr", "p99"), "{:,.1f}"),
        ("Memory per active flow, all processes (KiB PSS)", lambda r: get(r, "memory", "per_flow_kib"), "{:,.1f}"),
        ("Flows held for the memory figure", lambda r: get(r, "memory", "flows"), "{:,.0f}"),
    ]
    lines = ["| figure | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for title, key, fmt in figures:
        lines.append(f"| {title} | " + " | ".join(cell(key(results.get(r, {})), key, fmt) for r in rows) + " |")
    lines.append("")
    lines.append("×N: ratio to direct; s×N: ratio to socat-udp-chain (for latency and memory, > 1 is slower or "
                 "costlier).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodepass", default=str(HERE.parent / ".build" / "release" / "nodepass"))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--previous", help="another build, measured as the row previous-v2-tls0")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every row, interleaved; medians reported")
    parser.add_argument("--quick", action="store_true", help="1 s per rate step, 300 round trips, 300 flows")
    parser.add_argument("--out-md")
    args = parser.parse_args()
    args.seconds = 1.0 if args.quick else 2.0
    args.round_trips = 300 if args.quick else 2000
    args.flows = 300 if args.quick else 2000
    args.dns_seconds = 2 if args.quick else 5
    rows = [r for r in args.rows.split(",") if r]
    if args.previous:
        rows.insert(rows.index("nodepass-v2-tls0") + 1 if "nodepass-v2-tls0" in rows else len(rows), "previous-v2-tls0")
    for required in ("gcc", "socat"):
        if shutil.which(required) is None:
            print(f"udpbench: {required} is needed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="np-udpbench-") as tmp:
        workdir = Path(tmp)
        tool = str(workdir / "udpbench")
        subprocess.run(["gcc", "-O2", "-o", tool, str(HERE / "udpbench.c")], check=True)
        runs: Dict[str, List[Dict[str, object]]] = {name: [] for name in rows}
        for attempt in range(args.repeat):
            for name in rows:
                started = time.monotonic()
                runs[name].append(measure(name, args, tool, workdir))
                print(f"{name} (run {attempt + 1}): {runs[name][-1]} ({time.monotonic() - started:.0f} s)", flush=True)
        results = {name: median_result(runs[name]) for name in rows}
    table = markdown(results, rows)
    print(table)
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
