"""Resumable relays (the server's resume=1) across separate hosts: network namespaces joined by veth pairs
(support/netns.py), user -- server -- client -- service. The link between server and client goes down for
10 s under an interactive SSH session and under a PostgreSQL transaction; the client's address changes in
the middle of a transfer; pool connections are killed every 2 s. Real sshd, ssh, postgres and psql."""

from __future__ import annotations

import glob
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

from scenarios import echo_stream_in_background
from support.data import MiB
from support.netns import Hosts, needs_namespaces, port_in_namespace
from support.processes import HELPER_SERVERS, Proc
from support.procfs import is_listening
from support.sockets import connect
from support.tunnel import DEFAULT_ENV
from support.waiting import ProcessDied, wait_for

pytestmark = pytest.mark.ours_only

KEY = "e2e-resume-netns-" + secrets.token_hex(12)
# How long the link between server and client stays down.
OUTAGE_S = 10.0


@pytest.fixture
def hosts(procs):
    needs_namespaces()
    with Hosts() as made:
        yield made
        # The processes inside go before their namespaces.
        procs.stop_all()


class NetTunnel:
    """A resumable v2 tunnel across the hosts: the server listens on its back address (for the client) and
    its front address (for users); the client dials the service on the service's host. Heartbeats every
    second (the tests' default), so a control channel whose path is down is given up after 3 s."""

    def __init__(self, procs, nodepass_bin: str, hosts: Hosts, service_port: int, query: str = ""):
        self.procs = procs
        self.hosts = hosts
        self.tunnel_port = port_in_namespace()
        self.target_port = port_in_namespace()
        while self.target_port == self.tunnel_port:
            self.target_port = port_in_namespace()
        self.server_url = (f"server://{KEY}@{hosts.server_back}:{self.tunnel_port}/"
                           f"{hosts.server_front}:{self.target_port}?log=debug&resume=1{query}")
        self.client_url = (f"client://{KEY}@{hosts.server_back}:{self.tunnel_port}/"
                           f"{hosts.service_addr}:{service_port}?log=debug")
        self.env = dict(DEFAULT_ENV, RESUME_GRACE="60s")
        self.nodepass_bin = nodepass_bin
        self.server: Optional[Proc] = None
        self.client: Optional[Proc] = None

    def start(self) -> "NetTunnel":
        self.server = self.procs.start("server", Hosts.inside(self.hosts.server_ns,
                                                              [self.nodepass_bin, self.server_url]), env=self.env)
        wait_for(lambda: self.alive() and is_listening(self.server.pid, self.tunnel_port), 20,
                 "the server's tunnel port")
        self.client = self.procs.start("client", Hosts.inside(self.hosts.client_ns,
                                                              [self.nodepass_bin, self.client_url]), env=self.env)
        wait_for(lambda: self.alive() and "connected to the server" in self.client.output(), 20,
                 "the client's control channel")
        return self

    def alive(self) -> bool:
        for proc in (self.server, self.client):
            if proc is not None and not proc.alive():
                raise ProcessDied(f"{proc.name} exited with code {proc.returncode()}")
        return True

    def wait_resumed(self, timeout: float) -> None:
        """Waits for a relay to resume on the client's side (a path that broke the control channel also
        moves every relay to a new pool connection once the control channel is back)."""
        wait_for(lambda: self.alive() and "relay resumed" in self.client.output(), timeout,
                 "a relay to resume on a new pool connection")

    def check_no_relay_was_given_up(self) -> None:
        for proc in (self.server, self.client):
            assert "did not come back within RESUME_GRACE" not in proc.output(), f"{proc.name} gave a relay up"


class Session:
    """An interactive program (ssh, psql) whose standard input and output are pipes: lines are typed in,
    and lines read out by a thread, so that waiting for one is bounded."""

    def __init__(self, args: List[str], log: Path):
        self.log = open(log, "wb")
        self.popen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                      start_new_session=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen: List[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.popen.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def type(self, line: str) -> None:
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def expect(self, wanted: str, timeout: float) -> str:
        """Waits for an output line equal to `wanted`, or starting with it when it ends with "*"."""
        prefix = wanted[:-1] if wanted.endswith("*") else None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.01, remaining))
            except queue.Empty:
                raise AssertionError(f"no line {wanted!r} within {timeout:.0f}s; output so far: {self.seen[-20:]}")
            if line is None:
                raise AssertionError(f"the session ended (rc {self.popen.wait(10)}) before {wanted!r}; output: "
                                     f"{self.seen[-20:]}")
            self.seen.append(line)
            if line == wanted or (prefix is not None and line.startswith(prefix)):
                return line

    def finish(self, timeout: float = 30) -> int:
        """Closes its input and waits for it to exit; returns its exit code."""
        try:
            self.popen.stdin.close()
        except OSError:
            pass
        try:
            return self.popen.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self.log.close()


