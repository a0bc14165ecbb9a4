#!/usr/bin/env bash
# Runs every test of Switchboard: formatting, lints, unit, simulation,
# integration and interop tests. Installs what a fresh machine lacks first.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_build_libs
ensure_rust_components
ensure_interop_clients

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo test"
cargo test --workspace --locked
