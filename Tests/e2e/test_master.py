"""Master mode: the HTTP API that NodePass's dashboards speak, driven through real HTTP (curl and urllib),
with tunnels carrying real traffic, the event stream, and the state surviving kill -9."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from support.ports import free_port
from support.processes import Proc, ProcessManager
from support.procfs import is_listening
from support.tunnel import DEFAULT_ENV
from support.waiting import ProcessDied, wait_for

pytestmark = pytest.mark.ours_only

KEY = "0123456789abcdef0123456789abcdef"
API_KEY = re.compile(r"API key (created|loaded) .*np\.key=([0-9a-f]{32})")


class Master:
    """A master process and a small client of its API."""

    def __init__(self, procs: ProcessManager, binary: str, state: Path, port: Optional[int] = None,
                 query: str = "log=debug"):
        self.procs = procs
        self.binary = binary
        self.state = state
        self.port = port or free_port()
        self.query = query
        self.proc: Optional[Proc] = None
        self.key = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self) -> "Master":
        env = dict(DEFAULT_ENV, STATE_DIRECTORY=str(self.state))
        self.proc = self.procs.start("master", [self.binary, f"master://127.0.0.1:{self.port}?{self.query}"],
                                     env=env)

        def ready() -> bool:
            if not self.proc.alive():
                raise ProcessDied(f"master exited with code {self.proc.returncode()}:\n{self.proc.tail()}")
            match = API_KEY.search(self.proc.output())
            if match:
                self.key = match.group(2)
            return bool(self.key) and is_listening(self.proc.pid, self.port)

        wait_for(ready, 20, "the master's API")
        return self

    def call(self, method: str, path: str, body: Optional[object] = None, key: Optional[str] = None,
             raw: Optional[bytes] = None) -> Tuple[int, Dict[str, str], object]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("X-API-Key", self.key if key is None else key)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, headers, text = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            status, headers, text = error.code, dict(error.headers), error.read()
        return status, headers, (json.loads(text) if text.strip() else None)

    def instance(self, instance_id: str) -> dict:
        status, _, body = self.call("GET", f"/instances/{instance_id}")
        assert status == 200, body
        return body

    def wait_status(self, instance_id: str, wanted: str, timeout: float = 20) -> dict:
        return wait_for(lambda: (lambda i: i if i["status"] == wanted else None)(self.instance(instance_id)),
                        timeout, f"instance {instance_id} {wanted}")


class EventReader:
    """Reads the event stream with curl in the background, one event (its JSON) per entry."""

    def __init__(self, master: Master):
        self.events: List[dict] = []
        self.proc = subprocess.Popen(["curl", "-s", "-N", "-H", f"X-API-Key: {master.key}", master.base + "/events"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        # Subscribed once the first initial event (the master's own record) has arrived.
        wait_for(lambda: self.events, 10, "the event stream's first event")

    def _read(self) -> None:
        name = None
        for raw in self.proc.stdout:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "instance":
                self.events.append(json.loads(line[6:]))

    def kinds(self, instance_id: str) -> List[str]:
        return [e["type"] for e in list(self.events) if (e["instance"] or {}).get("id") == instance_id]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def curl_get(port: int) -> bytes:
    result = subprocess.run(["curl", "-s", "--max-time", "10", f"http://127.0.0.1:{port}/payload.bin"],
                            capture_output=True, timeout=20)
    return result.stdout if result.returncode == 0 else b""


@pytest.fixture
def web_service(procs, tmp_path):
    """A plain HTTP server (Python's) with one file to fetch through the tunnels."""
    root = tmp_path / "www"
    root.mkdir()
    payload = os.urandom(300_000)
    (root / "payload.bin").write_bytes(payload)
    port = free_port()
    proc = procs.start("http-service", ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                        "--directory", str(root)])
    wait_for(lambda: is_listening(proc.pid, port), 15, "the HTTP service")
    return port, payload


def tunnel_pair(master: Master, service_port: int, query: str = "tls=1") -> Tuple[str, str, int]:
    """A server and a client instance in front of `service_port`; returns their IDs and the users' port."""
    tunnel_port, user_port = free_port(), free_port()
    status, _, server = master.call("POST", "/instances", {
        "url": f"server://{KEY}@127.0.0.1:{tunnel_port}/127.0.0.1:{user_port}?{query}", "alias": "edge"})
    assert status == 201, server
    status, _, client = master.call("POST", "/instances", {
        "url": f"client://{KEY}@127.0.0.1:{tunnel_port}/127.0.0.1:{service_port}"})
    assert status == 201, client
    return server["id"], client["id"], user_port


