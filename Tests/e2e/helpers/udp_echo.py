#!/usr/bin/env python3
"""A UDP echo service used behind the tunnel by the end-to-end tests.

    udp_echo.py --host 127.0.0.1 --port 12345 [--delay-ms 5]

Sends every datagram back, unchanged, to the address it came from, and prints "ready" once bound.
--delay-ms makes a slow service: it waits that long before each echo (a flood then queues in front of
it). The test harness kills the process at the end of each test.
"""

import argparse
import socket
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((args.host, args.port))
    print("ready", flush=True)
    while True:
        data, address = sock.recvfrom(65535)
        if args.delay_ms:
            time.sleep(args.delay_ms / 1000)
        try:
            sock.sendto(data, address)
        except OSError as error:
            print(f"send to {address} failed: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
