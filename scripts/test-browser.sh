#!/usr/bin/env bash
# Installs what the web tests need (Debian chromium and firefox-esr, Node.js and npm, the pinned
# npm packages), builds fleetcast, then runs the JavaScript unit tests (wire decoder, backoff,
# the client library's pure parts, the npm package) and the real-browser tests in Chromium and
# Firefox. Exits non-zero on any failure. Works unattended as root on a fresh machine (CI=true,
# no stdin). Screenshots: test-artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
apt_updated=""
apt_install() {
  echo "== installing $* (apt)"
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -q </dev/null
    apt_updated=1
  fi
  $SUDO apt-get install -y -q --no-install-recommends "$@" </dev/null
}

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
FIREFOX="${FIREFOX:-/usr/bin/firefox-esr}"
[ -x "$CHROMIUM" ] || apt_install chromium
[ -x "$FIREFOX" ] || apt_install firefox-esr
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi

echo "== npm ci"
# puppeteer-core drives the system browsers; nothing may download a browser of its own.
PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund </dev/null

echo "== building fleetcast"
cargo build --bin fleetcast </dev/null
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')"
export FLEETCAST_BIN="$TARGET_DIR/debug/fleetcast"
export CHROMIUM FIREFOX

echo "== JS unit tests: wire decoder (golden vectors), backoff, client library, page helpers, npm package"
node --test tests/js/wire.test.mjs tests/js/backoff.test.mjs tests/js/client-core.test.mjs \
  tests/js/pages-core.test.mjs tests/js/package.test.mjs </dev/null

echo "== real-browser tests ($("$CHROMIUM" --version 2>/dev/null | head -n1), $("$FIREFOX" --version 2>/dev/null | head -n1))"
node --test --test-concurrency=1 tests/js/demo.browser.test.mjs tests/js/map.browser.test.mjs \
  tests/js/client.browser.test.mjs </dev/null
