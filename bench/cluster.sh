#!/usr/bin/env bash
# fleetcast cluster benchmark: the same total of sessions on one node, on one node behind NATS,
# and spread over three nodes joined by NATS, in one run. Writes the swarm's JSON, the nodes'
# and NATS's CPU and memory, and NATS's byte counters to bench/results/raw/cluster/, then
# bench/results/cluster.md.
#
#   bench/cluster.sh                    6,000 sessions, 30 s windows (about 5 minutes)
#   CLUSTER_SESSIONS=3000 bench/cluster.sh
#
# Needs nats-server (apt-get install nats-server). Everything stays on 127.0.0.1; every
# process this script starts is stopped by it.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${CLUSTER_SESSIONS:-6000}
DURATION=${CLUSTER_DURATION:-30s}
RAW=bench/results/raw/cluster
mkdir -p "$RAW"
rm -f "$RAW"/*.json "$RAW"/*.log

command -v nats-server >/dev/null || { apt-get update -qq && apt-get install -y -qq nats-server; }
cargo build --release --bin fleetcast
BIN=$PWD/target/release/fleetcast
ulimit -n "$(ulimit -Hn)" || true
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# CPU seconds (user + system) of a process so far.
cpu_s() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start_nats() {
  nats-server -js -a 127.0.0.1 -p 24222 -m 28222 -sd "$WORK/nats" >"$RAW/nats.log" 2>&1 &
  NATS_PID=$!
  PIDS+=("$NATS_PID")
  for _ in $(seq 100); do curl -sf http://127.0.0.1:28222/varz >/dev/null && break; sleep 0.1; done
}

# start_node INDEX [--nats URL]: one shard, the simulator's 100 cars.
start_node() {
  local i=$1
  shift
  "$BIN" --threads 1 serve --shards 1 --feed sim "$@" --node-name "node$i" --nats-prefix bench \
    --wt-listen "127.0.0.1:1443$i" --http-listen "127.0.0.1:1808$i" --cert-dir "$WORK/certs$i" \
    --max-sessions 60000 --max-http-conns-per-ip 60000 >"$RAW/$ROW.node$i.log" 2>&1 &
  NODE_PIDS+=("$!")
  PIDS+=("$!")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:1808$i/healthz" >/dev/null && break; sleep 0.1; done
}

# row NAME NODES NATS(yes/no)
row() {
  ROW=$1
  local nodes=$2 nats=$3
  echo "== $ROW: $SESSIONS sessions over $nodes node(s), NATS: $nats"
  NODE_PIDS=()
  local nats_args=()
  if [ "$nats" = yes ]; then
    start_nats
    nats_args=(--nats nats://127.0.0.1:24222)
  fi
  local servers=()
  for i in $(seq 0 $((nodes - 1))); do
    start_node "$i" "${nats_args[@]}"
    servers+=("http://127.0.0.1:1808$i")
  done
  # Wait until every node forwards ticks (in a cluster: a ticker was elected).
  for i in $(seq 0 $((nodes - 1))); do
    for _ in $(seq 200); do
      [ "$(curl -sf "http://127.0.0.1:1808$i/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cars"])')" = 100 ] && break
      sleep 0.1
    done
  done
  local list
  list=$(IFS=,; echo "${servers[*]}")
  # The measurement window: the swarm's duration after every session connected.
  RUST_LOG=warn "$BIN" swarm --json --server "$list" --sessions "$SESSIONS" --duration "$DURATION" \
    --connect-timeout 180s --metrics-url none >"$RAW/$ROW.json" 2>"$RAW/$ROW.swarm.log" &
  local swarm=$!
  PIDS+=("$swarm")
  # CPU over the whole swarm run (connects included) of every node and of NATS.
  local before=() after=() rss=()
  for pid in "${NODE_PIDS[@]}"; do before+=("$(cpu_s "$pid")"); done
  local nats_before=0 nats_in0=0 nats_out0=0
  if [ "$nats" = yes ]; then
    nats_before=$(cpu_s "$NATS_PID")
    read -r nats_in0 nats_out0 < <(curl -s http://127.0.0.1:28222/varz | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["in_bytes"], v["out_bytes"])')
  fi
  local t0
  t0=$(date +%s.%N)
  wait "$swarm" || echo "   swarm failed: see $RAW/$ROW.swarm.log"
  local t1
  t1=$(date +%s.%N)
  for pid in "${NODE_PIDS[@]}"; do after+=("$(cpu_s "$pid")"); rss+=("$(rss_kb "$pid")"); done
  local nats_cpu=0 nats_in=0 nats_out=0
  if [ "$nats" = yes ]; then
    nats_cpu=$(python3 -c "print($(cpu_s "$NATS_PID") - $nats_before)")
    read -r nats_in nats_out < <(curl -s http://127.0.0.1:28222/varz | python3 -c "import json,sys; v=json.load(sys.stdin); print(v['in_bytes'] - $nats_in0, v['out_bytes'] - $nats_out0)")
  fi
  python3 - "$RAW/$ROW.host.json" "$t0" "$t1" "$nats_cpu" "$nats_in" "$nats_out" \
    "${before[*]}" "${after[*]}" "${rss[*]}" <<'PY'
import json, sys
out, t0, t1, nats_cpu, nats_in, nats_out, before, after, rss = sys.argv[1:]
before = [float(x) for x in before.split()]
after = [float(x) for x in after.split()]
json.dump({
    "wall_s": float(t1) - float(t0),
    "node_cpu_s": [a - b for a, b in zip(after, before)],
    "node_rss_kb": [int(x) for x in rss.split()],
    "nats_cpu_s": float(nats_cpu),
    "nats_in_bytes": int(nats_in),
    "nats_out_bytes": int(nats_out),
}, open(out, "w"), indent=1)
PY
  for pid in "${NODE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ "$nats" = yes ]; then kill "$NATS_PID"; wait "$NATS_PID" 2>/dev/null || true; rm -rf "$WORK/nats"; fi
}

row single 1 no
row nats-1 1 yes
row nats-3 3 yes

python3 - "$RAW" bench/results/cluster.md "$SESSIONS" "$DURATION" <<'PY'
import json, os, sys
raw, out, sessions, duration = sys.argv[1:]
lines = [
    f"# Cluster: {sessions} sessions, one node against three nodes joined by NATS",
    "",
    f"`bench/cluster.sh` ({duration} window after all sessions connected; one run, one 2-core box "
    "shared by the nodes, NATS and the load generator). CPU is over the whole swarm run (connects "
    "included), summed over the nodes.",
    "",
    "| row | nodes | connected | lost | delivery | p50 ms | p99 ms | nodes' CPU s | NATS CPU s | NATS in KB | NATS out KB | RSS per node MB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for name in ["single", "nats-1", "nats-3"]:
    try:
        r = json.load(open(os.path.join(raw, f"{name}.json")))
        h = json.load(open(os.path.join(raw, f"{name}.host.json")))
    except (OSError, ValueError) as e:
        lines.append(f"| {name} | failed: {e} |")
        continue
    lat = r["latency_ms"]
    lines.append(
        f"| {name} | {len(h['node_cpu_s'])} | {r['sessions_connected']}/{r['sessions_requested']} "
        f"| {r.get('sessions_lost', 0)} | {r['delivery_ratio']:.5f} | {lat['p50']:.1f} | {lat['p99']:.1f} "
        f"| {sum(h['node_cpu_s']):.1f} | {h['nats_cpu_s']:.2f} | {h['nats_in_bytes']/1e3:.0f} "
        f"| {h['nats_out_bytes']/1e3:.0f} | {' / '.join(f'{x/1e3:.0f}' for x in h['node_rss_kb'])} |"
    )
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
