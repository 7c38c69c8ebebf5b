#!/usr/bin/env python3
"""Small TCP services used behind the tunnel by the end-to-end tests.

    servers.py echo   --host 127.0.0.1 --port 12345
    servers.py digest --host ::1       --port 12345

echo:   echoes every byte until EOF, then shuts down its write side (half-close aware).
digest: reads until EOF, replies with the SHA-256 hex digest (64 ASCII bytes) of
        what it read, then closes.
stall:  a service that stops reading some connections: one whose first read starts
        with "stall" is never read again (held open until IDLE_TIMEOUT); any other
        is an echo.

One thread per connection, so many streams run at once. Every socket has a
timeout, so a stuck peer cannot keep a thread forever. The test harness kills
the process at the end of each test.
"""

import argparse
import hashlib
import socket
import sys
import threading

IDLE_TIMEOUT = 120.0
CHUNK = 256 * 1024


def handle_echo(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        conn.sendall(view[:n])
    conn.shutdown(socket.SHUT_WR)


def handle_digest(conn: socket.socket) -> None:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        digest.update(view[:n])
    conn.sendall(digest.hexdigest().encode("ascii"))
    conn.shutdown(socket.SHUT_WR)


def handle_stall(conn: socket.socket) -> None:
    first = conn.recv(CHUNK)
    if first.startswith(b"stall"):
        threading.Event().wait(IDLE_TIMEOUT)
        return
    if first:
        conn.sendall(first)
        handle_echo(conn)


HANDLERS = {"echo": handle_echo, "digest": handle_digest, "stall": handle_stall}


def serve(mode: str, host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    print(f"{mode} server listening on {host} port {port}", flush=True)
    handler = HANDLERS[mode]

    def run(conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT)
            handler(conn)
        except OSError as exc:
            print(f"{mode}: connection error: {exc!r}", file=sys.stderr, flush=True)
        finally:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(HANDLERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args.mode, args.host, args.port)


if __name__ == "__main__":
    main()
