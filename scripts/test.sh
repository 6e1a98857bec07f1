#!/usr/bin/env bash
# fleetcast's whole test suite, from a fresh machine: installs what is missing, then runs the
# format check, clippy, every Rust test, short fuzz runs and (when present) the browser tests.
#
#   scripts/test.sh            everything
#   FLEETCAST_FUZZ_SECONDS=0   skip the fuzz runs (default: 10 s per target)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# The cluster tests (tests/cluster.rs) start a real NATS server with JetStream.
command -v nats-server >/dev/null || need_apt+=(nats-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  step "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test"
cargo test --all-targets

fuzz_seconds=${FLEETCAST_FUZZ_SECONDS:-10}
if [ "$fuzz_seconds" != 0 ]; then
  step "fuzzing each decoder for ${fuzz_seconds}s"
  scripts/fuzz.sh "$fuzz_seconds"
fi

if [ -x scripts/test-browser.sh ]; then
  step "browser and JavaScript tests"
  scripts/test-browser.sh
fi

step "all tests passed"
