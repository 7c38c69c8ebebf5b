"""Self-signed certificates made by openssl for a test (tls=2, TLS peers written in Python)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Tuple

import pytest


def self_signed(directory: Path, name: str, common_name: str) -> Tuple[Path, Path]:
    """(certificate, private key) PEM files: ECDSA P-256, valid for two days. Skips without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed (Debian package: openssl)")
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    result = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                             "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2",
                             "-subj", f"/CN={common_name}"], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr[-1000:]
    return crt, key
