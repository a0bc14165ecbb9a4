#!/usr/bin/env bash
# Fuzzes the parsers of peer input for a bounded time (not part of the tests):
# scripts/fuzz.sh [SECONDS] (default 60). Needs a nightly toolchain and
# cargo-fuzz; installs both if missing. Findings land in fuzz/artifacts/.
source "$(dirname "$0")/lib.sh"
cd "$ROOT/fuzz"

seconds="${1:-60}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
mkdir -p corpus/turn_relay
cargo +nightly fuzz run turn_relay corpus/turn_relay -- -max_total_time="$seconds"
