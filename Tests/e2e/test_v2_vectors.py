"""The test vectors of docs/PROTOCOL.md, recomputed with Python's hashlib and hmac (the Swift unit tests
check the same block against the Swift implementation)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from v2_peer import datagram_frame, derive_key, end_frame, mac, transcript

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def vectors() -> dict:
    text = DOC.read_text()
    block = text.split("```vectors\n", 1)[1].split("\n```", 1)[0]
    pairs = (line.split("=", 1) for line in block.splitlines() if "=" in line)
    return {name.strip(): value.strip() for name, value in pairs}


def test_documented_vectors_match_an_independent_implementation():
    v = vectors()
    k = derive_key(v["key"])
    assert k.hex() == v["K"]
    nc, ns = bytes.fromhex(v["Nc"]), bytes.fromhex(v["Ns"])
    assert hashlib.sha256(b"example certificate").hexdigest() == v["F"]
    t = transcript(nc, ns, bytes.fromhex(v["F"]))
    assert t.hex() == v["T"]
    assert mac(k, b"client proof", t).hex() == v["client_proof"]
    session_id = bytes.fromhex(v["session_id"])
    parameters = (bytes([1, 1]) + (10101).to_bytes(2, "big") + (5000).to_bytes(4, "big") + session_id
                  + hashlib.sha256(b"example data certificate").digest())
    assert parameters.hex() == v["parameters"]
    assert mac(k, b"server proof", t, parameters).hex() == v["server_proof"]
    s = mac(k, b"session secret", t, session_id)
    assert s.hex() == v["S"]
    np_ = bytes.fromhex(v["Np"])
    assert (session_id + mac(s, b"pool client", np_)).hex() == v["pool_client_message"]
    pool_id = bytes.fromhex(v["pool_id"])
    assert (pool_id + mac(s, b"pool server", np_, pool_id)).hex() == v["pool_server_message"]
    assert mac(s, b"pool confirm", np_, pool_id).hex() == v["pool_confirmation"]
    forward = bytes([2, 0]) + (10101).to_bytes(2, "big") + (5000).to_bytes(4, "big") + session_id
    assert forward.hex() == v["parameters_forward_plain"]
    assert mac(k, b"server proof", t, forward).hex() == v["server_proof_forward_plain"]
    forward_udp = forward + bytes([3])
    assert forward_udp.hex() == v["parameters_forward_plain_udp"]
    assert mac(k, b"server proof", t, forward_udp).hex() == v["server_proof_forward_plain_udp"]
    assert datagram_frame(1, b"pong").hex() == v["datagram_frame"]
    assert end_frame(42).hex() == v["end_frame"]
