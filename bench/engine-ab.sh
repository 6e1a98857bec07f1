#!/usr/bin/env bash
# One 10,000-session run against one server configuration, for A/B comparisons of the engine's
# settings: prints delivery, latency, server CPU per delivered datagram and RSS per session, and
# keeps the swarm's JSON and the server's UDP counters in bench/results/raw/engine-tuning/.
#
#   bench/engine-ab.sh ENGINE SESSIONS TICK_MS NAME [extra serve options...]
#   e.g. bench/engine-ab.sh proto 10000 1000 p10k --shards 1
#
# BENCH_DURATION (default 20s); SLOG sets the server's RUST_LOG (fleetcast::server::engine=debug
# logs QUIC frame totals at shutdown). Loopback only, ports 44433/48080; stops by itself.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BENCH_BIN:-$PWD/target/release/fleetcast}
engine=$1 n=$2 tick=$3 name=$4
shift 4
OUT=bench/results/raw/engine-tuning
mkdir -p "$OUT"
C=$(mktemp -d)
RUST_LOG=${SLOG:-info} "$BIN" --threads 1 serve --engine "$engine" "$@" \
  --wt-listen 127.0.0.1:44433 --http-listen 127.0.0.1:48080 --tick-ms "$tick" --cert-dir "$C" \
  --max-sessions 60000 >"$OUT/$name.server.log" 2>&1 &
SP=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:48080/healthz >/dev/null && break; sleep 0.1; done
RUST_LOG=warn timeout 300 "$BIN" swarm --json --url https://127.0.0.1:44433/positions \
  --cert-hash-url http://127.0.0.1:48080/certificate.sha256 \
  --metrics-url http://127.0.0.1:48080/metrics --sessions "$n" \
  --duration "${BENCH_DURATION:-20s}" --connect-timeout 180s >"$OUT/$name.json" 2>"$OUT/$name.swarm.log"
curl -s http://127.0.0.1:48080/metrics | grep -E '^fleetcast_(udp_datagrams|datagrams_sent)_total' >"$OUT/$name.metrics"
kill -TERM "$SP"
wait "$SP"
rm -rf "$C"
python3 - "$OUT/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r.get("server") or {}
print(f"{sys.argv[1]}: connected {r['sessions_connected']} of {r['sessions_requested']}, "
      f"lost {r.get('sessions_lost')}, delivery {r['delivery_ratio']:.5f}, "
      f"p50/p99 {r['latency_ms']['p50']:.1f}/{r['latency_ms']['p99']:.1f} ms, "
      f"cpu {s.get('cpu_us_per_delivered_datagram', 0):.2f} us/dgram, "
      f"rss {s.get('rss_per_session_bytes', 0)/1e3:.1f} KB/session")
PY
