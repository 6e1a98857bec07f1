#!/usr/bin/env bash
# fleetcast benchmark: starts the server and the swarm for each configuration, records the
# swarm's JSON (delivery, latency, position age, server CPU per datagram and RSS per session),
# then writes bench/results/latest.md and bench/results/latest.png.
#
#   bench/run.sh                 the full set (about 15 minutes on 2 cores)
#   BENCH_QUICK=1 bench/run.sh   1k sessions only, 10 s windows (a minute)
#
# BENCH_BIN=PATH runs that server binary instead of building one, BENCH_SWARM_BIN=PATH that
# load generator (default: the server binary), and BENCH_OUT=DIR writes there instead of
# bench/results (so two builds can be compared without touching the published results);
# BENCH_LISTEN=127.0.0.1 keeps the server off every interface but loopback.
#
# Everything stays on loopback or inside a network namespace this script creates and deletes.
# The loss runs need root (ip netns, nftables).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-30s}
OUT=${BENCH_OUT:-bench/results}
# Where the server listens; the load generator always dials 127.0.0.1.
LISTEN=${BENCH_LISTEN:-[::]}
RAW="$OUT/raw"
mkdir -p "$RAW"
# Only this script's own rows: the raw data of the other benchmarks lives here too.
rm -f "$RAW"/wt-*.json "$RAW"/wtq-*.json "$RAW"/ws-*.json

python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q matplotlib
if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  cargo build --release --bin fleetcast
  BIN=$PWD/target/release/fleetcast
fi
SWARM_BIN=${BENCH_SWARM_BIN:-$BIN}
# The per-process file limit here is 20,000: WebSocket runs need a socket per session.
ulimit -n "$(ulimit -Hn)" || true
CERTS=$(mktemp -d)
NS=fcbench$$
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$CERTS"
}
trap cleanup EXIT

# run NAME TRANSPORT SESSIONS TICK_MS [NETNS_PREFIX...]; ENGINE=quinn runs the wtransport server
# instead of the default engine.
run() {
  local name=$1 transport=$2 sessions=$3 tick_ms=$4
  shift 4
  local prefix=("$@")
  local engine=${ENGINE:-proto}
  # One shard, like one runtime thread (--threads 1): the load generator needs the other core.
  local shards=()
  [ "$engine" = proto ] && shards=(--shards "${BENCH_SHARDS:-1}")
  echo "== $name: $transport, $sessions sessions, tick $tick_ms ms, engine $engine ${shards[*]}"
  "${prefix[@]}" "$BIN" --threads 1 serve --engine "$engine" "${shards[@]}" \
    --wt-listen "$LISTEN:14433" --http-listen "$LISTEN:18080" \
    --tick-ms "$tick_ms" --cert-dir "$CERTS" --max-sessions 60000 --max-http-conns-per-ip 60000 \
    >"$RAW/$name.server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    "${prefix[@]}" curl -sf http://127.0.0.1:18080/healthz >/dev/null 2>&1 && break
    sleep 0.1
  done
  RUST_LOG=warn "${prefix[@]}" "$SWARM_BIN" swarm --json --transport "$transport" \
    --url https://127.0.0.1:14433/positions \
    --cert-hash-url http://127.0.0.1:18080/certificate.sha256 \
    --sessions "$sessions" --duration "$DURATION" --connect-timeout 180s \
    >"$RAW/$name.json" 2>"$RAW/$name.swarm.log" || echo "   swarm failed: see $RAW/$name.swarm.log"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=
  python3 - "$RAW/$name.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
s = r.get("server") or {}
print(f"   sessions {r['sessions_connected']}/{r['sessions_requested']} connected, {r.get('sessions_lost', 0)} lost  "
      f"delivery {r['delivery_ratio']:.5f}  p50/p99 {r['latency_ms']['p50']:.1f}/{r['latency_ms']['p99']:.1f} ms  "
      f"cpu {s.get('cpu_us_per_delivered_datagram', 0):.1f} us/dgram  rss {s.get('rss_per_session_bytes', 0)/1e3:.1f} KB/session")
PY
}

# A network namespace with loopback and nftables dropping PERCENT % of packets.
lossy_netns() {
  local percent=$1
  ip netns del "$NS" 2>/dev/null || true
  ip netns add "$NS"
  ip netns exec "$NS" ip link set lo up
  if [ "$percent" != 0 ]; then
    ip netns exec "$NS" nft add table inet loss
    ip netns exec "$NS" nft "add chain inet loss input { type filter hook input priority 0; }"
    ip netns exec "$NS" nft "add rule inet loss input meta l4proto { udp, tcp } numgen random mod 100 < $percent drop"
  fi
}

if [ -n "${BENCH_QUICK:-}" ]; then
  DURATION=10s
  run wt-1k webtransport 1000 1000
  ENGINE=quinn run wtq-1k webtransport 1000 1000
  run ws-1k websocket 1000 1000
else
  for n in 1000 10000 20000 50000; do
    run "wt-$((n / 1000))k" webtransport "$n" 1000
  done
  run wt-10k-10hz webtransport 10000 100
  # The wtransport server (--engine quinn) beside it; at 50,000 it never finished connecting.
  for n in 1000 10000 20000; do
    ENGINE=quinn run "wtq-$((n / 1000))k" webtransport "$n" 1000
  done
  ENGINE=quinn run wtq-10k-10hz webtransport 10000 100
  for n in 1000 10000; do
    run "ws-$((n / 1000))k" websocket "$n" 1000
  done
  run ws-10k-10hz websocket 10000 100
  if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then
    command -v nft >/dev/null || { apt-get update -qq && apt-get install -y -qq nftables; }
    for percent in 0 5; do
      lossy_netns "$percent"
      run "wt-1k-loss$percent" webtransport 1000 1000 ip netns exec "$NS"
      run "ws-1k-loss$percent" websocket 1000 1000 ip netns exec "$NS"
    done
    ip netns del "$NS"
  else
    echo "loss runs skipped: they need root and iproute2"
  fi
fi

python3 bench/report.py "$RAW" "$OUT/latest.md" "$OUT/latest.png"
echo "results: $OUT/latest.md, $OUT/latest.png"
