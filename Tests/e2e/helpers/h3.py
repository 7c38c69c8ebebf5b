#!/usr/bin/env python3
"""An HTTP/3 (QUIC) server and client on aioquic (PyPI), for the UDP end-to-end tests.

    h3.py serve --port P --cert C --key K      serves GET /blob/N: N bytes of a fixed pattern; prints "ready"
    h3.py get --port P --path /blob/N          GETs the path over HTTP/3; prints "status S bytes N sha256 H"

QUIC, TLS 1.3 and HTTP/3 are aioquic's; this file only wires its server and client together.
"""

import argparse
import asyncio
import hashlib
import sys

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 64
    return (block * (size // len(block) + 1))[:size]


class Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                headers = dict(h3_event.headers)
                path = headers.get(b":path", b"/").decode()
                if path.startswith("/blob/") and path[6:].isdigit() and int(path[6:]) <= 64 << 20:
                    body, status = pattern(int(path[6:])), b"200"
                else:
                    body, status = b"not found\n", b"404"
                self.h3.send_headers(h3_event.stream_id, [(b":status", status),
                                                          (b"content-length", str(len(body)).encode())])
                self.h3.send_data(h3_event.stream_id, body, end_stream=True)
                self.transmit()


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done = asyncio.get_event_loop().create_future()
        self.status = None
        self.body = hashlib.sha256()
        self.size = 0

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self.status = dict(h3_event.headers).get(b":status", b"?").decode()
            elif isinstance(h3_event, DataReceived):
                self.body.update(h3_event.data)
                self.size += len(h3_event.data)
            if getattr(h3_event, "stream_ended", False) and not self.done.done():
                self.done.set_result(None)


async def run_server(port: int, cert: str, key: str) -> None:
    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    configuration.load_cert_chain(cert, key)
    await serve("127.0.0.1", port, configuration=configuration, create_protocol=Server)
    print("ready", flush=True)
    await asyncio.Future()


async def run_get(port: int, path: str, timeout: float) -> None:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    configuration.verify_mode = 0  # ssl.CERT_NONE: the test's own certificate
    async with connect("127.0.0.1", port, configuration=configuration, create_protocol=Client) as client:
        stream_id = client._quic.get_next_available_stream_id()
        client.h3.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                           (b":authority", b"localhost"), (b":path", path.encode())],
                               end_stream=True)
        client.transmit()
        await asyncio.wait_for(client.done, timeout)
        print(f"status {client.status} bytes {client.size} sha256 {client.body.hexdigest()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "get"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--path", default="/blob/1024")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    if args.mode == "serve":
        asyncio.run(run_server(args.port, args.cert, args.key))
    else:
        asyncio.run(run_get(args.port, args.path, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