def test_the_api_manages_tunnels_that_carry_traffic(procs, nodepass_bin, tmp_path, web_service):
    service_port, payload = web_service
    master = Master(procs, nodepass_bin, tmp_path / "state").start()
    events = EventReader(master)
    try:
        # The key: required, compared, and the only way in.
        assert master.call("GET", "/instances", key="")[0] == 401
        status, headers, body = master.call("GET", "/instances", key="f" * 32)
        assert status == 401 and body == {"error": "Unauthorized: Invalid API key"}
        assert headers["Access-Control-Allow-Origin"] == "*"
        status, _, listing = master.call("GET", "/instances")
        assert status == 200 and [i["id"] for i in listing] == ["********"]
        assert listing[0]["url"] == master.key and re.fullmatch(r"[0-9a-f]{16}", listing[0]["config"])

        server_id, client_id, user_port = tunnel_pair(master, service_port)
        server = master.wait_status(server_id, "running")
        assert server["type"] == "server" and server["alias"] == "edge" and server["restart"] is True
        assert server["url"].endswith("&log=debug") and "mode=0" in server["config"]
        assert set(server) == {"id", "alias", "type", "status", "url", "config", "restart", "meta", "mode", "ping",
                               "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx"}
        master.wait_status(client_id, "running")

        # Traffic through the two instances, fetched with curl; the counters follow.
        assert wait_for(lambda: curl_get(user_port) == payload, 30, "a download through the tunnel")
        moved = wait_for(lambda: (lambda i: i if i["tcptx"] >= len(payload) else None)(master.instance(server_id)),
                         10, "the server's counters")
        assert moved["tcprx"] > 0 and moved["mode"] == 1

        # reset, stop, start, restart.
        status, _, reset = master.call("PATCH", f"/instances/{server_id}", {"action": "reset"})
        assert status == 200 and reset["tcprx"] == 0 and reset["tcptx"] == 0
        status, _, stopped = master.call("PATCH", f"/instances/{client_id}", {"action": "stop"})
        assert status == 200 and stopped["status"] == "stopped"
        assert curl_get(user_port) != payload
        master.call("PATCH", f"/instances/{client_id}", {"action": "start"})
        master.wait_status(client_id, "running")
        assert wait_for(lambda: curl_get(user_port) == payload, 30, "traffic after start")
        assert master.call("PATCH", f"/instances/{server_id}", {"action": "restart"})[0] == 200
        master.wait_status(server_id, "running")
        assert wait_for(lambda: curl_get(user_port) == payload, 30, "traffic after a restart")

        # alias, policy and meta; what is malformed is refused and changes nothing.
        status, _, patched = master.call("PATCH", f"/instances/{server_id}", {
            "alias": "db", "restart": False, "meta": {"peer": {"sid": "s-1", "type": "1", "alias": "p"},
                                                        "tags": {"env": "test"}}})
        assert status == 200 and patched["alias"] == "db" and patched["restart"] is False
        assert patched["meta"] == {"peer": {"sid": "s-1", "type": "1", "alias": "p"}, "tags": {"env": "test"}}
        for method, path, raw in [("POST", "/instances", b"{not json"), ("POST", "/instances", b'{"url":"ftp://x"}'),
                                  ("PATCH", f"/instances/{server_id}", b'{"action":"fly"}'),
                                  ("PATCH", f"/instances/{server_id}", b'{"alias":' + b'"x' * 300 + b'"}'),
                                  ("PUT", f"/instances/{server_id}", b'{"url":""}'), ("POST", "/info", b"[]")]:
            status, _, body = master.call(method, path, raw=raw)
            assert status == 400 and isinstance(body["error"], str), (method, path, body)
        assert master.instance(server_id)["alias"] == "db"
        assert len(master.call("GET", "/instances")[2]) == 3
        assert master.call("GET", "/instances/ffffffff")[0] == 404
        assert master.call("POST", "/events")[0] == 405
        assert master.call("PUT", "/instances/********", {"url": "client://:1/:2"})[0] == 403

        # A new URL: the client runs with it (and the same URL again is a conflict).
        new_url = f"client://{KEY}@127.0.0.1:{master.instance(server_id)['url'].split(':')[2].split('/')[0]}" \
                  f"/127.0.0.1:{service_port}?log=info"
        status, _, put = master.call("PUT", f"/instances/{client_id}", {"url": new_url})
        assert status == 200 and put["url"] == new_url
        assert master.call("PUT", f"/instances/{client_id}", {"url": new_url})[0] == 409
        master.wait_status(client_id, "running")
        assert wait_for(lambda: curl_get(user_port) == payload, 30, "traffic after a new URL")

        # info, tcping, the description.
        status, _, info = master.call("POST", "/info", {"alias": "lab"})
        assert status == 200 and info["alias"] == "lab" and info["mid"] == listing[0]["config"]
        assert info["os"] == "linux" and info["tls"] == "0" and info["uptime"] >= 0 and info["mem_total"] > 0
        status, _, ping = master.call("GET", f"/tcping?target=127.0.0.1:{service_port}")
        assert status == 200 and ping["connected"] is True and ping["error"] is None
        status, _, ping = master.call("GET", f"/tcping?target=127.0.0.1:{free_port()}")
        assert status == 200 and ping["connected"] is False and ping["error"] == "connection refused"
        assert master.call("GET", "/tcping")[0] == 400
        status, _, document = master.call("GET", "/openapi.json", key="")
        assert status == 200 and "/instances/{id}" in document["paths"]

        # Delete: the tunnel stops; the users' port closes.
        status, _, _ = master.call("DELETE", f"/instances/{client_id}")
        assert status == 204
        assert master.call("GET", f"/instances/{client_id}")[0] == 404

        # The stream saw every change of the client, in order.
        wait_for(lambda: "delete" in events.kinds(client_id), 10, "the delete event")
        kinds = [k for k in events.kinds(client_id) if k != "log"]
        assert kinds[0] == "create" and kinds[-1] == "delete", kinds
        assert "log" in events.kinds(client_id)
        assert events.events[0]["type"] == "initial" and events.events[0]["instance"]["id"] == "********"
    finally:
        events.stop()

    # SIGTERM: subscribers get a shutdown event, the exit is clean, and the state keeps the server instance.
    watcher = EventReader(master)
    master.proc.signal(signal.SIGTERM)
    assert master.proc.wait(15) == 0
    watcher.proc.wait(10)
    watcher.thread.join(5)
    assert watcher.events[-1]["type"] == "shutdown" and watcher.events[-1]["instance"] is None
    saved = json.loads((tmp_path / "state" / "master.json").read_text())
    assert [i["id"] for i in saved["instances"]] == [server_id]


