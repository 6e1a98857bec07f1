#!/usr/bin/env bash
# Soak (issue 8, item 14): sessions join and leave at a steady rate for SOAK_DURATION while the
# server's RSS, open files and live tokio tasks are sampled from its /metrics. Writes
#   bench/results/raw/soak.csv          the samples (bench/sample_metrics.sh columns)
#   bench/results/raw/soak.swarm.json   the swarm's report (churn counts, failures by reason)
#   bench/results/raw/soak.*.log        both processes' logs
#   bench/results/soak.md, soak.png     start / middle / end table and the curve
#
#   bench/soak.sh                              30 minutes, 1,000 sessions, 50 joining and 50
#                                              leaving a second
#   SOAK_DURATION=2m SOAK_SESSIONS=200 bench/soak.sh    a short check
#
# Loopback only; both processes stop by themselves (the swarm after SOAK_DURATION, the server
# on SIGTERM from this script, or from the EXIT trap).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${SOAK_DURATION:-30m}
SESSIONS=${SOAK_SESSIONS:-1000}
CHURN=${SOAK_CHURN_PER_S:-50}
INTERVAL=${SOAK_SAMPLE_S:-10}
WT_PORT=${SOAK_WT_PORT:-14533}
HTTP_PORT=${SOAK_HTTP_PORT:-18180}
OUT=bench/results
RAW=$OUT/raw
mkdir -p "$RAW"

if [ -z "${FLEETCAST_BIN:-}" ]; then
  cargo build --release --bin fleetcast
  FLEETCAST_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/fleetcast
fi
BIN=$FLEETCAST_BIN
ulimit -n "$(ulimit -Hn)" || true
CERTS=$(mktemp -d)
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$CERTS"
}
trap cleanup EXIT

"$BIN" --threads 1 serve --wt-listen "[::]:$WT_PORT" --http-listen "[::]:$HTTP_PORT" \
  --cert-dir "$CERTS" >"$RAW/soak.server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break
  sleep 0.1
done

echo "== soak: $SESSIONS sessions, $CHURN/s joining and leaving, $DURATION"
RUST_LOG=warn "$BIN" swarm --json --url "https://127.0.0.1:$WT_PORT/positions" \
  --cert-hash-url "http://127.0.0.1:$HTTP_PORT/certificate.sha256" \
  --sessions "$SESSIONS" --churn-per-s "$CHURN" --duration "$DURATION" --connect-timeout 60s \
  >"$RAW/soak.swarm.json" 2>"$RAW/soak.swarm.log" &
SWARM_PID=$!
# From before the swarm connects until it has closed its sessions.
bench/sample_metrics.sh "http://127.0.0.1:$HTTP_PORT/metrics" "$INTERVAL" "$SWARM_PID" \
  >"$RAW/soak.csv" &
SAMPLER_PID=$!
wait "$SWARM_PID" || echo "   swarm failed: see $RAW/soak.swarm.log"
wait "$SAMPLER_PID" || true
# One more sample once the swarm's sessions are gone: what is left with no session open.
sleep 3
bench/sample_metrics.sh "http://127.0.0.1:$HTTP_PORT/metrics" 0 once | tail -n 1 >>"$RAW/soak.csv"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=

python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q matplotlib
python3 bench/soak_report.py "$RAW/soak.csv" "$RAW/soak.swarm.json" "$OUT/soak.md" "$OUT/soak.png"
