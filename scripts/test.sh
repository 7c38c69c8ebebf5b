#!/usr/bin/env bash
# Runs every test: Swift unit and loopback tests, then the end-to-end suite against the built binary.
# Installs the Debian packages and Python modules the end-to-end tests need when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

need_packages=()
command -v curl >/dev/null || need_packages+=(curl)
command -v redis-server >/dev/null || need_packages+=(redis-server)
command -v redis-cli >/dev/null || need_packages+=(redis-tools)
command -v openssl >/dev/null || need_packages+=(openssl)
command -v socat >/dev/null || need_packages+=(socat)
command -v gcc >/dev/null || need_packages+=(gcc)
command -v tcpdump >/dev/null || need_packages+=(tcpdump)
command -v dig >/dev/null || need_packages+=(dnsutils)
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null || need_packages+=(dnsmasq-base)
command -v dnsperf >/dev/null || need_packages+=(dnsperf)
command -v iperf3 >/dev/null || need_packages+=(iperf3)
[ -x /usr/sbin/sshd ] || need_packages+=(openssh-server)
command -v ssh >/dev/null || need_packages+=(openssh-client)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_packages+=(postgresql)
command -v psql >/dev/null || need_packages+=(postgresql-client)
command -v python3 >/dev/null || need_packages+=(python3 python3-pip)
if [ ${#need_packages[@]} -gt 0 ]; then
    say "installing Debian packages: ${need_packages[*]}"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi
if ! python3 -c 'import pytest, pytest_timeout, aioquic, cryptography' 2>/dev/null; then
    say "installing pytest, pytest-timeout, aioquic and cryptography from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check pytest pytest-timeout aioquic cryptography 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages pytest pytest-timeout \
            aioquic cryptography
fi

say "format (swift-format, swift-nio's settings in .swift-format)"
swift format lint --strict -r Sources Tests
say "building"
swift build -Xswiftc -warnings-as-errors
say "unit and loopback tests"
swift test -Xswiftc -warnings-as-errors
say "unit and loopback tests under ThreadSanitizer"
swift test --sanitize=thread --scratch-path .build-tsan
say "end-to-end tests"
NODEPASS_BIN="$PWD/.build/debug/nodepass" python3 -m pytest -q --timeout 300 Tests/e2e
say "benchmark smoke run (no thresholds)"
python3 bench/bench.py --quick --rows direct,socat-chain,nodepass-swift --nodepass "$PWD/.build/debug/nodepass" \
    --out-md "${TMPDIR:-/tmp}/nodepass-bench-smoke.md"
say "all tests passed"
