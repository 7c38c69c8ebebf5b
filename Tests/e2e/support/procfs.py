"""TCP sockets of a process, read from /proc (looking never connects to anything)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str


def tcp_sockets(pid: int) -> List[TcpSocket]:
    """TCP sockets (v4 and v6) owned by process pid, read from /proc."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[9] not in inodes:
                continue
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            found.append(TcpSocket(local_port, remote_port, parts[3]))
    return found


def is_listening(pid: int, port: int) -> bool:
    return any(s.state == TCP_LISTEN and s.local_port == port for s in tcp_sockets(pid))
