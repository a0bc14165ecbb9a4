#!/usr/bin/env bash
# Runs every test of Switchboard: formatting, lints, unit, simulation,
# integration, interop and browser end-to-end tests. Installs what a fresh machine lacks first.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_build_libs
ensure_rust_components
ensure_interop_clients
ensure_browser_tests
ensure_coturn
ensure_synapse

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo test"
cargo test --workspace --locked
