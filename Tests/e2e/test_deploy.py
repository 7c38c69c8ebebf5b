"""Deployment files: the systemd unit passes `systemd-analyze verify` and keeps its hardening."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "nodepass@.service"


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit as an instance, pointing at a stand-in binary and environment file in tmp_path
    (verify checks that ExecStart exists)."""
    binary = tmp_path / "nodepass"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tmp_path / "server.env").write_text("NODEPASS_URL=server://:10101/:8080\n")
    text = UNIT.read_text()
    assert "/usr/local/bin/nodepass" in text and "/etc/nodepass/%i.env" in text
    text = text.replace("/usr/local/bin/nodepass", str(binary)).replace("/etc/nodepass/%i.env", f"{tmp_path}/%i.env")
    instance = tmp_path / "nodepass@server.service"
    instance.write_text(text)
    return instance


def test_unit_verifies(unit_copy: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nodepass@server.service" not in result.stderr, result.stderr


def test_unit_is_hardened(unit_copy: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit_copy)],
                            capture_output=True, text=True, timeout=60)
    line = [l for l in result.stdout.splitlines() if "Overall exposure level" in l]
    assert line, result.stdout + result.stderr
    exposure = float(line[0].split("level for")[1].split(":")[1].split()[0])
    assert exposure <= 2.0, line[0]
    text = UNIT.read_text()
    for setting in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure",
                    "CapabilityBoundingSet=\n"):
        assert setting in text, setting
