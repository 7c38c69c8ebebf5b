"""Which binaries are the original Go NodePass 1.0.1 (registered by conftest, consulted by Tunnel)."""

from __future__ import annotations

import os

_GO_BINARIES: set = set()


def register_go_binary(path: str) -> None:
    """Mark path as the original Go NodePass 1.0.1 (conftest does this for the peer and, with
    NODEPASS_IS_GO=1, for the binary under test)."""
    _GO_BINARIES.add(os.path.realpath(path))


def is_go_binary(path: str) -> bool:
    return os.path.realpath(path) in _GO_BINARIES
