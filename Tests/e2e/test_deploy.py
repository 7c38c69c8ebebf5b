"""Deployment files: the systemd units (a tunnel, a master) pass `systemd-analyze verify` and keep their
hardening."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
# unit file -> (the unit's name once installed, its environment file, what that file holds)
UNITS = {
    "nodepass@.service": ("nodepass@server.service", "server.env", "NODEPASS_URL=server://:10101/:8080"),
    "nodepass-master.service": ("nodepass-master.service", "master.env", "NODEPASS_MASTER_URL=master://127.0.0.1:9090"),
}


@pytest.fixture(params=sorted(UNITS))
def unit(request) -> str:
    return request.param


@pytest.fixture
def unit_copy(tmp_path: Path, unit: str) -> Path:
    """The unit, pointing at a stand-in binary and environment file in tmp_path (verify checks that ExecStart
    exists)."""
    name, env_name, env_text = UNITS[unit]
    binary = tmp_path / "nodepass"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tmp_path / env_name).write_text(env_text + "\n")
    text = (SYSTEMD / unit).read_text()
    assert "/usr/local/bin/nodepass" in text and "/etc/nodepass/" in text
    text = text.replace("/usr/local/bin/nodepass", str(binary)).replace("/etc/nodepass/", f"{tmp_path}/")
    instance = tmp_path / name
    instance.write_text(text)
    return instance


def test_unit_verifies(unit_copy: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert unit_copy.name not in result.stderr, result.stderr


def test_unit_is_hardened(unit_copy: Path, unit: str):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit_copy)],
                            capture_output=True, text=True, timeout=60)
    line = [l for l in result.stdout.splitlines() if "Overall exposure level" in l]
    assert line, result.stdout + result.stderr
    exposure = float(line[0].split("level for")[1].split(":")[1].split()[0])
    assert exposure <= 2.0, line[0]
    text = (SYSTEMD / unit).read_text()
    for setting in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure",
                    "CapabilityBoundingSet=\n"):
        assert setting in text, setting


def test_master_unit_keeps_its_state_in_a_private_state_directory():
    text = (SYSTEMD / "nodepass-master.service").read_text()
    assert "StateDirectory=nodepass-master" in text and "StateDirectoryMode=0700" in text