def outage(hosts: Hosts, during=None) -> None:
    """The link between server and client down for OUTAGE_S seconds (the fault's length, not a wait for an
    event); `during` runs 2 s into it."""
    hosts.set_link(False)
    try:
        time.sleep(2.0)
        if during is not None:
            during()
        time.sleep(OUTAGE_S - 2.0)
    finally:
        hosts.set_link(True)


# --------------------------------------------------------------------------- SSH


def start_sshd(procs, hosts: Hosts, home: Path) -> tuple:
    """sshd on the service's host with a fresh host key and a key for root; returns (port, client key)."""
    sshd = "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else shutil.which("sshd")
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd, ssh or ssh-keygen not installed (Debian packages: openssh-server, openssh-client)")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True,
                       timeout=30)
    shutil.copy(home / "user_key.pub", home / "authorized_keys")
    # sshd's privilege separation needs this directory to exist.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = 22
    config = home / "sshd_config"
    config.write_text(f"""ListenAddress {hosts.service_addr}:{port}
HostKey {home / 'host_key'}
PidFile {home / 'sshd.pid'}
AuthorizedKeysFile {home / 'authorized_keys'}
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
""")
    proc = procs.start("sshd", Hosts.inside(hosts.service_ns, [sshd, "-D", "-e", "-f", str(config)]))
    wait_for(lambda: proc.alive() and is_listening(proc.pid, port), 20, "sshd listening")
    return port, home / "user_key"


def ssh_banner(host: str, port: int) -> bool:
    with connect(host, port, timeout=5) as sock:
        return sock.recv(64).startswith(b"SSH-2.0-")