def test_the_state_is_private_and_one_master_holds_it(procs, nodepass_bin, tmp_path):
    state = tmp_path / "state"
    master = Master(procs, nodepass_bin, state).start()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "master.json").st_mode) == 0o600
    second = procs.start("second", [nodepass_bin, f"master://127.0.0.1:{free_port()}"],
                         env=dict(DEFAULT_ENV, STATE_DIRECTORY=str(state)))
    assert second.wait(15) == 1
    assert "another master uses the state directory" in second.output()
    master.proc.signal(signal.SIGTERM)
    assert master.proc.wait(15) == 0

    # A damaged file is not overwritten: the master refuses to start and says why.
    (state / "master.json").write_text('{"version": 1, "master": ')
    broken = procs.start("broken", [nodepass_bin, f"master://127.0.0.1:{free_port()}"],
                         env=dict(DEFAULT_ENV, STATE_DIRECTORY=str(state)))
    assert broken.wait(15) == 1
    assert "is damaged" in broken.output()
    assert (state / "master.json").read_text() == '{"version": 1, "master": '


def test_kill_9_at_any_moment_loses_nothing_the_api_confirmed(procs, nodepass_bin, tmp_path, web_service):
    service_port, payload = web_service
    state = tmp_path / "state"
    port = free_port()
    rng = random.Random(16)
    confirmed: set = set()
    deleted: set = set()
    # A pair that carries traffic before the crashes and must carry it again after them.
    master = Master(procs, nodepass_bin, state, port=port).start()
    pair_server, pair_client, user_port = tunnel_pair(master, service_port, query="tls=0")
    assert wait_for(lambda: curl_get(user_port) == payload, 30, "traffic before the crashes")
    master.proc.signal(signal.SIGTERM)
    assert master.proc.wait(15) == 0
    for round_number in range(20):
        master = Master(procs, nodepass_bin, state, port=port, query="log=info").start()
        listing = {i["id"] for i in master.call("GET", "/instances")[2]}
        assert confirmed <= listing, f"round {round_number}: lost {confirmed - listing}"
        assert not (deleted & listing), f"round {round_number}: deleted instances came back"
        # Requests go on in a thread while the master is killed at a random moment, often mid-request.
        stop = threading.Event()

        def churn() -> None:
            while not stop.is_set():
                try:
                    if len(confirmed) >= 8 or (confirmed and rng.random() < 0.3):
                        victim = rng.choice(sorted(confirmed))
                        confirmed.discard(victim)  # unknown until the answer comes
                        if master.call("DELETE", f"/instances/{victim}")[0] == 204:
                            deleted.add(victim)
                    else:
                        status, _, body = master.call("POST", "/instances", {
                            "url": f"client://{KEY}@127.0.0.1:{free_port()}/127.0.0.1:{service_port}?log=warn"})
                        if status == 201:
                            confirmed.add(body["id"])
                except (OSError, urllib.error.URLError):
                    return

        worker = threading.Thread(target=churn, daemon=True)
        worker.start()
        time.sleep(rng.uniform(0.05, 0.6))  # the random moment of the crash, not a synchronisation
        master.proc.kill9()
        master.proc.wait(5)
        stop.set()
        worker.join(20)
        assert not worker.is_alive()
        json.loads((state / "master.json").read_text())
    master = Master(procs, nodepass_bin, state, port=port).start()
    listing = {i["id"] for i in master.call("GET", "/instances")[2]}
    assert confirmed <= listing and not (deleted & listing)
    assert len(deleted) >= 10, "the rounds made and deleted too few instances to mean anything"
    assert {pair_server, pair_client} <= listing
    # The instances run again after the crashes, and the pair's tunnel carries traffic.
    for instance_id in confirmed | {pair_server, pair_client}:
        master.wait_status(instance_id, "running")
    assert wait_for(lambda: curl_get(user_port) == payload, 30, "traffic after 20 crashes")


