"""v1 interoperability: our server with the original Go client, and the Go server with our client.

No user ever reaches the Go server before its client is connected (Tunnel.start waits for the client's
control and pool connections): the original crashes then, and that is not what these tests check.
"""

from __future__ import annotations

import pytest

import scenarios
from support.data import MiB
from support.probes import http_probe
from support.tunnel import Tunnel

pytestmark = pytest.mark.interop


@pytest.fixture(params=["ours-server+go-client", "go-server+ours-client"])
def pair(request, nodepass_bin, go_peer_bin):
    """(server binary, client binary)."""
    if request.param == "ours-server+go-client":
        return nodepass_bin, go_peer_bin
    return go_peer_bin, nodepass_bin


def test_interop_http_download(procs, pair, tmp_path):
    port, digest = scenarios.start_http_service(procs, tmp_path / "www")
    tunnel = Tunnel(procs, *pair, port, probe=http_probe("/probe.txt", b"nodepass-probe\n"))
    tunnel.start()
    scenarios.curl_download(tunnel, digest, tmp_path)


def test_interop_half_close(procs, pair, digest_service):
    tunnel = Tunnel(procs, *pair, digest_service.port, probe=scenarios.digest_probe)
    tunnel.start()
    scenarios.half_close_digest(tunnel, MiB)


def test_interop_integrity_64mib_over_16_streams(procs, pair, echo_service):
    tunnel = Tunnel(procs, *pair, echo_service.port)
    tunnel.start()
    scenarios.integrity(tunnel, streams=16, mib_per_stream=4, deadline_s=150)


def test_interop_burst_of_200_connections(procs, pair, echo_service):
    tunnel = Tunnel(procs, *pair, echo_service.port)
    tunnel.start()
    scenarios.burst(tunnel, 200)