def test_an_ssh_session_goes_on_after_the_link_is_down_for_10s(procs, nodepass_bin, hosts, tmp_path):
    """A shell over SSH through the tunnel; the link between server and client goes down for 10 s, and a
    command is typed in the middle of it. Afterwards the same shell (same variable, same process) answers
    that command and the next one: the user saw a pause, nothing else."""
    port, key = start_sshd(procs, hosts, tmp_path)
    tunnel = NetTunnel(procs, nodepass_bin, hosts, port).start()
    wait_for(lambda: tunnel.alive() and ssh_banner(hosts.server_front, tunnel.target_port), 30,
             "sshd's banner through the tunnel")
    shell = Session(["ssh", "-T", "-i", str(key), "-p", str(tunnel.target_port), "-o", "BatchMode=yes",
                     "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "ConnectTimeout=20", f"root@{hosts.server_front}", "sh"], tmp_path / "ssh.log")
    try:
        mark = secrets.token_hex(4)
        shell.type(f"MARK={mark}; echo \"before $MARK $$\"")
        pid = shell.expect(f"before {mark} *", 30).split()[-1]
        outage(hosts, during=lambda: shell.type("echo \"during $MARK $$\""))
        shell.expect(f"during {mark} {pid}", 90)
        # The control channel was given up 3 s into the outage; once it is back the relay moves to a new pool
        # connection, and the session goes on over that one.
        tunnel.wait_resumed(90)
        shell.type("echo \"after $MARK $$\"")
        shell.expect(f"after {mark} {pid}", 30)
        shell.type("exit 0")
        assert shell.finish() == 0, (tmp_path / "ssh.log").read_text(errors="replace")
    finally:
        shell.stop()
    tunnel.check_no_relay_was_given_up()


# --------------------------------------------------------------------------- PostgreSQL


def start_postgres(procs, hosts: Hosts, request) -> int:
    """A PostgreSQL server on the service's host (a new cluster, trust authentication, run as the postgres
    user); returns its port."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not binaries or shutil.which("psql") is None or shutil.which("setpriv") is None:
        pytest.skip("postgres, psql or setpriv not installed (Debian packages: postgresql, util-linux)")
    bindir = Path(binaries[-1]).parent
    # Outside pytest's (root-only) temporary folder: the postgres user must reach it.
    data = Path(tempfile.mkdtemp(prefix="np-e2e-pg-"))
    request.addfinalizer(lambda: shutil.rmtree(data, ignore_errors=True))
    shutil.chown(data, "postgres", "postgres")
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    with open(data / "db" / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {hosts.client_back}/32 trust\n")
    port = 5432
    proc = procs.start("postgres", Hosts.inside(hosts.service_ns, [
        *as_postgres, str(bindir / "postgres"), "-D", str(data / "db"), "-c", f"listen_addresses={hosts.service_addr}",
        "-c", f"port={port}", "-c", f"unix_socket_directories={data}", "-c", "fsync=off"]))
    wait_for(lambda: proc.alive() and is_listening(proc.pid, port), 60, "postgres listening")
    return port


def psql(host: str, port: int, *extra: str) -> List[str]:
    # stdbuf: psql's output to a pipe is line-buffered, so each answer can be awaited.
    return ["stdbuf", "-oL", "psql", "-h", host, "-p", str(port), "-U", "postgres", "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1", *extra, "postgres"]


def test_a_postgresql_transaction_goes_on_after_the_link_is_down_for_10s(procs, nodepass_bin, hosts, tmp_path,
                                                                          request):
    """psql through the tunnel opens a transaction and inserts a row; the link between server and client goes
    down for 10 s with an INSERT sent in the middle of it; the same backend then takes a third row and
    commits. A new connection through the tunnel reads all three."""
    port = start_postgres(procs, hosts, request)
    tunnel = NetTunnel(procs, nodepass_bin, hosts, port).start()
    front = (hosts.server_front, tunnel.target_port)

    def ready() -> bool:
        tunnel.alive()
        return subprocess.run(psql(*front, "-c", "SELECT 1"), capture_output=True, timeout=30).returncode == 0

    wait_for(ready, 60, "postgres through the tunnel")
    session = Session(psql(*front), tmp_path / "psql.log")
    try:
        session.type("CREATE TABLE moves (n int);")
        session.type("BEGIN;")
        session.type("INSERT INTO moves VALUES (1);")
        session.type("SELECT 'backend ' || pg_backend_pid();")
        backend = session.expect("backend *", 30)
        outage(hosts, during=lambda: session.type("INSERT INTO moves VALUES (2);\n\\echo inserted during"))
        session.expect("inserted during", 90)
        tunnel.wait_resumed(90)
        session.type("INSERT INTO moves VALUES (3);")
        session.type("SELECT 'backend ' || pg_backend_pid();")
        assert session.expect("backend *", 30) == backend, "the transaction moved to another backend"
        session.type("COMMIT;")
        session.type("\\echo committed")
        session.expect("committed", 30)
        assert session.finish() == 0, (tmp_path / "psql.log").read_text(errors="replace")
    finally:
        session.stop()
    rows = subprocess.run(psql(*front, "-c", "SELECT count(*) || ' ' || sum(n) FROM moves"), capture_output=True,
                          text=True, timeout=30)
    assert rows.stdout.strip() == "3 6", f"rows after the commit: {rows.stdout!r} {rows.stderr!r}"
    tunnel.check_no_relay_was_given_up()


# --------------------------------------------------------------------------- moves and kills


def start_echo(procs, hosts: Hosts) -> int:
    port = port_in_namespace()
    proc = procs.start("echo-service", Hosts.inside(hosts.service_ns, [
        sys.executable, str(HELPER_SERVERS), "echo", "--host", hosts.service_addr, "--port", str(port)]))
    wait_for(lambda: proc.alive() and is_listening(proc.pid, port), 15, "the echo service")
    return port


def check_stream(thread, result, mib: int, deadline: float) -> None:
    thread.join(deadline)
    assert not thread.is_alive(), f"the transfer still runs after {deadline:.0f}s ({result.recv_bytes} bytes back)"
    assert result.error is None, result.error
    assert result.recv_bytes == mib * MiB, f"{result.recv_bytes} bytes came back of {mib * MiB}"
    assert result.sent_digest == result.recv_digest, "what came back differs from what was sent"


def test_a_transfer_goes_on_when_the_client_moves_to_a_new_address(procs, nodepass_bin, hosts):
    """In the middle of a 256 MiB echo, the client's address changes (the new one added, the old one
    removed): its connections are dead, the control channel is given up after 3 s of silence and dialled
    again from the new address, and the relay resumes there. Every byte comes back once, in order."""
    tunnel = NetTunnel(procs, nodepass_bin, hosts, start_echo(procs, hosts)).start()
    mib = 256
    thread, result = echo_stream_in_background(hosts.server_front, tunnel.target_port, mib)
    wait_for(lambda: tunnel.alive() and result.recv_bytes >= 16 * MiB, 60, "the first 16 MiB back")
    hosts.move_client()
    assert result.recv_bytes < mib * MiB, "the transfer ended before the move: nothing was tested"
    tunnel.wait_resumed(60)
    check_stream(thread, result, mib, 120)
    tunnel.check_no_relay_was_given_up()
    moved = hosts.run(hosts.server_ns, "ss", "-tnH", "state", "established", "dst", hosts.client_front_moved)
    assert moved.stdout.strip(), "the server has no connection from the client's new address"


def test_every_byte_arrives_once_while_pool_connections_are_killed_every_2s_across_hosts(procs, nodepass_bin,
                                                                                        hosts):
    """256 MiB echoed while the server's host kills its pool connections (`ss -K`) every 2 s."""
    if shutil.which("ss") is None:
        pytest.skip("ss not installed (Debian package: iproute2)")
    tunnel = NetTunnel(procs, nodepass_bin, hosts, start_echo(procs, hosts)).start()
    pool = int(wait_for(lambda: (tunnel.server.output().split("np.pool=") + [""])[1].split(" ")[0], 10,
                        "the server's pool port"))
    mib = 256
    thread, result = echo_stream_in_background(hosts.server_front, tunnel.target_port, mib)
    kills = 0
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(2.0)
        if thread.is_alive():
            hosts.run(hosts.server_ns, "ss", "-K", "state", "established", f"( sport = :{pool} )")
            kills += 1
    check_stream(thread, result, mib, 10)
    assert kills >= 1, "the transfer ended before the first kill: nothing was tested"
    tunnel.wait_resumed(1)
    tunnel.check_no_relay_was_given_up()
