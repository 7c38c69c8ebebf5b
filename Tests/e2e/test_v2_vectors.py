"""The test vectors of docs/PROTOCOL.md, recomputed with Python's hashlib and hmac (the Swift unit tests
check the same block against the Swift implementation)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import v2_peer
from v2_peer import (SEAL_RECORDS_PER_KEY, SealBroken, SealedStream, datagram_frame, derive_key, end_frame, mac, next_seal_key,
                     seal_keys, seal_record, transcript)

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


def test_sealed_pool_connection_vectors_match_an_independent_implementation():
    v = vectors()
    k, t, s = bytes.fromhex(v["K"]), bytes.fromhex(v["T"]), bytes.fromhex(v["S"])
    session_id, np_, nk = bytes.fromhex(v["session_id"]), bytes.fromhex(v["Np"]), bytes.fromhex(v["Nk"])
    sealed = bytes([1, 3]) + (10101).to_bytes(2, "big") + (5000).to_bytes(4, "big") + session_id + bytes([3])
    assert sealed.hex() == v["parameters_sealed"]
    assert mac(k, b"server proof", t, sealed).hex() == v["server_proof_sealed"]
    assert (session_id + mac(s, b"pool client", np_) + nk).hex() == v["pool_client_message_sealed"]
    client_key, server_key = seal_keys(s, np_, nk)
    assert client_key.hex() == v["seal_client_key"]
    assert server_key.hex() == v["seal_server_key"]
    assert seal_record(server_key, 0, b"ping").hex() == v["sealed_record"]
    assert seal_record(server_key, 1, b"").hex() == v["sealed_end"]
    assert next_seal_key(server_key).hex() == v["seal_next_key"]
    assert seal_record(next_seal_key(server_key), SEAL_RECORDS_PER_KEY, b"pong").hex() == v["sealed_record_next"]


def test_resume_vectors_match_an_independent_implementation():
    v = vectors()
    k, t, s = bytes.fromhex(v["K"]), bytes.fromhex(v["T"]), bytes.fromhex(v["S"])
    session_id, np_, nr = bytes.fromhex(v["session_id"]), bytes.fromhex(v["Np"]), bytes.fromhex(v["Nr"])
    pool_id = bytes.fromhex(v["pool_id"])
    parameters = bytes.fromhex(v["parameters_sealed"])[:-1] + bytes([3 | v2_peer.RESUMES])
    assert parameters.hex() == v["parameters_resume"]
    assert mac(k, b"server proof", t, parameters).hex() == v["server_proof_resume"]
    *_, transports, resumes = v2_peer.parse_parameters(parameters, with_transports=True, with_resume=True)
    assert transports == 3 and resumes
    assert (session_id + mac(s, b"pool resume", np_)).hex() == v["pool_resume_message"]
    key = v2_peer.resume_key(s, np_, pool_id)
    assert key.hex() == v["resume_key"]
    relay_id = session_id + pool_id
    assert v2_peer.resume_request(key, relay_id, nr, 0x0102030405).hex() == v["resume_request"]
    assert v2_peer.resume_reply(key, relay_id, nr, 0x0a0b0c).hex() == v["resume_reply"]
    frames = v2_peer.data_frame(b"ping") + v2_peer.ack_frame(1_048_577) + bytes([v2_peer.RESUME_END,
                                                                              v2_peer.RESUME_CLOSE])
    assert frames.hex() == v["resume_frames"]


class _Bytes:
    """A socket stand-in that serves fixed bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def recv(self, n: int) -> bytes:
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def test_the_sealed_stream_opens_the_vectors_and_refuses_a_changed_bit():
    v = vectors()
    client_key, server_key = bytes.fromhex(v["seal_client_key"]), bytes.fromhex(v["seal_server_key"])
    records = bytes.fromhex(v["sealed_record"] + v["sealed_end"])
    stream = SealedStream(_Bytes(records), send_key=client_key, receive_key=server_key)
    assert stream.recv(100) == b"ping"
    assert stream.recv(100) == b"" and stream.ended
    changed = bytearray(records)
    changed[20] ^= 1
    broken = SealedStream(_Bytes(bytes(changed)), send_key=client_key, receive_key=server_key)
    with pytest.raises(SealBroken, match="does not open"):
        broken.recv(100)
    # The end record alone is record 1: as the first record it is out of order.
    skipped = SealedStream(_Bytes(bytes.fromhex(v["sealed_end"])), send_key=client_key, receive_key=server_key)
    with pytest.raises(SealBroken, match="out of order"):
        skipped.recv(100)
