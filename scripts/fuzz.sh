#!/usr/bin/env bash
# Runs the seeded fuzz tests (parsers and v2 decoders) with many inputs per parser: scripts/fuzz.sh [ITERATIONS] (default 1,000,000).
set -euo pipefail
cd "$(dirname "$0")/.."
NODEPASS_FUZZ_ITERATIONS="${1:-1000000}" swift test --filter "ParserFuzzTests|V2FuzzTests"
