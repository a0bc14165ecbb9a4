#!/usr/bin/env bash
# Builds and runs Switchboard all-in-one on localhost; it prints the URLs to open.
# Extra arguments go to `switchboard` (see `switchboard --help`).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_build_libs

say "building switchboard (release; the first build takes a few minutes)"
cargo build --release --locked --bin switchboard
exec "$ROOT/target/release/switchboard" "$@"
