#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each): scripts/fuzz.sh [SECONDS]
# The targets live with the protocol crate (crates/fleetcast-proto/fuzz), which builds in seconds.
# cargo-fuzz needs nightly features; the stable toolchain here allows them with RUSTC_BOOTSTRAP.
set -euo pipefail
cd "$(dirname "$0")/../crates/fleetcast-proto"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
  echo "fuzz target $target: ${seconds}s"
  cargo fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
