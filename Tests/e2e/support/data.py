"""Sizes and cheap test data."""

from __future__ import annotations

MiB = 1024 * 1024


class PatternStream:
    """Cheap pseudo-random data: a 1 MiB random base block, rotated by a per-block offset
    and prefixed with (stream, block) counters, so every block of every stream differs."""

    BLOCK = MiB

    def __init__(self, base: bytes, stream: int):
        assert len(base) == self.BLOCK
        self.base = base
        self.stream = stream

    def block(self, index: int) -> bytes:
        k = (index * 7919 + self.stream * 104729 + 1) % self.BLOCK
        header = self.stream.to_bytes(8, "big") + index.to_bytes(8, "big")
        rotated = self.base[k:] + self.base[:k]
        return header + rotated[len(header):]
