#!/usr/bin/env bash
# Reconnect storm (issue 8, item 13): 10,000 sessions, the server restarted on the same ports
# under them; how long until all are back, and how fast the server is asked for handshakes.
#
# Runs the storm once per schedule in STORM_SCHEDULES (JITTER:BASE:CAP[:MAX_HANDSHAKES]), in
# one invocation, so they compare. The default set:
#   equal:500ms:10s       the web demo before issue 8 (wait 250-500 ms, window 0.5 s to 10 s)
#   full:1s:8s            the web demo now, web-demo/backoff.js (anywhere in 1 s, up to 8 s)
#   full:1s:8s:1024       the same against a server with --max-handshakes 1024
# For each it starts a server, `fleetcast swarm --reconnect` with that schedule, waits until
# every session is open, SIGTERMs the server, starts a new one on the same ports with the same
# certificate directory (same certificate hash), and lets the swarm reconnect. Writes
#   bench/results/raw/storm-NAME.csv         /metrics every 250 ms (sample_metrics.sh)
#   bench/results/raw/storm-NAME.swarm.json  the swarm's report (recovery, failures)
#   bench/results/raw/storm-NAME.events      unix ms of SIGTERM, exit, new server up
#   bench/results/raw/storm-NAME.*.log       the logs (NAME: e.g. full-1s-8s-mh1024)
#   bench/results/storm.md                       the table (bench/storm_report.py)
#
#   bench/storm.sh                          10,000 sessions, the three above (~4 minutes)
#   STORM_SESSIONS=3000 STORM_TAG=-3k bench/storm.sh   smaller, into storm-3k-*.{csv,...} and
#                                           bench/results/storm-3k.md
#
# Loopback only, bounded: the swarm stops after its window, the servers on SIGTERM (EXIT trap).
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${STORM_SESSIONS:-10000}
TAG=${STORM_TAG:-}
SCHEDULES=${STORM_SCHEDULES:-equal:500ms:10s full:1s:8s full:1s:8s:1024}
WINDOW=${STORM_WINDOW:-45s}
# Extra `fleetcast serve` options for every server, e.g. STORM_SERVE_ARGS='--tick-ms 500'.
read -r -a EXTRA_SERVE_ARGS <<<"${STORM_SERVE_ARGS:-}"
WT_PORT=${STORM_WT_PORT:-14633}
HTTP_PORT=${STORM_HTTP_PORT:-18280}
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
SWARM_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  [ -n "$SWARM_PID" ] && kill "$SWARM_PID" 2>/dev/null || true
  rm -rf "$CERTS"
}
trap cleanup EXIT
ms() { echo $(($(date +%s%N) / 1000000)); }

# start_server LOG: starts the server, returns once /healthz answers.
start_server() {
  "$BIN" --threads 1 serve --wt-listen "[::]:$WT_PORT" --http-listen "[::]:$HTTP_PORT" \
    --cert-dir "$CERTS" "${SERVE_ARGS[@]}" >>"$1" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "server did not start: see $1" >&2
  return 1
}

open_sessions() {
  curl -s -m 2 "http://127.0.0.1:$HTTP_PORT/metrics" |
    awk '$1 == "fleetcast_sessions{transport=\"webtransport\"}" { print $2 }'
}

for schedule in $SCHEDULES; do
  # JITTER:BASE:CAP[:MAX_HANDSHAKES]
  IFS=: read -r jitter base cap handshakes <<<"$schedule"
  backoff=(--reconnect-jitter "$jitter" --reconnect-base "$base" --reconnect-cap "$cap")
  SERVE_ARGS=("${EXTRA_SERVE_ARGS[@]}")
  [ -n "$handshakes" ] && SERVE_ARGS+=(--max-handshakes "$handshakes")
  name=storm$TAG-$jitter-$base-$cap${handshakes:+-mh$handshakes}
  echo "== $name: $SESSIONS sessions, ${backoff[*]} ${SERVE_ARGS[*]}"
  : >"$RAW/$name.server.log"
  start_server "$RAW/$name.server.log"
  RUST_LOG=warn "$BIN" swarm --json --url "https://127.0.0.1:$WT_PORT/positions" \
    --cert-hash-url "http://127.0.0.1:$HTTP_PORT/certificate.sha256" --metrics-url none \
    --sessions "$SESSIONS" --connect-timeout 120s --duration "$WINDOW" \
    --reconnect "${backoff[@]}" >"$RAW/$name.swarm.json" 2>"$RAW/$name.swarm.log" &
  SWARM_PID=$!
  bench/sample_metrics.sh "http://127.0.0.1:$HTTP_PORT/metrics" 0.25 "$SWARM_PID" \
    >"$RAW/$name.csv" &
  SAMPLER_PID=$!
  # Until every session is open (at most 150 s), then 5 s of steady state.
  for _ in $(seq 1500); do
    [ "$(open_sessions)" = "$SESSIONS" ] && break
    sleep 0.1
  done
  sleep 5
  echo "sigterm_unix_ms $(ms)" >"$RAW/$name.events"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  echo "exited_unix_ms $(ms)" >>"$RAW/$name.events"
  start_server "$RAW/$name.server.log"
  echo "up_unix_ms $(ms)" >>"$RAW/$name.events"
  wait "$SWARM_PID" || echo "   swarm failed: see $RAW/$name.swarm.log"
  SWARM_PID=
  wait "$SAMPLER_PID" || true
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=
done

names=()
for schedule in $SCHEDULES; do
  IFS=: read -r jitter base cap handshakes <<<"$schedule"
  names+=("$jitter-$base-$cap${handshakes:+-mh$handshakes}")
done
python3 bench/storm_report.py "$RAW" "$OUT/storm$TAG.md" "${names[@]}" --tag "$TAG"
