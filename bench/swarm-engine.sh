#!/usr/bin/env bash
# The load generator's own cost: the same server and the same 10,000 sessions at 1 Hz, loaded
# once by `fleetcast swarm --engine wtransport` (a tokio task per session) and once by
# `--engine proto` (quinn-proto driven from one thread), alternating, SWARM_ENGINE_ROUNDS times.
# Writes bench/results/raw/swarm-engine-ENGINE-ROUND.json (the swarm's report, whose
# `load_generator` is its own CPU and RSS over the window) and .server.log / .swarm.log.
#
#   bench/swarm-engine.sh                   two rounds, about 4 minutes
#   SWARM_ENGINE_SESSIONS=20000 SWARM_ENGINE_ROUNDS=1 SWARM_ENGINE_TAG=-20k bench/swarm-engine.sh
#
# SWARM_ENGINE_TAG goes into the file names (swarm-engine-20k-proto-1.json, swarm-engine-20k.md),
# so a second size does not overwrite the first.
#
# BENCH_BIN=PATH runs that binary instead of building one. Loopback only; the server stops on
# SIGTERM after each run, the swarm after its window.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${SWARM_ENGINE_SESSIONS:-10000}
ROUNDS=${SWARM_ENGINE_ROUNDS:-2}
DURATION=${SWARM_ENGINE_DURATION:-30s}
TAG=${SWARM_ENGINE_TAG:-}
WT_PORT=${SWARM_ENGINE_WT_PORT:-34433}
HTTP_PORT=${SWARM_ENGINE_HTTP_PORT:-38080}
OUT=${BENCH_OUT:-bench/results}
RAW="$OUT/raw"
mkdir -p "$RAW"
if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  cargo build --release --bin fleetcast
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/fleetcast
fi
CERTS=$(mktemp -d)
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$CERTS"
}
trap cleanup EXIT

# run ENGINE ROUND
run() {
  local engine=$1 round=$2 name="swarm-engine$TAG-$1-$2"
  echo "== $name: $SESSIONS sessions, $DURATION"
  timeout 600 "$BIN" --threads 1 serve --wt-listen "127.0.0.1:$WT_PORT" \
    --http-listen "127.0.0.1:$HTTP_PORT" --cert-dir "$CERTS" --max-sessions 60000 \
    --max-http-conns-per-ip 60000 >"$RAW/$name.server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  RUST_LOG=warn timeout 300 "$BIN" swarm --json --engine "$engine" \
    --url "https://127.0.0.1:$WT_PORT/positions" \
    --cert-hash-url "http://127.0.0.1:$HTTP_PORT/certificate.sha256" \
    --sessions "$SESSIONS" --duration "$DURATION" --connect-timeout 120s \
    >"$RAW/$name.json" 2>"$RAW/$name.swarm.log" || echo "   swarm failed: see $RAW/$name.swarm.log"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=
  python3 - "$RAW/$name.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
s, l = r.get("server") or {}, r.get("load_generator") or {}
print(f"   sessions {r['sessions_connected']}/{r['sessions_requested']} connected, {r['sessions_lost']} lost  "
      f"delivery {r['delivery_ratio']:.5f}  p50/p99 {r['latency_ms']['p50']:.1f}/{r['latency_ms']['p99']:.1f} ms  "
      f"swarm {l.get('cpu_seconds', 0):.2f} CPU s = {l.get('cpu_us_per_delivered_datagram', 0):.2f} us/dgram, "
      f"RSS {l.get('rss_bytes', 0)/1e6:.0f} MB  server {s.get('cpu_us_per_delivered_datagram', 0):.2f} us/dgram")
PY
}

for round in $(seq "$ROUNDS"); do
  run wtransport "$round"
  run proto "$round"
done

python3 - "$RAW" "$ROUNDS" "$OUT/swarm-engine$TAG.md" "$TAG" <<'PY'
import json, sys
from pathlib import Path
raw, rounds, out, tag = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
lines = ["| engine | round | sessions connected of requested | lost | connect s | delivery | latency ms p50 / p99 "
         "| swarm CPU s in the window | swarm CPU µs per delivered datagram | swarm RSS MB "
         "| server CPU µs per delivered datagram |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for round in range(1, rounds + 1):
    for engine in ("wtransport", "proto"):
        name = f"swarm-engine{tag}-{engine}-{round}"
        try:
            r = json.loads((raw / f"{name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            lines.append(f"| {engine} | {round} | failed: see {name}.swarm.log |" + " |" * 8)
            continue
        s, l = r.get("server") or {}, r.get("load_generator") or {}
        lines.append(
            f"| {engine} | {round} | {r['sessions_connected']:,} of {r['sessions_requested']:,} | {r['sessions_lost']:,} "
            f"| {r['connect_seconds']:.1f} | {r['delivery_ratio']*100:.2f} % "
            f"| {r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f} "
            f"| {l.get('cpu_seconds', 0):.2f} | {l.get('cpu_us_per_delivered_datagram', 0):.2f} "
            f"| {l.get('rss_bytes', 0)/1e6:.0f} | {s.get('cpu_us_per_delivered_datagram', 0):.2f} |")
out.write_text("\n".join(lines) + "\n")
print(out.read_text())
PY
