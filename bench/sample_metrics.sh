#!/usr/bin/env bash
# Samples a fleetcast server's /metrics into CSV while PID (the load generator) runs: one line
# per INTERVAL seconds, time since start first.
#
#   bench/sample_metrics.sh URL INTERVAL PID > out.csv
#   bench/sample_metrics.sh URL 0 once          one sample (t_s 0: use unix_ms to place it)
#
# Columns: t_s, unix_ms, rss_bytes, open_fds, tokio_alive_tasks, sessions_webtransport,
# sessions_websocket, accepted_total (WebTransport), handshake_failed, refused_busy,
# refused_full, cpu_seconds (the server's), load_cpu_seconds (PID's user + system CPU: the load
# generator, which shares the cores). Empty fields when the server did not answer (restarting).
set -u
url=$1 interval=$2 pid=$3
start=$(date +%s%N)
echo "t_s,unix_ms,rss_bytes,open_fds,tokio_alive_tasks,sessions_webtransport,sessions_websocket,accepted_total,handshake_failed,refused_busy,refused_full,cpu_seconds,load_cpu_seconds"
while [ "$pid" = once ] || kill -0 "$pid" 2>/dev/null; do
  now=$(date +%s%N)
  body=$(curl -s -m 2 "$url" || true)
  t=$(awk -v n="$now" -v s="$start" 'BEGIN { printf "%.3f", (n - s) / 1e9 }')
  load=
  if [ "$pid" != once ] && [ -r "/proc/$pid/stat" ]; then
    # utime + stime (fields 14, 15; the name in field 2 has no spaces here) in clock ticks.
    load=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$pid/stat" 2>/dev/null || true)
  fi
  if [ -z "$body" ]; then
    echo "$t,$((now / 1000000)),,,,,,,,,,,$load"
  else
    printf '%s\n' "$body" | awk -v t="$t" -v ms="$((now / 1000000))" -v load="$load" '
      $1 == "process_resident_memory_bytes" { rss = $2 }
      $1 == "process_open_fds" { fds = $2 }
      $1 == "tokio_alive_tasks" { tasks = $2 }
      $1 == "process_cpu_seconds_total" { cpu = $2 }
      $1 == "fleetcast_sessions{transport=\"webtransport\"}" { wt = $2 }
      $1 == "fleetcast_sessions{transport=\"websocket\"}" { ws = $2 }
      $1 == "fleetcast_sessions_accepted_total{transport=\"webtransport\"}" { acc = $2 }
      $1 == "fleetcast_sessions_refused_total{transport=\"webtransport\",reason=\"handshake_failed\"}" { hf = $2 }
      $1 == "fleetcast_sessions_refused_total{transport=\"webtransport\",reason=\"handshakes_busy\"}" { busy = $2 }
      $1 == "fleetcast_sessions_refused_total{transport=\"webtransport\",reason=\"full\"}" { full = $2 }
      END { printf "%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n", t, ms, rss, fds, tasks, wt, ws, acc, hf, busy, full, cpu, load }'
  fi
  [ "$pid" = once ] && break
  sleep "$interval"
done
