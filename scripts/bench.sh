#!/usr/bin/env bash
# Runs a benchmark: scripts/bench.sh homeserver [options]. Each prints its
# figures beside a baseline measured in the same run (see PERFORMANCE notes in README).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_build_libs

if [ "${1:-}" = "turn" ]; then
    ensure_coturn
fi
cargo build --release --locked -p switchboard --bin switchboard >&2
cargo build --release --locked -p switchboard-bench >&2
exec "$ROOT/target/release/switchboard-bench" "$@"
