"""Child processes of a test (output to log files, stopped at its end) and the helper services."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .ports import free_port
from .procfs import is_listening
from .waiting import ProcessDied, wait_for

HELPER_SERVERS = Path(__file__).resolve().parent.parent / "helpers" / "servers.py"

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Proc:
    """A child process whose stdout and stderr go to files."""

    def __init__(self, name: str, args: Sequence[str], popen: subprocess.Popen, stdout_path: Path,
                 stderr_path: Path, files):
        self.name = name
        self.args = list(args)
        self.popen = popen
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self._files = files

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL and reap (bounded)."""
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after grace seconds; always reaps and closes the log files."""
        try:
            if self.alive():
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=10)
        finally:
            for f in self._files:
                try:
                    f.close()
                except OSError:
                    pass

    def output(self) -> str:
        text = ""
        for path in (self.stdout_path, self.stderr_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return ANSI.sub("", text)

    def tail(self, lines: int = 60) -> str:
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            try:
                content = ANSI.sub("", path.read_text(errors="replace")).splitlines()
            except OSError:
                content = ["<unreadable>"]
            shown = content[-lines:]
            skipped = len(content) - len(shown)
            head = f"--- {self.name} (pid {self.pid}, rc {self.popen.poll()}) {label}: {path}"
            if skipped:
                head += f" [last {len(shown)} of {len(content)} lines]"
            parts.append(head + "\n" + "\n".join(shown))
        return "\n".join(parts)


class ProcessManager:
    """Starts processes for one test and stops all of them at its end."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.procs: List[Proc] = []
        self._names: Dict[str, int] = {}

    def start(self, name: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None) -> Proc:
        count = self._names.get(name, 0) + 1
        self._names[name] = count
        unique = name if count == 1 else f"{name}-{count}"
        out_path = self.log_dir / f"{unique}.stdout.log"
        err_path = self.log_dir / f"{unique}.stderr.log"
        out = open(out_path, "wb")
        err = open(err_path, "wb")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        popen = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=full_env,
                                 cwd=cwd, start_new_session=True)
        proc = Proc(unique, args, popen, out_path, err_path, [out, err])
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass

    def tails(self, lines: int = 60) -> str:
        return "\n\n".join(p.tail(lines) for p in self.procs)

    # ---- helper services

    def start_helper(self, mode: str, host: str = "127.0.0.1") -> "Service":
        """Start helpers/servers.py MODE on a free port and wait until it accepts."""
        port = free_port(host)
        proc = self.start(f"{mode}-service", [sys.executable, str(HELPER_SERVERS), mode, "--host", host,
                                               "--port", str(port)])
        def ready() -> bool:
            if not proc.alive():
                raise ProcessDied(f"{mode} service exited with code {proc.returncode()}")
            return is_listening(proc.pid, port)

        wait_for(ready, 15, f"{mode} service on port {port}")
        return Service(host, port, proc)


@dataclass
class Service:
    host: str
    port: int
    proc: Optional[Proc] = None
