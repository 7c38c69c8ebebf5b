"""Fixtures for the NodePass end-to-end suite (see README.md)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.go_original import register_go_binary
from support.processes import ProcessManager, Service

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / ".build" / "debug" / "nodepass"
GO_PEER_SCRIPT_CANDIDATES = [
    Path(os.environ["NODEPASS_GO_PEER_SCRIPT"]) if os.environ.get("NODEPASS_GO_PEER_SCRIPT") else None,
    REPO.parent / "shared" / "peers" / "build-go-peer.sh",
    Path("/work/shared/peers/build-go-peer.sh"),
]
GO_PEER_DEFAULT_BIN = Path.home() / ".cache" / "np-peer" / "nodepass-go-1.0.1"
DEFAULT_TEST_TIMEOUT = 240  # seconds, applied through pytest-timeout when it is installed

PROCS_KEY = pytest.StashKey[ProcessManager]()


def _bin_under_test() -> Path:
    return Path(os.environ.get("NODEPASS_BIN") or DEFAULT_BIN)


def _under_test_is_go() -> bool:
    if os.environ.get("NODEPASS_IS_GO", "") not in ("", "0"):
        return True
    try:
        return _bin_under_test().resolve() == GO_PEER_DEFAULT_BIN.resolve()
    except OSError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "ours_only: skipped when the binary under test is the Go original")
    config.addinivalue_line("markers", "interop: mixes NodePass for Swift with the Go original")


def pytest_report_header(config):
    kind = "Go original (ours_only tests skipped)" if _under_test_is_go() else "NodePass for Swift"
    return f"nodepass under test: {_bin_under_test()} [{kind}]"


def pytest_collection_modifyitems(config, items):
    is_go = _under_test_is_go()
    has_timeout = config.pluginmanager.hasplugin("timeout")
    skip_go = pytest.mark.skip(reason="ours_only: the Go original lacks this fix (NODEPASS_IS_GO=1)")
    for item in items:
        if is_go and item.get_closest_marker("ours_only"):
            item.add_marker(skip_go)
        if has_timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        pm = item.stash.get(PROCS_KEY, None)
        if pm is not None and pm.procs:
            report.sections.append(("process logs (tails)", pm.tails()))


# --------------------------------------------------------------------------- binaries


@pytest.fixture(scope="session")
def is_go() -> bool:
    return _under_test_is_go()


@pytest.fixture(scope="session")
def nodepass_bin() -> str:
    path = _bin_under_test()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"nodepass binary not found at {path}: build it (swift build) or set NODEPASS_BIN")
    if _under_test_is_go():
        register_go_binary(str(path))
    return str(path)


@pytest.fixture(scope="session")
def go_peer_bin() -> str:
    """The original Go NodePass 1.0.1, built (idempotently) by shared/peers/build-go-peer.sh."""
    override = os.environ.get("NODEPASS_GO_BIN")
    if override:
        if not os.access(override, os.X_OK):
            pytest.skip(f"NODEPASS_GO_BIN={override} is not executable")
        register_go_binary(override)
        return override
    script = next((p for p in GO_PEER_SCRIPT_CANDIDATES if p is not None and p.is_file()), None)
    if script is None:
        pytest.skip("build-go-peer.sh not found (set NODEPASS_GO_PEER_SCRIPT or NODEPASS_GO_BIN)")
    try:
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("build-go-peer.sh took longer than 15 minutes")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        pytest.skip(f"build-go-peer.sh failed (rc {result.returncode}): {result.stderr[-2000:]}")
    path = lines[-1].strip()
    if not os.access(path, os.X_OK):
        pytest.skip(f"build-go-peer.sh printed {path!r}, which is not an executable")
    register_go_binary(path)
    return path


# --------------------------------------------------------------------------- processes and services


@pytest.fixture
def procs(request, tmp_path) -> ProcessManager:
    """Every process of a test goes through this; all are stopped at teardown and their log tails are
    attached to the report of a failed test."""
    pm = ProcessManager(tmp_path)
    request.node.stash[PROCS_KEY] = pm
    yield pm
    pm.stop_all()


@pytest.fixture
def echo_service(procs) -> Service:
    return procs.start_helper("echo")


@pytest.fixture
def digest_service(procs) -> Service:
    return procs.start_helper("digest")