def test_prometheus_labels_each_tunnel_metric_with_its_instance(procs, nodepass_bin, tmp_path):
    metrics_port = free_port()
    master = Master(procs, nodepass_bin, tmp_path / "state", query=f"metrics=127.0.0.1:{metrics_port}").start()
    status, _, server = master.call("POST", "/instances", {
        "url": f"server://{KEY}@127.0.0.1:{free_port()}/127.0.0.1:{free_port()}?tls=0"})
    assert status == 201
    master.wait_status(server["id"], "running")
    # A restart makes the tunnel's metrics again, under the same labels.
    master.call("PATCH", f"/instances/{server['id']}", {"action": "restart"})
    master.wait_status(server["id"], "running")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    text = wait_for(lambda: (lambda t: t if "nodepass_connections_active" in t else None)(scrape()), 10,
                    "the tunnel's metrics")
    samples = [line for line in text.splitlines() if line.startswith("nodepass_")]
    # One gauge belongs to the process, not to a tunnel: the bytes all relays hold (BUFFER_BUDGET).
    process_wide = [line for line in samples if line.startswith("nodepass_relay_buffered_bytes")]
    tunnel_samples = [line for line in samples if line not in process_wide]
    assert len(process_wide) == 1 and float(process_wide[0].split()[1]) == 0, process_wide
    assert tunnel_samples and all(f'instance="{server["id"]}"' in line for line in tunnel_samples), samples[:5]


def test_tls_1_serves_the_api_over_https_with_the_logged_certificate(procs, nodepass_bin, tmp_path):
    master = Master(procs, nodepass_bin, tmp_path / "state", query="tls=1").start()
    logged = re.search(r"np\.fingerprint=([0-9A-F:]{95})", master.proc.output())
    assert logged, master.proc.output()
    # The certificate the server shows is the one whose fingerprint it logged.
    shown = subprocess.run(
        f"openssl s_client -connect 127.0.0.1:{master.port} </dev/null 2>/dev/null | openssl x509 -noout "
        "-fingerprint -sha256", shell=True, capture_output=True, text=True, timeout=30).stdout
    assert shown.strip().split("=")[-1] == logged.group(1)
    result = subprocess.run(["curl", "-sk", "-H", f"X-API-Key: {master.key}",
                             f"https://127.0.0.1:{master.port}/api/v1/instances"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and json.loads(result.stdout)[0]["id"] == "********"
    # Plain HTTP to the TLS port gets no API answer.
    plain = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                            f"http://127.0.0.1:{master.port}/api/v1/instances"],
                           capture_output=True, text=True, timeout=20)
    assert plain.stdout != "200"


