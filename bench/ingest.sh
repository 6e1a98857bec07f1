#!/usr/bin/env bash
# Ingest benchmark: how many fixes per second `POST /v1/positions` accepts, on an idle server
# and while 10,000 WebTransport sessions are served, in one run on one server.
#
#   bench/ingest.sh                       300,000 fixes per publish run, 10,000 sessions
#   INGEST_FIXES_S=600 INGEST_SESSIONS=1000 bench/ingest.sh    a quick one
#
# Writes bench/results/raw/ingest-*.json and bench/results/ingest.md. Everything stays on
# loopback; the server and the swarm stop by themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

CARS=100
SECONDS_RECORDED=${INGEST_FIXES_S:-3000}   # fixes per run = CARS * SECONDS_RECORDED
SESSIONS=${INGEST_SESSIONS:-10000}
BATCH=${INGEST_BATCH:-1000}
OUT=bench/results
RAW="$OUT/raw"
mkdir -p "$RAW"
TOKEN=bench-publisher-token-0123456789

cargo build --release --bin fleetcast
BIN=$PWD/target/release/fleetcast
ulimit -n "$(ulimit -Hn)" || true
WORK=$(mktemp -d)
cleanup() {
  [ -n "${SWARM_PID:-}" ] && kill "$SWARM_PID" 2>/dev/null || true
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Two recordings of the simulator, the second later than the first (a fix older than the one
# held for its car would be rejected), both in the past (a fix may be at most 5 s ahead).
echo "== recording $((CARS * SECONDS_RECORDED)) fixes twice"
"$BIN" sim --record "$WORK/a.ndjson" --cars "$CARS" --duration "${SECONDS_RECORDED}s" \
  --start-time "$(date -u -d '-6 hours' +%Y-%m-%dT%H:%M:%SZ)" --seed 1
"$BIN" sim --record "$WORK/b.ndjson" --cars "$CARS" --duration "${SECONDS_RECORDED}s" \
  --start-time "$(date -u -d '-4 hours' +%Y-%m-%dT%H:%M:%SZ)" --seed 1

"$BIN" --threads 1 serve --wt-listen '[::]:14433' --http-listen '[::]:18080' \
  --cert-dir "$WORK/certs" --max-sessions 60000 --feed ingest --publish-token "$TOKEN" \
  --ingest-rate 1000000 --car-timeout 24h >"$RAW/ingest.server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:18080/healthz >/dev/null 2>&1 && break
  sleep 0.1
done

cpu() { curl -sf http://127.0.0.1:18080/metrics | awk '/^process_cpu_seconds_total /{print $2}'; }

# publish NAME FILE [BASELINE]: one publisher as fast as the server accepts, with the server's
# CPU used, less BASELINE CPU seconds per second (what serving the sessions costs anyway).
publish() {
  local name=$1 file=$2 baseline=${3:-0} before after
  before=$(cpu)
  FLEETCAST_PUBLISH_TOKEN=$TOKEN "$BIN" publish --url http://127.0.0.1:18080 --batch "$BATCH" \
    --json "$file" >"$RAW/$name.json" 2>"$RAW/$name.log"
  after=$(cpu)
  python3 - "$RAW/$name.json" "$before" "$after" "$baseline" <<'PY'
import json, sys
path, before, after, baseline = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
r = json.load(open(path))
r["server_cpu_s"] = round(after - before, 3)
r["baseline_cpu_s_per_s"] = baseline
ingest_cpu = (after - before) - baseline * r["elapsed_s"]
r["server_cpu_us_per_fix"] = round(ingest_cpu * 1e6 / max(r["accepted"], 1), 3)
json.dump(r, open(path, "w"))
print(f"   accepted {r['accepted']} rejected {r['rejected']} in {r['elapsed_s']:.2f} s: "
      f"{r['fixes_per_s']:.0f} fixes/s, server CPU {r['server_cpu_us_per_fix']:.2f} us/fix")
PY
}

echo "== ingest with no session"
publish ingest-idle "$WORK/a.ndjson"

echo "== ingest while $SESSIONS sessions are served"
RUST_LOG=warn "$BIN" swarm --json --url https://127.0.0.1:14433/positions \
  --cert-hash-url http://127.0.0.1:18080/certificate.sha256 \
  --sessions "$SESSIONS" --duration 40s --connect-timeout 180s \
  >"$RAW/ingest-$SESSIONS.swarm.json" 2>"$RAW/ingest-$SESSIONS.swarm.log" &
SWARM_PID=$!
until [ "$(curl -sf http://127.0.0.1:18080/healthz | python3 -c 'import json,sys; print(json.load(sys.stdin)["sessions"])')" -ge "$SESSIONS" ]; do
  kill -0 "$SWARM_PID" 2>/dev/null || { echo "swarm ended early"; break; }
  sleep 0.5
done
sleep 5 # let the connect burst settle into steady ticks
# What serving the sessions costs per second without ingest, to subtract from the ingest run.
c0=$(cpu); sleep 10; c1=$(cpu)
baseline=$(python3 -c "print(($c1 - $c0) / 10)")
echo "   serving $SESSIONS sessions alone: $baseline CPU s/s"
publish "ingest-$SESSIONS" "$WORK/b.ndjson" "$baseline"
wait "$SWARM_PID" || echo "   swarm failed: see $RAW/ingest-$SESSIONS.swarm.log"
SWARM_PID=
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=

python3 - "$RAW" "$SESSIONS" "$OUT/ingest.md" <<'PY'
import json, sys
raw, sessions, out = sys.argv[1], sys.argv[2], sys.argv[3]
idle = json.load(open(f"{raw}/ingest-idle.json"))
busy = json.load(open(f"{raw}/ingest-{sessions}.json"))
swarm = json.load(open(f"{raw}/ingest-{sessions}.swarm.json"))
rows = [
    ("none", idle),
    (f"{int(sessions):,} WebTransport sessions at 1 Hz", busy),
]
lines = [
    "| sessions served | fixes sent | accepted | rejected | seconds | fixes/s | server CPU per fix (less serving) |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]
for name, r in rows:
    lines.append(f"| {name} | {r['sent']:,} | {r['accepted']:,} | {r['rejected']:,} | "
                 f"{r['elapsed_s']:.2f} | {r['fixes_per_s']:,.0f} | {r['server_cpu_us_per_fix']:.2f} µs |")
lines.append("")
lines.append(f"The swarm during that run: {swarm['sessions_connected']:,} of {swarm['sessions_requested']:,} "
             f"sessions connected, {swarm.get('sessions_lost', 0):,} lost in the window, delivery {swarm['delivery_ratio']*100:.2f} %, latency p50/p99 "
             f"{swarm['latency_ms']['p50']:.0f}/{swarm['latency_ms']['p99']:.0f} ms.")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "results: $OUT/ingest.md"
