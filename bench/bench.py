#!/usr/bin/env python3
"""Side-by-side loopback benchmark of TCP tunnels: direct, socat-chain, NodePass (Swift, Go), others.

Starts real processes on 127.0.0.1 only, measures throughput, latency, connection handling,
CPU and memory, and prints a Markdown table (ratios to the direct row and to socat-chain).
Python 3.11 standard library; the target service and the load generator are bench/npbench.c,
compiled with gcc at run time. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
CLK_TCK = os.sysconf("SC_CLK_TCK")
NP_ENV_VARS = ("MIN_POOL_CAPACITY", "MAX_POOL_CAPACITY", "SEMAPHORE_LIMIT", "REPORT_INTERVAL",
               "SERVICE_COOLDOWN", "SHUTDOWN_TIMEOUT")
GO_DEFAULT = Path(os.environ.get("PEER_BIN", str(Path.home() / ".cache/np-peer/nodepass-go-1.0.1")))
BUILTIN_ROWS = ("direct", "socat-chain", "nodepass-swift", "nodepass-swift-v2-tls0", "nodepass-swift-v2-tls1",
                "nodepass-swift-v2-tls0-resume", "nodepass-swift-v2-tls1-resume", "nodepass-go")
# Protocol v2 rows: the same key on both sides (made fresh for each run, never printed).
BENCH_KEY = os.urandom(16).hex()

SOCAT_SERVER = ("socat TCP-LISTEN:{user_port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay "
                "TCP:127.0.0.1:{tunnel_port},nodelay")
SOCAT_CLIENT = ("socat TCP-LISTEN:{tunnel_port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay "
                "TCP:127.0.0.1:{target_port},nodelay")
NP_SERVER = "{bin} server://127.0.0.1:{tunnel_port}/127.0.0.1:{user_port}?log=warn"
NP_CLIENT = "{bin} client://127.0.0.1:{tunnel_port}/127.0.0.1:{target_port}?log=warn"


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ processes

PROCS: List["Proc"] = []


class Proc:
    """A process in its own session/process group (so its children, e.g. socat forks, go with it)."""

    def __init__(self, name: str, argv: List[str], env: Optional[Dict[str, str]], logdir: Path,
                 stdin=subprocess.DEVNULL):
        self.name = name
        self.argv = argv
        self.logpath = logdir / f"{name}.log"
        self.logf = open(self.logpath, "ab")
        self.logf.write(f"# {shlex.join(argv)}\n".encode())
        self.logf.flush()
        try:
            self.p = subprocess.Popen(argv, env=env, stdin=stdin, stdout=self.logf, stderr=subprocess.STDOUT,
                                      start_new_session=True, close_fds=True)
        except OSError as exc:
            self.logf.close()
            raise BenchError(f"cannot start {name}: {argv[0]}: {exc}") from exc
        self.pid = self.p.pid
        PROCS.append(self)

    def alive(self) -> bool:
        return self.p.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with status {self.p.returncode}; log tail:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.logpath.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in lines)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the group, wait at most grace seconds, then SIGKILL the group."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # leftovers of the group (forked children), or a stuck leader
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"warning: {self.name} (pid {self.pid}) did not exit after SIGKILL")
        if not self.logf.closed:
            self.logf.close()
        if self in PROCS:
            PROCS.remove(self)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # our child is the leader of its own group: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass


def stop_all() -> None:
    for pr in list(reversed(PROCS)):
        try:
            pr.stop(grace=2.0)
        except Exception as exc:  # noqa: BLE001 - best effort during teardown
            log(f"warning: stopping {pr.name}: {exc}")


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ============================================================================ waiting and probing


def wait_for(pred: Callable[[], object], timeout: float, what: str, procs: List[Proc] = ()) -> object:
    """Poll pred until truthy or timeout (short growing backoff between attempts)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    last = None
    while True:
        for pr in procs:
            pr.check()
        try:
            v = pred()
            if v:
                return v
        except (OSError, BenchError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def round_trip(port: int, timeout: float = 1.0) -> bool:
    """Connect to 127.0.0.1:port, send one byte, expect it echoed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"r")
        return s.recv(1) == b"r"


_used_ports: set = set()


def free_port() -> int:
    """A free port below the ephemeral range (one from bind(0) may be taken by an outgoing connection, such as
    a pool connection, before the tunnel binds it), never the same twice in a run."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        if low > 11000:
            port = random.randrange(10000, low)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        if port in _used_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise BenchError("no free port")


# ============================================================================ /proc readers


def _tcp_table() -> Dict[int, tuple]:
    """inode -> (state hex, local port) for every TCP socket (IPv4 and IPv6)."""
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    out[int(parts[9])] = (parts[3], int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return out


def listening(port: int) -> bool:
    return any(st == "0A" and lp == port for st, lp in _tcp_table().values())


def proc_tree(pid: int) -> List[int]:
    """pid and all its descendants."""
    children: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_status(pid: int) -> Dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
                    vals[k] = int(v.split()[0])
    except OSError:
        pass
    return vals


def proc_cpu(pid: int) -> float:
    """utime+stime+cutime+cstime in seconds (children count once reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return 0.0
    fields = st[st.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def tree_cpu(pid: int) -> float:
    return sum(proc_cpu(p) for p in proc_tree(pid))


def tree_mem(pid: int) -> Dict[str, int]:
    pids = proc_tree(pid)
    tot = {"rss_kib": 0, "rss_anon_kib": 0, "hwm_kib": 0, "threads": 0, "processes": len(pids)}
    for p in pids:
        st = proc_status(p)
        tot["rss_kib"] += st.get("VmRSS", 0)
        tot["rss_anon_kib"] += st.get("RssAnon", 0)
        tot["hwm_kib"] += st.get("VmHWM", 0)
        tot["threads"] += st.get("Threads", 0)
    return tot


def tree_established(pid: int, table: Optional[Dict[int, tuple]] = None) -> int:
    """ESTABLISHED TCP sockets held by the process tree."""
    table = table if table is not None else _tcp_table()
    n = 0
    for p in proc_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                ent = table.get(int(link[8:-1]))
                if ent and ent[0] == "01":
                    n += 1
    return n


def host_cpu() -> tuple:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


# ============================================================================ npbench (C helper)


def build_npbench(workdir: Path) -> Path:
    src = HERE / "npbench.c"
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BenchError("gcc not found (apt-get install -y gcc)")
    out = workdir / "npbench"
    cmd = [cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"compiling npbench failed:\n{r.stderr}")
    return out


def build_malloccount(workdir: Path) -> Optional[Path]:
    """bench/malloccount.c as a shared object for LD_PRELOAD, or None when it does not build."""
    cc = shutil.which("gcc") or shutil.which("cc")
    out = workdir / "malloccount.so"
    if not cc:
        return None
    r = subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(out), str(HERE / "malloccount.c")],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        log(f"warning: compiling malloccount.c failed, no allocation figures:\n{r.stderr}")
        return None
    return out


def read_counters(directory: Path) -> Optional[int]:
    """The sum of the allocation counters in directory (one 8-byte file per process), or None if none."""
    files = list(directory.iterdir()) if directory.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        data = f.read_bytes()
        if len(data) >= 8:
            total += int.from_bytes(data[:8], sys.byteorder)
    return total


class Npb:
    def __init__(self, exe: Path, src_ips: int):
        self.exe = exe
        self.env = dict(os.environ, NPB_SRC_IPS=str(src_ips))

    def run(self, args: List[object], timeout: float) -> dict:
        argv = [str(self.exe)] + [str(a) for a in args]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired:
            raise BenchError(f"npbench {args[0]} did not finish within {timeout:.0f}s (killed)")
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise BenchError(f"npbench {args[0]} printed no result (rc {r.returncode}): {r.stderr.strip()[:300]}")
        return json.loads(lines[-1])

    def hold(self, port: int, n: int, conc: int, deadline: float) -> "Held":
        p = subprocess.Popen([str(self.exe), "conns", str(port), str(n), str(conc), str(deadline), "1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env)
        return Held(p, deadline + 10)


class Held:
    """npbench conns ... HOLD=1: connections stay open until stdin closes."""

    def __init__(self, p: subprocess.Popen, timeout: float):
        self.p = p
        self.result: dict = {}
        end = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = end - time.monotonic()
            if left <= 0:
                self.release()
                raise BenchError("held connections: no result in time")
            r, _, _ = select.select([p.stdout], [], [], left)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    self.release()
                    raise BenchError(f"held connections: npbench exited ({p.poll()})")
                buf += chunk
        self.result = json.loads(buf.split(b"\n", 1)[0])

    def release(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(timeout=5)


# ============================================================================ rows


@dataclass
class Row:
    name: str
    kind: str                     # "direct" or "tunnel"
    server: str = ""              # command templates
    client: str = ""
    pooled: bool = True           # NodePass-like: run the pool-capacity phase
    note: str = ""


@dataclass
class Tunnel:
    row: Row
    server: Proc
    client: Proc
    user_port: int
    tunnel_port: int

    def procs(self) -> List[Proc]:
        return [self.server, self.client]

    def stop(self) -> None:
        # server first, so the client does not spin reconnecting while we wait
        self.server.stop()
        self.client.stop()


def expand(template: str, values: Dict[str, object]) -> List[str]:
    try:
        return [tok.format(**values) for tok in shlex.split(template)]
    except KeyError as exc:
        raise BenchError(f"unknown placeholder {exc} in {template!r}")


# ============================================================================ the benchmark


@dataclass
class Config:
    size: int
    streams: int
    echo_samples: int
    conn_samples: int
    burst: int
    cps_clients: int
    duration: float
    hold: int
    pool_capacity: int
    repeat: int = 1
    hold_concurrency: int = 64
    stable_s: float = 1.5
    warm_timeout: float = 30.0
    ready_timeout: float = 30.0
    burst_timeout: float = 60.0
    conn_timeout: float = 120.0
    hold_timeout: float = 90.0
    alloc_size: int = GiB
    alloc_conns: int = 200


class Bench:
    def __init__(self, cfg: Config, npb: Npb, target_port: int, logdir: Path, tunnel_env: Dict[str, str],
                 malloccount: Optional[Path] = None, workdir: Optional[Path] = None):
        self.malloccount = malloccount
        self.workdir = workdir or logdir
        self.cfg = cfg
        self.npb = npb
        self.target_port = target_port
        self.target: Optional[Proc] = None
        self.logdir = logdir
        self.tunnel_env = tunnel_env

    # ---------------------------------------------------------------- tunnel lifecycle

    def start_tunnel(self, row: Row, tag: str, extra_env: Dict[str, str]) -> Tunnel:
        tport, uport = free_port(), free_port()
        values = {"tunnel_port": tport, "user_port": uport, "target_port": self.target_port}
        env = {k: v for k, v in os.environ.items() if k not in NP_ENV_VARS}
        env.update(self.tunnel_env)
        env.update(extra_env)
        server = Proc(f"{row.name}-{tag}-server", expand(row.server, values), env, self.logdir)
        try:
            # the server must listen before the client starts (a NodePass client that finds no
            # server waits SERVICE_COOLDOWN); never probe the tunnel port with a connection
            # (the original accepts one control connection per start)
            wait_for(lambda: listening(tport) or listening(uport), self.cfg.ready_timeout,
                     f"{server.name} to listen", [server])
            client = Proc(f"{row.name}-{tag}-client", expand(row.client, values), env, self.logdir)
        except BaseException:
            server.stop()
            raise
        t = Tunnel(row, server, client, uport, tport)
        try:
            t0 = time.monotonic()
            if row.pooled:
                # the original Go server crashes (nil pool) on a user connection that arrives before
                # its client: first wait for the client's control connection and a pool connection
                try:
                    wait_for(lambda: tree_established(client.pid) >= 2, min(10.0, self.cfg.ready_timeout),
                             f"{client.name} to connect", t.procs())
                except BenchError as exc:
                    if not all(pr.alive() for pr in t.procs()):
                        raise
                    log(f"  warning: {exc}; probing anyway")
            wait_for(lambda: round_trip(uport), self.cfg.ready_timeout, f"a round trip through {row.name}",
                     t.procs())
            log(f"  {row.name} [{tag}] ready in {time.monotonic() - t0:.2f}s "
                f"(server pid {server.pid}, client pid {client.pid})")
        except BaseException:
            t.stop()
            raise
        return t

    def wait_warm(self, t: Tunnel, expect_client_sockets: int = 0, stable_s: Optional[float] = None) -> dict:
        """Wait until the established-socket counts of both sides have not grown for stable_s
        (the pool is refilled; a pool shrinking back after a test is fine) and the client holds
        at least expect_client_sockets, bounded by warm_timeout."""
        t0 = time.monotonic()
        deadline = t0 + self.cfg.warm_timeout
        last, since = None, time.monotonic()
        stable_s = self.cfg.stable_s if stable_s is None else stable_s
        while True:
            for pr in t.procs():
                pr.check()
            table = _tcp_table()
            cur = (tree_established(t.server.pid, table), tree_established(t.client.pid, table))
            now = time.monotonic()
            if last is None or cur[0] > last[0] or cur[1] > last[1]:
                since = now
            last = cur
            if now - since >= stable_s and cur[1] >= expect_client_sockets:
                return {"server_sockets": cur[0], "client_sockets": cur[1], "warm_s": round(now - t0, 2),
                        "warm": True}
            if now >= deadline:
                log(f"  warning: {t.row.name}: sockets not stable/complete after {self.cfg.warm_timeout:.0f}s: {cur}")
                return {"server_sockets": cur[0], "client_sockets": cur[1], "warm_s": round(now - t0, 2),
                        "warm": False}
            time.sleep(0.1)

    def mem(self, t: Tunnel) -> dict:
        return {"server": tree_mem(t.server.pid), "client": tree_mem(t.client.pid)}

    def wait_mem_stable(self, t: Tunnel, timeout: float = 10.0) -> dict:
        """RSS of both sides once two readings 0.5 s apart differ by < 1 % (bounded)."""
        end = time.monotonic() + timeout
        prev = self.mem(t)
        while True:
            time.sleep(0.5)
            for pr in t.procs():
                pr.check()
            cur = self.mem(t)
            a = prev["server"]["rss_kib"] + prev["client"]["rss_kib"]
            b = cur["server"]["rss_kib"] + cur["client"]["rss_kib"]
            if abs(b - a) <= 0.01 * max(a, 1) or time.monotonic() >= end:
                return cur
            prev = cur

    # ---------------------------------------------------------------- measurements

    def guarded(self, res: dict, key: str, fn: Callable[[], dict], procs: List[Proc]) -> None:
        """Run one measurement; a failure is recorded, not fatal (unless a tunnel process died)."""
        for pr in procs:
            pr.check()
        try:
            res[key] = fn()
        except (BenchError, KeyError, ValueError, TypeError, OSError) as exc:
            res[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, BenchError) else str(exc)}
            log(f"  {key}: FAILED: {res[key]['error']}")
        for pr in procs:
            pr.check()

    def throughput(self, port: int, streams: int, cpu_pids: List[int]) -> dict:
        """The median (by MiB/s) of cfg.repeat transfers; every run is kept under "runs"."""
        runs = [self._throughput_once(port, streams, cpu_pids) for _ in range(max(1, self.cfg.repeat))]
        if len(runs) == 1:
            return runs[0]
        good = sorted((r for r in runs if r.get("ok")), key=lambda r: r["mib_s"])
        med = dict(good[(len(good) - 1) // 2] if good else runs[0])
        med["runs"] = [{k: r.get(k) for k in ("ok", "mib_s", "tunnel_cpu_per_gib", "errors")} for r in runs]
        med["ok"] = med.get("ok", False) and len(good) == len(runs)
        return med

    def _throughput_once(self, port: int, streams: int, cpu_pids: List[int]) -> dict:
        c = self.cfg
        base_trees = {p: len(proc_tree(p)) for p in cpu_pids}
        cpu0 = {p: tree_cpu(p) for p in cpu_pids}
        tgt0 = proc_cpu(self.target.pid)
        h0 = host_cpu()
        r = self.npb.run(["stream", port, c.size, streams, c.size / (20 * MiB) + 30], timeout=c.size / (20 * MiB) + 45)
        h1 = host_cpu()
        # forked relays (socat) are counted once reaped: wait (bounded) for the tree to shrink back
        for p in cpu_pids:
            try:
                wait_for(lambda: len(proc_tree(p)) <= base_trees[p], 5, "relay children to exit")
            except BenchError:
                pass
        secs = r.get("seconds") or 0
        r["target_cpu_s"] = round(proc_cpu(self.target.pid) - tgt0, 3)
        r["host_busy"] = round((h1[0] - h0[0]) / max(h1[1] - h0[1], 1), 3)
        if cpu_pids:
            r["tunnel_cpu_s"] = round(sum(tree_cpu(p) - cpu0[p] for p in cpu_pids), 3)
            r["tunnel_cpu_per_gib"] = round(r["tunnel_cpu_s"] / (c.size / GiB), 3)
            r["tunnel_cpu_by_process"] = [round(tree_cpu(p) - cpu0[p], 3) for p in cpu_pids]
        if secs:
            if cpu_pids:
                r["tunnel_util"] = round(r["tunnel_cpu_s"] / secs, 2)
            r["loadgen_util"] = round(r.get("loadgen_cpu_s", 0) / secs, 2)
            r["target_util"] = round(r["target_cpu_s"] / secs, 2)
        log(f"  {streams}-stream: {r.get('mib_s')} MiB/s ok={r.get('ok')} {r.get('errors') or ''}")
        return r

    def cps(self, port: int, cpu_pids: List[int]) -> dict:
        c = self.cfg
        tgt0 = proc_cpu(self.target.pid)
        cpu0 = {p: tree_cpu(p) for p in cpu_pids}
        h0 = host_cpu()
        r = self.npb.run(["cps", port, c.cps_clients, c.duration], timeout=c.duration + 30)
        h1 = host_cpu()
        if cpu_pids:
            r["tunnel_cpu_s"] = round(sum(tree_cpu(p) - cpu0[p] for p in cpu_pids), 3)
            r["tunnel_util"] = round(r["tunnel_cpu_s"] / c.duration, 2)
        r["target_cpu_s"] = round(proc_cpu(self.target.pid) - tgt0, 3)
        r["host_busy"] = round((h1[0] - h0[0]) / max(h1[1] - h0[1], 1), 3)
        r["loadgen_util"] = round(r.get("loadgen_cpu_s", 0) / c.duration, 2)
        r["target_util"] = round(r["target_cpu_s"] / c.duration, 2)
        log(f"  cps: {r.get('cps')} /s (failed {r.get('failed')}, timed out {r.get('timed_out')})")
        return r

    def perf(self, port: int, res: dict, procs: List[Proc], cpu_pids: List[int],
             warm: Optional[Callable[[str], None]] = None) -> None:
        """warm(name): for pooled tunnels, wait until the pool has settled again before a test"""
        c = self.cfg
        warm = warm or (lambda _name: None)
        self.guarded(res, "stream1", lambda: self.throughput(port, 1, cpu_pids), procs)
        self.guarded(res, "streamN", lambda: self.throughput(port, c.streams, cpu_pids), procs)

        def echo():
            r = self.npb.run(["echo", port, c.echo_samples, 60], timeout=75)
            log(f"  echo rtt p50/p99: {r['rtt']['p50_us']}/{r['rtt']['p99_us']} us")
            return r

        def connlat():
            r = self.npb.run(["connlat", port, c.conn_samples, c.conn_timeout], timeout=c.conn_timeout + 15)
            log(f"  new conn p50/p99: {r['lat']['p50_us']}/{r['lat']['p99_us']} us ({r['seconds']}s, "
                f"{r['failures']} failed)")
            return r

        def burst():
            r = self.npb.run(["conns", port, c.burst, c.burst, c.burst_timeout, 0], timeout=c.burst_timeout + 15)
            log(f"  burst {c.burst}: {r['succeeded']} ok, slowest {r['lat']['max_us'] / 1000:.1f} ms")
            return r

        self.guarded(res, "echo", echo, procs)
        warm("connlat")
        self.guarded(res, "connlat", connlat, procs)
        warm("burst")
        self.guarded(res, "burst", burst, procs)
        warm("cps")
        self.guarded(res, "cps", lambda: self.cps(port, cpu_pids), procs)

    # ---------------------------------------------------------------- rows

    def run_direct(self, res: dict) -> None:
        res["kind"] = "direct"
        self.perf(self.target_port, res, [self.target], [])

    def run_tunnel(self, row: Row, res: dict) -> None:
        c = self.cfg
        res.update({"kind": "tunnel", "server_cmd": row.server.replace(BENCH_KEY, "KEY"),
                    "client_cmd": row.client.replace(BENCH_KEY, "KEY"), "note": row.note})
        stable = None if row.pooled else 0.3  # nothing to settle without a pool
        # phase 1: default environment: idle memory, then performance
        t = self.start_tunnel(row, "perf", {})
        try:
            res["idle_sockets"] = self.wait_warm(t, stable_s=stable)
            res["mem_idle"] = self.mem(t)

            def warm(name: str) -> None:
                if row.pooled:
                    res.setdefault("warm_before", {})[name] = self.wait_warm(t)

            self.perf(t.user_port, res, t.procs(), [t.server.pid, t.client.pid], warm)
            res["mem_after_perf"] = self.mem(t)
            for pr in t.procs():
                pr.check()
        finally:
            t.stop()
        # phase 2: full pool (MIN=MAX=capacity), then held connections on top of it
        extra = {}
        if row.pooled:
            extra = {"MIN_POOL_CAPACITY": str(c.pool_capacity), "MAX_POOL_CAPACITY": str(c.pool_capacity)}
        t = self.start_tunnel(row, "pool" if row.pooled else "hold", extra)
        try:
            res["pool_sockets"] = self.wait_warm(t, c.pool_capacity if row.pooled else 0, stable_s=stable)
            base = res["mem_hold_base"] = self.mem(t)
            if row.pooled:
                res["mem_pool"] = base
                log(f"  pool: sockets {res['pool_sockets']}")

            def hold():
                h = self.npb.hold(t.user_port, c.hold, c.hold_concurrency, c.hold_timeout)
                try:
                    r = dict(h.result)
                    log(f"  holding {r.get('succeeded')}/{c.hold} connections")
                    if row.pooled:  # let the pool refill first
                        r["warm_held"] = self.wait_warm(t, stable_s=stable)
                    r["mem_held"] = held = self.wait_mem_stable(t)
                    table = _tcp_table()
                    r["sockets_held"] = {"server": tree_established(t.server.pid, table),
                                         "client": tree_established(t.client.pid, table)}
                    n = r.get("succeeded") or 0
                    if n:
                        for k in ("rss_kib", "rss_anon_kib"):
                            d = sum(held[s][k] - base[s][k] for s in ("server", "client"))
                            r[f"{k}_per_conn"] = round(d / n, 2)
                    return r
                finally:
                    h.release()

            self.guarded(res, "hold", hold, t.procs())
        finally:
            t.stop()
        # phase 3: heap allocations, counted by malloccount.so in both sides' processes
        if self.malloccount:
            self.allocations(row, res, stable)

    def allocations(self, row: Row, res: dict, stable: Optional[float]) -> None:
        c = self.cfg
        counters = self.workdir / f"allocs-{len(list(self.workdir.glob('allocs-*')))}"
        counters.mkdir()
        env = {"LD_PRELOAD": str(self.malloccount), "NPBENCH_MALLOC_DIR": str(counters)}
        t = self.start_tunnel(row, "alloc", env)
        try:
            def count() -> dict:
                self.wait_warm(t, stable_s=stable)
                before = read_counters(counters)
                if before is None:
                    # not an error: a statically linked program (the Go original) ignores LD_PRELOAD
                    return {"ok": False, "note": "no allocation counter: the program does not use the C library's malloc"}
                # Two transfers, a quarter and the whole of alloc_size: the difference is what the bytes cost,
                # without what setting up a relayed connection costs (counted below).
                counts, oks = [before], []
                for size in (c.alloc_size // 4, c.alloc_size):
                    r = self.npb.run(["stream", t.user_port, size, 1, size / (20 * MiB) + 30],
                                     timeout=size / (20 * MiB) + 45)
                    oks.append(bool(r.get("ok")))
                    self.wait_warm(t, stable_s=stable)
                    counts.append(read_counters(counters) or counts[-1])
                lat = self.npb.run(["connlat", t.user_port, c.alloc_conns, c.conn_timeout], timeout=c.conn_timeout + 15)
                self.wait_warm(t, stable_s=stable)  # the pool's refill belongs to the connections
                counts.append(read_counters(counters) or counts[-1])
                small, large, conns = (counts[i + 1] - counts[i] for i in range(3))
                out = {"ok": all(oks) and not lat.get("failures"),
                       "transfers_bytes": [c.alloc_size // 4, c.alloc_size], "transfer_allocations": [small, large],
                       "connections": c.alloc_conns, "conn_allocations": conns}
                out["per_mib"] = round(max(0, large - small) / (0.75 * c.alloc_size / MiB), 2)
                out["per_conn"] = round(conns / c.alloc_conns, 1)
                log(f"  heap allocations: {out['per_mib']} per MiB relayed, {out['per_conn']} per new connection")
                return out

            self.guarded(res, "alloc", count, t.procs())
        finally:
            t.stop()


# ============================================================================ report

@dataclass
class Fig:
    label: str
    src: str                      # result key the figure comes from
    get: Callable[[dict], object]
    fmt: Optional[str] = None     # None: a (server MiB, client MiB) pair
    vs_direct: bool = True        # show the ratio to the direct row
    tunnel_only: bool = False


def _get(r, *keys):
    for k in keys:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


def _ok(r, key, *keys):
    return _get(r, key, *keys) if _get(r, key, "ok") else None


def _ms(us):
    return None if us is None or us < 0 else us / 1000


def _mem(m, field_):
    if not m:
        return None
    return (m["server"][field_] / 1024, m["client"][field_] / 1024)


FIGS = [
    Fig("Single stream (MiB/s)", "stream1", lambda r: _ok(r, "stream1", "mib_s"), "{:,.0f}"),
    Fig("{streams} streams aggregate (MiB/s)", "streamN", lambda r: _ok(r, "streamN", "mib_s"), "{:,.0f}"),
    Fig("Echo RTT p50 (µs)", "echo", lambda r: _ok(r, "echo", "rtt", "p50_us"), "{:,.1f}"),
    Fig("Echo RTT p99 (µs)", "echo", lambda r: _ok(r, "echo", "rtt", "p99_us"), "{:,.1f}"),
    Fig("New connection p50 (µs)", "connlat", lambda r: _get(r, "connlat", "lat", "p50_us"), "{:,.0f}"),
    Fig("New connection p99 (µs)", "connlat", lambda r: _get(r, "connlat", "lat", "p99_us"), "{:,.0f}"),
    Fig("Burst of {burst}: succeeded", "burst", lambda r: _get(r, "burst", "succeeded"), "{}/{burst}",
        vs_direct=False),
    Fig("Burst of {burst}: slowest success (ms)", "burst", lambda r: _ms(_get(r, "burst", "lat", "max_us")), "{:,.1f}"),
    Fig("Connections/s ({cps_clients} clients, {duration:g} s)", "cps", lambda r: _get(r, "cps", "cps"), "{:,.0f}"),
    Fig("Tunnel CPU s per GiB (single stream)", "stream1", lambda r: _ok(r, "stream1", "tunnel_cpu_per_gib"),
        "{:.2f}", vs_direct=False, tunnel_only=True),
    Fig("RSS idle, server + client (MiB)", "mem_idle", lambda r: _mem(r.get("mem_idle"), "rss_kib"),
        tunnel_only=True),
    Fig("RssAnon idle, server + client (MiB)", "mem_idle", lambda r: _mem(r.get("mem_idle"), "rss_anon_kib"),
        tunnel_only=True),
    Fig("RSS, {pool_capacity} idle pool conns (MiB)", "mem_pool", lambda r: _mem(r.get("mem_pool"), "rss_kib"),
        tunnel_only=True),
    Fig("RssAnon, {pool_capacity} idle pool conns (MiB)", "mem_pool",
        lambda r: _mem(r.get("mem_pool"), "rss_anon_kib"), tunnel_only=True),
    Fig("RSS, {hold} held conns (MiB)", "hold", lambda r: _mem(_get(r, "hold", "mem_held"), "rss_kib"),
        tunnel_only=True),
    Fig("RssAnon, {hold} held conns (MiB)", "hold", lambda r: _mem(_get(r, "hold", "mem_held"), "rss_anon_kib"),
        tunnel_only=True),
    Fig("RSS per held conn, both sides (KiB)", "hold", lambda r: _get(r, "hold", "rss_kib_per_conn"), "{:,.1f}",
        vs_direct=False, tunnel_only=True),
    Fig("RssAnon per held conn, both sides (KiB)", "hold", lambda r: _get(r, "hold", "rss_anon_kib_per_conn"),
        "{:,.1f}", vs_direct=False, tunnel_only=True),
    Fig("Peak RSS after perf tests (VmHWM, MiB)", "mem_after_perf",
        lambda r: _mem(r.get("mem_after_perf"), "hwm_kib"), tunnel_only=True),
    Fig("Heap allocations per MiB relayed (1 stream, both sides)", "alloc", lambda r: _ok(r, "alloc", "per_mib"),
        "{:,.1f}", vs_direct=False, tunnel_only=True),
    Fig("Heap allocations per new connection (both sides)", "alloc", lambda r: _ok(r, "alloc", "per_conn"),
        "{:,.0f}", vs_direct=False, tunnel_only=True),
]


def _ratio(v, ref):
    if v is None or not ref:
        return None
    x = v / ref
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1 or x == 0:
        return f"{x:.2f}"
    return f"{x:.2g}"


def build_markdown(results: dict, cfg: Config, meta: dict) -> str:
    names = list(results)
    params = {"streams": cfg.streams, "burst": cfg.burst, "cps_clients": cfg.cps_clients, "duration": cfg.duration,
              "pool_capacity": cfg.pool_capacity, "hold": cfg.hold}
    direct = results.get("direct") or {}
    socat = results.get("socat-chain") or {}
    lines = [f"### Tunnel benchmark ({meta['mode']}: {meta['size_human']} per transfer, {meta['host']})", "",
             "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for f in FIGS:
        ref_d = f.get(direct) if f.vs_direct else None
        ref_s = f.get(socat)
        if isinstance(ref_s, tuple):
            ref_s = ref_s[0] + ref_s[1]
        cells, any_val = [], False
        for n in names:
            r = results[n]
            if f.tunnel_only and r.get("kind") == "direct":
                cells.append("—")
                continue
            v = f.get(r)
            if v is None:
                src = r.get(f.src)
                cells.append("failed" if isinstance(src, dict) and src.get("error") else
                             "error" if r.get("error") else "n/a")
                continue
            any_val = True
            ratios = []
            if isinstance(v, tuple):
                v_cmp = v[0] + v[1]
                txt = f"{v[0]:,.1f} + {v[1]:,.1f} = {v_cmp:,.1f}"
            else:
                v_cmp = v
                txt = f.fmt.format(v, **params)
                if "{burst}" in f.fmt:
                    b = r.get("burst") or {}
                    bad = [f"{b[k]} {k.replace('_', ' ')}" for k in ("failed", "timed_out") if b.get(k)]
                    txt += f" ({', '.join(bad)})" if bad else ""
                if f.vs_direct and n != "direct":
                    rd = _ratio(v, ref_d)
                    if rd:
                        ratios.append(f"×{rd}")
            if n not in ("direct", "socat-chain") and "{burst}" not in (f.fmt or ""):
                rs = _ratio(v_cmp, ref_s)
                if rs:
                    ratios.append(f"s×{rs}")
            cells.append(txt + (f" ({', '.join(ratios)})" if ratios else ""))
        if any_val:
            lines.append(f"| {f.label.format(**params)} | " + " | ".join(cells) + " |")
    lines += ["", "×N: ratio to the direct row; s×N: ratio to socat-chain (for latencies, CPU and memory, "
              "> 1 means slower or costlier). Memory: server + client = sum, each side's whole process tree. "
              "Per held connection: (RSS with the connections held − RSS of the same processes just before, "
              f"pool of {cfg.pool_capacity} full) / connections held, both sides summed."]
    notes = meta.get("notes") or []
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    lines.append("")
    return "\n".join(lines)


def bottleneck_notes(results: dict, cfg: Config) -> List[str]:
    """Who used the CPU during the throughput and cps tests (percent of one core)."""
    notes = []
    ncpu = os.cpu_count() or 1
    for name, r in results.items():
        parts, flags = [], []
        for key, label in (("stream1", "1 stream"), ("streamN", f"{cfg.streams} streams"), ("cps", "cps")):
            x = r.get(key) or {}
            if "loadgen_util" not in x:
                continue
            lg, tg, tu, hb = x.get("loadgen_util"), x.get("target_util"), x.get("tunnel_util"), x.get("host_busy")
            who = ([f"tunnel {tu:.0%}"] if tu is not None else []) + [f"load generator {lg:.0%}", f"target {tg:.0%}"]
            parts.append(f"{label}: " + ", ".join(who) + (f", host {hb:.0%} of {ncpu} cores busy" if hb else ""))
            threads = cfg.streams if key == "streamN" else 1
            if lg >= 0.9 * min(threads, ncpu):
                flags.append(f"{label}: load generator saturated")
            if tg >= 0.9 * min(ncpu, 2):
                flags.append(f"{label}: target busy")
        if parts:
            tail = ""
            if flags:
                tail = (" — the tool may limit this row (" + "; ".join(flags) + ")" if name != "direct" else
                        " — direct is bounded by the tool itself (" + "; ".join(flags) + ")")
            notes.append(f"{name}, CPU share: " + "; ".join(parts) + tail)
    return notes


# ============================================================================ main


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 2G, 256M, 1048576)")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def human(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min): 256 MiB, 200 samples, 2 s cps, "
                    "100-connection burst, 200 held connections")
    ap.add_argument("--size", type=parse_size, help="bytes per throughput test (default 2G; quick 256M)")
    ap.add_argument("--streams", type=int, default=8, help="streams of the aggregate test (default 8)")
    ap.add_argument("--repeat", type=int, default=1, help="run each throughput test this many times and "
                    "report the median (default 1)")
    ap.add_argument("--samples", type=int, help="echo round trips (default 2000; quick 200)")
    ap.add_argument("--conn-samples", type=int, help="sequential new connections (default 500; quick 200)")
    ap.add_argument("--burst", type=int, help="simultaneous new connections (default 500; quick 100)")
    ap.add_argument("--duration", type=float, help="seconds of the cps test (default 10; quick 2)")
    ap.add_argument("--cps-clients", type=int, default=64, help="concurrent clients of the cps test (default 64)")
    ap.add_argument("--hold", type=int, help="connections held for the memory test (default 1000; quick 200)")
    ap.add_argument("--pool-capacity", type=int, default=1024,
                    help="MIN_POOL_CAPACITY=MAX_POOL_CAPACITY of the pool phase (default 1024)")
    ap.add_argument("--rows", help="comma-separated rows to run, in order (default: direct,socat-chain,"
                    "nodepass-swift,nodepass-go when their binaries exist, then every --tunnel)")
    ap.add_argument("--nodepass", help="our binary (default .build/release/nodepass, else .build/debug/nodepass)")
    ap.add_argument("--go", help=f"the Go NodePass binary (default {GO_DEFAULT})")
    ap.add_argument("--tunnel", nargs=2, action="append", default=[], metavar=("NAME=SERVER_CMD", "CLIENT_CMD"),
                    help="another tunnel: command templates with {tunnel_port} {user_port} {target_port} "
                         "(also {nodepass} {nodepass_go}); a builtin name replaces that row")
    ap.add_argument("--plain", action="append", default=[], metavar="NAME",
                    help="a --tunnel row that has no NodePass-style pool (no waiting for pool connections, "
                         "no pool-capacity phase)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="environment for every tunnel process (NodePass variables are otherwise unset)")
    ap.add_argument("--target-threads", type=int, default=os.cpu_count() or 2, help="threads of the target service")
    ap.add_argument("--src-ips", type=int, default=32,
                    help="loopback source addresses the load generator rotates over (0: 127.0.0.1 only)")
    ap.add_argument("--out-md", help="write the Markdown table here")
    ap.add_argument("--out-json", help="write all results as JSON here")
    ap.add_argument("--keep-logs", help="keep the process logs in this directory")
    a = ap.parse_args()

    q = a.quick
    cfg = Config(
        size=a.size or (256 * MiB if q else 2 * GiB),
        streams=a.streams,
        echo_samples=a.samples or (200 if q else 2000),
        conn_samples=a.conn_samples or (200 if q else 500),
        burst=a.burst or (100 if q else 500),
        cps_clients=a.cps_clients,
        duration=a.duration or (2.0 if q else 10.0),
        hold=a.hold or (200 if q else 1000),
        pool_capacity=a.pool_capacity,
        repeat=a.repeat,
    )
    if q:
        cfg.burst_timeout, cfg.hold_timeout, cfg.conn_timeout, cfg.stable_s = 5.0, 30.0, 40.0, 1.2
        cfg.alloc_size, cfg.alloc_conns = 256 * MiB, 50
    cfg.alloc_size = min(cfg.alloc_size, cfg.size)

    # ---- binaries and rows
    notes: List[str] = []
    np_bin = a.nodepass
    if not np_bin:
        rel, dbg = REPO / ".build/release/nodepass", REPO / ".build/debug/nodepass"
        if rel.exists():
            np_bin = str(rel)
        elif dbg.exists():
            np_bin = str(dbg)
            notes.append("nodepass-swift is a DEBUG build (.build/debug): its figures are not representative.")
    go_bin = a.go or (str(GO_DEFAULT) if GO_DEFAULT.exists() else None)
    placeholders = {"nodepass": np_bin or "", "nodepass_go": go_bin or ""}

    rows: Dict[str, Row] = {
        "direct": Row("direct", "direct"),
        "socat-chain": Row("socat-chain", "tunnel", SOCAT_SERVER, SOCAT_CLIENT, pooled=False,
                           note="socat fork per connection, two hops"),
    }
    if np_bin:
        rows["nodepass-swift"] = Row("nodepass-swift", "tunnel", NP_SERVER.replace("{bin}", shlex.quote(np_bin)),
                                     NP_CLIENT.replace("{bin}", shlex.quote(np_bin)), note=np_bin)
    if np_bin:
        for tls in ("0", "1"):
            server = NP_SERVER.replace("{bin}", shlex.quote(np_bin)).replace("server://", f"server://{BENCH_KEY}@")
            client = NP_CLIENT.replace("{bin}", shlex.quote(np_bin)).replace("client://", f"client://{BENCH_KEY}@")
            rows[f"nodepass-swift-v2-tls{tls}"] = Row(f"nodepass-swift-v2-tls{tls}", "tunnel", f"{server}&tls={tls}",
                                                      client, note=f"protocol v2, tls={tls}")
            rows[f"nodepass-swift-v2-tls{tls}-resume"] = Row(
                f"nodepass-swift-v2-tls{tls}-resume", "tunnel", f"{server}&tls={tls}&resume=1", client,
                note=f"protocol v2, tls={tls}, resumable relays")
    if go_bin:
        rows["nodepass-go"] = Row("nodepass-go", "tunnel", NP_SERVER.replace("{bin}", shlex.quote(go_bin)),
                                  NP_CLIENT.replace("{bin}", shlex.quote(go_bin)), note=go_bin)
    custom = []
    for spec, client in a.tunnel:
        name, eq, server = spec.partition("=")
        if not eq or not name or not server:
            ap.error(f"--tunnel wants NAME=SERVER_CMD CLIENT_CMD, got {spec!r}")
        fill = lambda s: s.replace("{nodepass}", placeholders["nodepass"]).replace(
            "{nodepass_go}", placeholders["nodepass_go"])
        rows[name] = Row(name, "tunnel", fill(server), fill(client),
                         pooled=name != "socat-chain" and name not in a.plain, note="custom")
        if name not in custom:
            custom.append(name)
    if a.rows:
        order = [r.strip() for r in a.rows.split(",") if r.strip()]
        for r in order:
            if r not in rows:
                hint = {"nodepass-swift": " (no nodepass binary: use --nodepass)",
                        "nodepass-go": f" (no Go binary at {GO_DEFAULT}: use --go)"}.get(r, "")
                ap.error(f"unknown row {r!r}{hint}")
    else:
        order = [r for r in BUILTIN_ROWS if r in rows] + [c for c in custom if c not in BUILTIN_ROWS]
    if any(rows[r].server.startswith("socat") for r in order) and not shutil.which("socat"):
        ap.error("socat not found: apt-get install -y socat")
    tunnel_env = {}
    for kv in a.env:
        k, eq, v = kv.partition("=")
        if not eq:
            ap.error(f"--env wants K=V, got {kv!r}")
        tunnel_env[k] = v

    # ---- limits: the tunnel processes inherit ours
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cfg.hold * 4 + cfg.pool_capacity * 2 + cfg.burst * 4 + 4096
    new_soft = max(soft, want, 65536)
    if hard != resource.RLIM_INFINITY:
        new_soft = min(hard, new_soft)
    if new_soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        except (ValueError, OSError) as exc:
            log(f"warning: cannot raise RLIMIT_NOFILE: {exc}")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < want:
        notes.append(f"RLIMIT_NOFILE is {nofile} (< {want} wanted): held/burst tests may fail for lack of fds.")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="npbench-"))
    logdir = Path(a.keep_logs) if a.keep_logs else workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, dict] = {}
    meta = {
        "mode": "quick" if q else "full",
        "size_bytes": cfg.size, "size_human": human(cfg.size),
        "config": cfg.__dict__,
        "host": f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rlimit_nofile": nofile,
        "nodepass": np_bin, "nodepass_go": go_bin,
        "socat": (subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout.splitlines()[1:2] or [""])[0]
        if shutil.which("socat") else None,
        "tunnel_env": tunnel_env,
        "rows": order,
    }
    t_start = time.monotonic()
    try:
        npb = Npb(build_npbench(workdir), a.src_ips)
        target_port = free_port()
        bench = Bench(cfg, npb, target_port, logdir, tunnel_env, build_malloccount(workdir), workdir)
        bench.target = Proc("target", [str(npb.exe), "target", str(target_port), str(a.target_threads)], None, logdir)
        wait_for(lambda: round_trip(target_port), 10, "the target service", [bench.target])
        log(f"target service on 127.0.0.1:{target_port} (pid {bench.target.pid}); rows: {', '.join(order)}")
        for name in order:
            row = rows[name]
            log(f"row {name}")
            t0 = time.monotonic()
            res = results[name] = {"kind": row.kind}
            try:
                if row.kind == "direct":
                    bench.run_direct(res)
                else:
                    bench.run_tunnel(row, res)
            except BenchError as exc:
                log(f"  row {name} FAILED: {exc}")
                res["error"] = str(exc)
            results[name]["row_seconds"] = round(time.monotonic() - t0, 1)
            bench.target.check()
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not a.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)

    meta["seconds"] = round(time.monotonic() - t_start, 1)
    notes.append(f"RLIMIT_NOFILE {nofile} for the tool and every process it starts (inherited).")
    notes.extend(bottleneck_notes(results, cfg))
    for name, r in results.items():
        if "error" in r:
            err = [ln.strip() for ln in r["error"].splitlines() if ln.strip()]
            notes.append(f"{name}: {err[0]}" + (f" … {err[-1]}" if len(err) > 1 else ""))
        for k in ("idle_sockets", "pool_sockets"):
            if r.get(k) and not r[k].get("warm"):
                notes.append(f"{name}: {k.replace('_', ' ')} did not settle: {r[k]}")
        for k in ("echo", "connlat", "burst", "cps", "hold"):
            x = r.get(k) or {}
            if x and not x.get("ok") and "error" not in x:
                bad = {f: x[f] for f in ("failures", "failed", "timed_out", "succeeded", "last_error") if x.get(f)}
                notes.append(f"{name}: {k} had failures: {bad}")
    per_row = ", ".join(f"{n} {r.get('row_seconds')} s" for n, r in results.items())
    notes.append(f"Run took {meta['seconds']} s ({per_row}).")
    meta["notes"] = notes
    md = build_markdown(results, cfg, meta)
    print(md)
    if a.out_md:
        Path(a.out_md).write_text(md)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=str) + "\n")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
