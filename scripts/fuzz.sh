#!/usr/bin/env bash
# Fuzzes the parsers of peer input for a bounded time (not part of the tests):
# scripts/fuzz.sh [SECONDS] [TARGET...] (default 60 s for each target:
# turn_relay, sfu_sdp, signalling). Needs a nightly toolchain and cargo-fuzz; installs both
# if missing. Findings land in fuzz/artifacts/; fuzz/seeds/TARGET (if any)
# starts the corpus.
source "$(dirname "$0")/lib.sh"
cd "$ROOT/fuzz"

seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(turn_relay sfu_sdp signalling)
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    seeds=()
    [ -d "seeds/$target" ] && seeds=("seeds/$target")
    cargo +nightly fuzz run "$target" "corpus/$target" "${seeds[@]}" -- -max_total_time="$seconds" -max_len=16384
done
