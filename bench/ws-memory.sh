#!/usr/bin/env bash
# Memory per WebSocket session with the library's default buffers (128 KiB read, 128 KiB write)
# against fleetcast's (--ws-read-buffer 4KiB --ws-write-buffer 0), in one run:
# 1,000 WebSocket sessions from `fleetcast swarm` for 10 s each, RSS per session from /metrics.
#
#   bench/ws-memory.sh        (about a minute)
#
# Writes bench/results/raw/ws-memory-*.json and prints the comparison. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${WS_MEMORY_SESSIONS:-1000}
RAW=bench/results/raw
mkdir -p "$RAW"
cargo build --release --bin fleetcast
BIN=$PWD/target/release/fleetcast
CERTS=$(mktemp -d)
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$CERTS"
}
trap cleanup EXIT

# run NAME READ_BUFFER WRITE_BUFFER
run() {
  local name=$1 read=$2 write=$3
  "$BIN" --threads 1 serve --wt-listen '[::]:14433' --http-listen '[::]:18080' \
    --cert-dir "$CERTS" --ws-read-buffer "$read" --ws-write-buffer "$write" \
    >"$RAW/$name.server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -sf http://127.0.0.1:18080/healthz >/dev/null 2>&1 && break
    sleep 0.1
  done
  RUST_LOG=warn "$BIN" swarm --json --transport websocket \
    --cert-hash-url http://127.0.0.1:18080/certificate.sha256 \
    --sessions "$SESSIONS" --duration 10s >"$RAW/$name.json" 2>"$RAW/$name.swarm.log"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=
  python3 - "$RAW/$name.json" "$read" "$write" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["server"]
print(f"read {sys.argv[2]:>7} write {sys.argv[3]:>7}: {r['sessions_connected']} sessions, "
      f"RSS {s['rss_bytes']/1e6:.1f} MB ({s['rss_before_bytes']/1e6:.1f} before), "
      f"{s['rss_per_session_bytes']/1e3:.1f} KB per session, delivery {r['delivery_ratio']:.4f}")
PY
}

run ws-memory-library-defaults 128KiB 128KiB
run ws-memory-fleetcast 4KiB 0
