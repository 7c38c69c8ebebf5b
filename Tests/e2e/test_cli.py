"""Command line and environment validation (exit codes follow sysexits: 64 usage, 78 config)."""

from __future__ import annotations

import os
import subprocess

import pytest

from support.ports import free_port

pytestmark = pytest.mark.ours_only

EX_USAGE = 64
EX_CONFIG = 78
ENV_VARS = ["SEMAPHORE_LIMIT", "MIN_POOL_CAPACITY", "MAX_POOL_CAPACITY", "REPORT_INTERVAL", "SERVICE_COOLDOWN",
            "SHUTDOWN_TIMEOUT", "IDLE_TIMEOUT"]
CRASH_MARKERS = ["Fatal error", "Stack dump", "Current stack trace", "Backtrace", "SIGSEGV", "SIGILL"]


def run(binary, args, env=None, timeout=10.0):
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    full_env.update(env or {})
    try:
        return subprocess.run([binary, *args], capture_output=True, text=True, errors="replace", env=full_env,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nodepass {args!r} did not exit within {timeout:.0f}s (env {env})")


def assert_no_crash(text):
    for marker in CRASH_MARKERS:
        assert marker not in text, f"output looks like a crash ({marker!r}):\n{text[-2000:]}"


@pytest.mark.parametrize("url", [
    "ftp://x:1/y:2",
    "server://127.0.0.1/127.0.0.1:80",
    "server://127.0.0.1:70000/127.0.0.1:80",
    "garbage",
    "",
], ids=["ftp-scheme", "missing-port", "port-out-of-range", "garbage", "empty"])
def test_bad_url_exits_64_with_message(nodepass_bin, url):
    result = run(nodepass_bin, [url])
    assert result.returncode == EX_USAGE, (f"exit code {result.returncode} for {url!r}, expected {EX_USAGE}\n"
                                           f"stdout: {result.stdout[-1000:]}\nstderr: {result.stderr[-1000:]}")
    assert result.stderr.strip(), f"no message on stderr for {url!r}"
    assert_no_crash(result.stdout + result.stderr)


def test_help_exits_0_and_documents_urls_and_env(nodepass_bin):
    result = run(nodepass_bin, ["--help"])
    assert result.returncode == 0, f"--help exited {result.returncode}: {result.stderr[-1000:]}"
    text = result.stdout + result.stderr
    missing = [word for word in ["server://", "client://", *ENV_VARS] if word not in text]
    assert not missing, f"--help does not mention {missing}:\n{text}"


def test_version_exits_0(nodepass_bin):
    result = run(nodepass_bin, ["--version"])
    assert result.returncode == 0, f"--version exited {result.returncode}: {result.stderr[-1000:]}"
    assert (result.stdout + result.stderr).strip(), "--version printed nothing"


@pytest.mark.parametrize("env,names,values", [
    ({"MIN_POOL_CAPACITY": "abc"}, ["MIN_POOL_CAPACITY"], ["abc"]),
    ({"REPORT_INTERVAL": "-1s"}, ["REPORT_INTERVAL"], ["-1s"]),
    ({"MIN_POOL_CAPACITY": "100", "MAX_POOL_CAPACITY": "10"}, ["MIN_POOL_CAPACITY", "MAX_POOL_CAPACITY"],
     ["100", "10"]),
], ids=["min-pool-not-a-number", "negative-report-interval", "min-above-max"])
def test_bad_environment_exits_78_naming_variable_and_value(nodepass_bin, env, names, values):
    url = f"server://127.0.0.1:{free_port()}/127.0.0.1:{free_port()}"
    result = run(nodepass_bin, [url], env=env)
    assert result.returncode == EX_CONFIG, (f"exit code {result.returncode} with {env}, expected {EX_CONFIG}\n"
                                            f"stdout: {result.stdout[-1000:]}\nstderr: {result.stderr[-1000:]}")
    stderr = result.stderr
    assert_no_crash(result.stdout + stderr)
    # A message about one bad variable names it and its value; for an inconsistent pair, at least one
    # of the two with its value.
    assert any(n in stderr and v in stderr for n, v in zip(names, values)), (
        f"stderr does not name the bad variable and value ({env}):\n{stderr[-1000:]}")


@pytest.mark.parametrize("url", [
    "server://@127.0.0.1:1/127.0.0.1:2",
    "server://127.0.0.1:1/127.0.0.1:2?tls=1",
    "client://k3y-s3cret-value@127.0.0.1:1/127.0.0.1:2?tls=1",
    "server://k3y-s3cret-value@127.0.0.1:1/127.0.0.1:2?tls=7",
    "server://k3y-s3cret-value@127.0.0.1:1/127.0.0.1:2?tls=2",
    "k3y-s3cret-value@127.0.0.1:1/127.0.0.1:2",
], ids=["empty-key", "tls-without-key", "tls-on-client", "tls-7", "tls-2-without-files", "no-scheme"])
def test_bad_v2_urls_exit_64_without_echoing_the_key(nodepass_bin, url):
    result = run(nodepass_bin, [url])
    assert result.returncode == EX_USAGE, f"exit code {result.returncode} for {url!r}: {result.stderr[-1000:]}"
    assert result.stderr.strip()
    assert "k3y-s3cret-value" not in result.stdout + result.stderr
    assert_no_crash(result.stdout + result.stderr)


def test_help_documents_v2(nodepass_bin):
    text = run(nodepass_bin, ["--help"]).stdout
    missing = [word for word in ["KEY@", "tls=", "crt=", "mode=", "protocol v2"] if word not in text]
    assert not missing, f"--help does not mention {missing}"


def test_the_key_may_come_from_the_environment_and_not_from_both_places(nodepass_bin):
    url = f"server://127.0.0.1:{free_port()}/127.0.0.1:{free_port()}?tls=1"
    both = run(nodepass_bin, [url.replace("server://", "server://k3y-s3cret-value@")],
               env={"NODEPASS_KEY": "another-s3cret-value"})
    assert both.returncode == EX_USAGE and "NODEPASS_KEY" in both.stderr
    assert "s3cret-value" not in both.stdout + both.stderr
    # tls=1 needs a key: with NODEPASS_KEY set, the same URL is valid (checked by --help-free validation:
    # the server starts, so stop it at once with a bad environment variable instead of running it).
    from_env = run(nodepass_bin, [url], env={"NODEPASS_KEY": "another-s3cret-value", "REPORT_INTERVAL": "bad"})
    assert from_env.returncode == EX_CONFIG, from_env.stderr
    no_key = run(nodepass_bin, [url], env={"REPORT_INTERVAL": "bad"})
    assert no_key.returncode == EX_USAGE and "KEY" in no_key.stderr