def test_a_change_that_cannot_be_saved_is_refused_and_undone(procs, nodepass_bin, tmp_path):
    state = tmp_path / "state"
    master = Master(procs, nodepass_bin, state).start()
    status, _, kept = master.call("POST", "/instances", {"url": f"client://{KEY}@127.0.0.1:{free_port()}/127.0.0.1:1"})
    assert status == 201
    # A directory where the temporary file goes makes every save fail.
    (state / "master.json.tmp").mkdir()
    status, _, body = master.call("POST", "/instances", {"url": f"client://127.0.0.1:{free_port()}/127.0.0.1:1"})
    assert status == 500 and body["error"]
    assert master.call("DELETE", f"/instances/{kept['id']}")[0] == 500
    status, _, key_record = master.call("PATCH", "/instances/********", {"action": "restart"})
    assert status == 500
    listing = master.call("GET", "/instances")[2]
    assert [i["id"] for i in listing] == ["********", kept["id"]] and listing[0]["url"] == master.key
    (state / "master.json.tmp").rmdir()
    assert master.call("POST", "/instances", {"url": f"client://127.0.0.1:{free_port()}/127.0.0.1:1"})[0] == 201


def test_overlapping_restarts_leave_one_run_that_works(procs, nodepass_bin, tmp_path, web_service):
    service_port, payload = web_service
    master = Master(procs, nodepass_bin, tmp_path / "state").start()
    server_id, client_id, user_port = tunnel_pair(master, service_port, query="tls=0")
    master.call("PATCH", f"/instances/{server_id}", {"restart": False})
    master.wait_status(server_id, "running")
    threads = [threading.Thread(target=master.call, args=("PATCH", f"/instances/{server_id}", {"action": "restart"}))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    master.wait_status(server_id, "running")
    assert wait_for(lambda: curl_get(user_port) == payload, 30, "traffic after overlapping restarts")
    assert "address already in use" not in master.proc.output().lower()


def test_dashboard_forms_of_requests_are_understood(procs, nodepass_bin, tmp_path):
    master = Master(procs, nodepass_bin, tmp_path / "state").start()
    status, _, made = master.call("POST", "/instances", {"url": f"client://127.0.0.1:{free_port()}/127.0.0.1:1"})
    assert status == 201
    status, _, patched = master.call("PATCH", f"/instances/{made['id']}", {"meta": {"peer": {"sid": "s"}}})
    assert status == 200 and patched["meta"]["peer"] == {"sid": "s", "type": "", "alias": ""}
    status, _, record = master.call("GET", "/instances/%2A%2A%2A%2A%2A%2A%2A%2A")
    assert status == 200 and record["url"] == master.key
    assert master.call("POST", "/info", {})[0] == 200


def test_strangers_cannot_hold_the_api(procs, nodepass_bin, tmp_path):
    master = Master(procs, nodepass_bin, tmp_path / "state").start()
    # A request that trickles in is cut after the deadline, though bytes keep coming.
    slow = socket.create_connection(("127.0.0.1", master.port), timeout=20)
    slow.sendall(b"GET /api/v1/instances HTTP/1.1\r\n")
    start = time.monotonic()
    closed = False
    while time.monotonic() - start < 20:
        try:
            slow.sendall(b"X-Slow: 1\r\n")
        except OSError:
            closed = True
            break
        slow.settimeout(1)
        try:
            if slow.recv(1024) == b"":
                closed = True
                break
        except socket.timeout:
            pass
    assert closed and time.monotonic() - start < 15
    slow.close()
    # One address holds at most 32 connections; the API still answers others... and that address again
    # once it lets go.
    held = [socket.create_connection(("127.0.0.1", master.port), timeout=5) for _ in range(40)]
    try:
        refused = 0
        for sock in held:
            sock.settimeout(3)
            try:
                sock.sendall(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
                if sock.recv(64) == b"":
                    refused += 1
            except OSError:
                refused += 1
        assert refused >= 8
    finally:
        for sock in held:
            sock.close()
    assert wait_for(lambda: master.call("GET", "/openapi.json", key="")[0] == 200, 10, "the API after the flood")
