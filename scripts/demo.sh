#!/usr/bin/env bash
# Builds nodepass and starts a demo tunnel on loopback in front of a small local web server:
#   web server 127.0.0.1:18080  <-  client  ==TLS control + pool==>  server  <-  users on 127.0.0.1:18081
# Both sides use protocol v2 with a random key made for this run (nodepass key), passed in NODEPASS_KEY.
# Press Ctrl-C to stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."

swift build -c release
bin="$PWD/.build/release/nodepass"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "Hello through NodePass" > "$work/index.html"
python3 -m http.server 18080 --bind 127.0.0.1 --directory "$work" >"$work/web.log" 2>&1 &
pids+=($!)
# The key goes in NODEPASS_KEY, as the README recommends: a key in the URL would show in the process list.
NODEPASS_KEY="$("$bin" key)"
export NODEPASS_KEY
"$bin" "server://127.0.0.1:10101/127.0.0.1:18081" &
pids+=($!)
# Start the client once the server listens on 127.0.0.1:10101 (0x2775; at most 10 s), so that its first
# attempt succeeds. /proc is read rather than connecting, which the server would log as a refused client.
for _ in $(seq 1 100); do
    grep -q " 0100007F:2775 00000000:0000 0A " /proc/net/tcp && break
    sleep 0.1
done
"$bin" "client://127.0.0.1:10101/127.0.0.1:18080" &
pids+=($!)

cat <<MSG

  Demo tunnel running. In another terminal try:
      curl http://127.0.0.1:18081/
  (the request enters the server on 18081, crosses the tunnel, and the client fetches it from 18080)
  Press Ctrl-C to stop.

MSG
wait
