#!/usr/bin/env bash
# The allocator comparison in BENCHMARKS.md: the same server built with the system allocator
# and with mimalloc, 5,000 WebTransport sessions at 1 Hz for 30 s each, rounds interleaved
# (A B A B A B) so drift on this shared machine hits both alike. The load generator is one
# fixed binary for every run; only the server changes.
#
#   bench/alloc.sh SYSTEM_BIN MIMALLOC_BIN SWARM_BIN [ROUNDS]
#
# Build SYSTEM_BIN from a tree without the #[global_allocator] in src/main.rs. Raw JSON and
# logs go to bench/results/alloc/. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM_BIN=$1 MIMALLOC_BIN=$2 SWARM_BIN=$3 ROUNDS=${4:-3}
OUT=bench/results/alloc
mkdir -p "$OUT"
CERTS=$(mktemp -d)
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$CERTS"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" || true

for round in $(seq "$ROUNDS"); do
  for alloc in system mimalloc; do
    bin=$SYSTEM_BIN
    [ "$alloc" = mimalloc ] && bin=$MIMALLOC_BIN
    name="$alloc-$round"
    echo "== $name"
    "$bin" --threads 1 serve --wt-listen 127.0.0.1:14433 --http-listen 127.0.0.1:18080 \
      --tick-ms 1000 --cert-dir "$CERTS" --max-sessions 60000 \
      >"$OUT/$name.server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
      curl -sf http://127.0.0.1:18080/healthz >/dev/null 2>&1 && break
      sleep 0.1
    done
    RUST_LOG=warn "$SWARM_BIN" swarm --json --transport webtransport \
      --url https://127.0.0.1:14433/positions \
      --cert-hash-url http://127.0.0.1:18080/certificate.sha256 \
      --sessions 5000 --duration 30s --connect-timeout 120s \
      >"$OUT/$name.json" 2>"$OUT/$name.swarm.log" || echo "   swarm failed"
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=
    python3 - "$OUT/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["server"]
print(f"   sessions {r['sessions_connected']}/{r['sessions_requested']} connected, {r.get('sessions_lost', 0)} lost  "
      f"delivery {r['delivery_ratio']:.5f}  p50/p99 {r['latency_ms']['p50']:.1f}/{r['latency_ms']['p99']:.1f} ms  "
      f"cpu {s['cpu_seconds']:.2f} s = {s['cpu_us_per_delivered_datagram']:.2f} us/dgram  "
      f"rss {s['rss_per_session_bytes']/1e3:.1f} KB/session")
PY
  done
done
