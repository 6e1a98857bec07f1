#!/usr/bin/env bash
# Installs what the web demo's tests need (Debian chromium, npm packages), builds fleetcast, then
# runs the JS wire-decoder test and the real-browser tests. Exits non-zero on any failure.
# Works unattended as root on a fresh machine (CI=true, no stdin). Screenshots: test-artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  echo "== installing chromium (apt)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
  $SUDO apt-get update -q </dev/null
  $SUDO apt-get install -y -q --no-install-recommends chromium </dev/null
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "== installing nodejs and npm (apt)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
  $SUDO apt-get update -q </dev/null
  $SUDO apt-get install -y -q --no-install-recommends nodejs npm </dev/null
fi

echo "== npm ci"
npm ci --no-audit --no-fund </dev/null

echo "== building fleetcast"
cargo build --bin fleetcast </dev/null
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')"
export FLEETCAST_BIN="$TARGET_DIR/debug/fleetcast"
export CHROMIUM

echo "== JS wire decoder against the golden vectors, and the page's reconnect schedule"
node --test tests/js/wire.test.mjs tests/js/backoff.test.mjs </dev/null

echo "== real-browser tests (Chromium $("$CHROMIUM" --version 2>/dev/null | head -n1 | awk '{print $2}'))"
node --test --test-concurrency=1 tests/js/browser.test.mjs </dev/null
