#!/usr/bin/env bash
# A handshake flood from one host against the per-address handshake rate, in one run: 5,000
# QUIC handshakes at 500 a second from 127.0.0.2 (each then silent until --handshake-timeout,
# examples/handshake_flood.rs), while 200 real sessions connect from 127.0.0.1 at 50 a second
# (a population behind one NAT address). Two servers one
# after the other: without a per-address rate (--handshakes-per-ip 1000000) and with the
# default (100/s); both with --limit-loopback, so loopback counts as the real addresses it
# stands for here. Records the real sessions' connects, the flood's fate and the server's RSS.
#
#   bench/flood.sh      (about two minutes)
#
# Writes bench/results/raw/flood-*.json. Loopback only; everything stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=bench/results/raw
mkdir -p "$RAW"
cargo build --release --bin fleetcast --example handshake_flood
BIN=$PWD/target/release/fleetcast
FLOOD=$PWD/target/release/examples/handshake_flood
CERTS=$(mktemp -d)
cleanup() {
  [ -n "${FLOOD_PID:-}" ] && kill "$FLOOD_PID" 2>/dev/null || true
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$CERTS"
}
trap cleanup EXIT

rss() { curl -sf http://127.0.0.1:18080/metrics | awk '/^process_resident_memory_bytes /{print $2}'; }
metric() { curl -sf http://127.0.0.1:18080/metrics | awk -v m="$1" '$1==m{print $2}'; }

# run NAME HANDSHAKES_PER_IP
run() {
  local name=$1 rate=$2
  echo "== $name: --handshakes-per-ip $rate"
  "$BIN" --threads 1 serve --wt-listen '[::]:14433' --http-listen '[::]:18080' \
    --cert-dir "$CERTS" --limit-loopback --handshakes-per-ip "$rate" \
    >"$RAW/$name.server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -sf http://127.0.0.1:18080/healthz >/dev/null 2>&1 && break
    sleep 0.1
  done
  local hash before
  hash=$(curl -sf http://127.0.0.1:18080/certificate.sha256 | head -n1)
  before=$(rss)
  "$FLOOD" 127.0.0.1:14433 "$hash" 5000 500 127.0.0.2 >"$RAW/$name.flood.json" &
  FLOOD_PID=$!
  sleep 9 # 4,500 attempts: without a per-address rate every handshake slot (4,096) is taken
  RUST_LOG=warn "$BIN" swarm --json --url https://127.0.0.1:14433/positions \
    --cert-hash-url http://127.0.0.1:18080/certificate.sha256 --metrics-url none \
    --sessions 200 --connect-concurrency 50 --connect-rate 50 --duration 5s --connect-timeout 30s \
    >"$RAW/$name.swarm.json" 2>"$RAW/$name.swarm.log" || true
  local during
  during=$(rss)
  wait "$FLOOD_PID" || true
  FLOOD_PID=
  # Every flood connection has been closed by the handshake timeout (10 s) by now.
  local after refused_busy refused_rate retried
  after=$(rss)
  refused_busy=$(metric 'fleetcast_sessions_refused_total{transport="webtransport",reason="handshakes_busy"}')
  refused_rate=$(metric 'fleetcast_sessions_refused_total{transport="webtransport",reason="handshake_rate"}')
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=
  python3 - "$RAW" "$name" "$before" "$during" "$after" "$refused_busy" "$refused_rate" <<'PY'
import json, sys
raw, name, before, during, after, busy, rate = sys.argv[1:]
flood = json.load(open(f"{raw}/{name}.flood.json"))
swarm = json.load(open(f"{raw}/{name}.swarm.json"))
out = {"flood": flood, "real_sessions": {k: swarm.get(k) for k in
       ("sessions_requested", "sessions_connected", "connect_seconds", "connect_failures", "delivery_ratio")},
       "server": {"rss_before_bytes": float(before), "rss_during_bytes": float(during),
                  "rss_after_bytes": float(after), "refused_handshakes_busy": float(busy or 0),
                  "refused_handshake_rate": float(rate or 0)}}
json.dump(out, open(f"{raw}/{name}.json", "w"), indent=1)
s = out["server"]
print(f"   flood: {flood['handshakes_completed']} handshakes completed, {flood['refused']} refused, "
      f"{flood['failed']} failed; real sessions: {swarm.get('sessions_connected')} of 200 connected, "
      f"in {swarm.get('connect_seconds', 0):.2f} s; RSS MB before/during/after "
      f"{s['rss_before_bytes']/1e6:.0f}/{s['rss_during_bytes']/1e6:.0f}/{s['rss_after_bytes']/1e6:.0f}; "
      f"refused busy {s['refused_handshakes_busy']:.0f}, rate {s['refused_handshake_rate']:.0f}")
PY
}

run flood-no-rate 1000000
run flood-rate-100 100
