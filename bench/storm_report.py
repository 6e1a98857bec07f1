"""Summarises bench/storm.sh's runs into a Markdown table.

usage: python3 bench/storm_report.py RAW_DIR OUT.md SCHEDULE... [--tag TAG]

For each schedule: the restart (SIGTERM to the new server answering), recovery (from SIGTERM and
from the swarm's first loss until every session was back), the handshake rate the server saw
(WebTransport sessions accepted + handshakes failed + refused while busy, per 250 ms sample,
as a rate per second), the refusals and failures, the server's RSS, and the CPU the server and
the load generator used while the sessions came back.
"""
import csv
import json
import sys
from pathlib import Path

raw, out_md, schedules = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
tag = ""
if "--tag" in schedules:
    i = schedules.index("--tag")
    tag = schedules[i + 1] if i + 1 < len(schedules) else ""
    schedules = schedules[:i] + schedules[i + 2:]


def describe(name):
    """`equal-500ms-10s-mh1024` -> words."""
    parts = name.split("-")
    jitter, base, cap = parts[:3]
    how = ("equal jitter (the page before issue 8)" if jitter == "equal"
           else "full jitter")
    mh = next((p[2:] for p in parts[3:] if p.startswith("mh")), None)
    return (f"{how}, window {base} doubling to {cap}; server --max-handshakes "
            f"{mh or '4096 (default)'}")



def num(v):
    return float(v) if v not in ("", None) else None


lines = [
    "| schedule | sessions connected of requested | restart s (SIGTERM to new server up) | all back s after SIGTERM "
    "| all back s after first loss | down per session ms p50 / p99 / max | reconnect attempts "
    "| failed attempts by reason | new server: peak handshakes/s (250 ms) | mean handshakes/s until all back "
    "| refused busy | handshakes failed | peak RSS MB | CPU s per s until all back: server / load generator |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for s in schedules:
    name = f"storm{tag}-{s}"
    try:
        swarm = json.loads((raw / f"{name}.swarm.json").read_text())
    except (OSError, json.JSONDecodeError):
        lines.append(f"| {s} | failed: see bench/results/raw/{name}.swarm.log |" + " |" * 12)
        continue
    events = dict(l.split() for l in (raw / f"{name}.events").read_text().splitlines())
    sigterm, up = int(events["sigterm_unix_ms"]), int(events["up_unix_ms"])
    r = swarm["reconnect"] or {}
    back = r.get("all_back_unix_ms")
    rows = [x for x in csv.DictReader((raw / f"{name}.csv").open())]
    # Samples of the new server: after it came up (its counters start from zero).
    after = [x for x in rows if int(x["unix_ms"]) >= up and x["accepted_total"]]
    rates, total = [], None
    prev = None
    for x in after:
        t = int(x["unix_ms"]) / 1000
        hs = sum(num(x[k]) or 0 for k in ("accepted_total", "handshake_failed", "refused_busy"))
        if prev is not None and t > prev[0]:
            rates.append(((hs - prev[1]) / (t - prev[0]), t))
        prev = (t, hs)
    peak = max((v for v, _ in rates), default=0)
    until_back = [x for x in after if back is None or int(x["unix_ms"]) <= back + 250]
    if until_back:
        last = until_back[-1]
        hs = sum(num(last[k]) or 0 for k in ("accepted_total", "handshake_failed", "refused_busy"))
        mean = hs / max(1e-3, (int(last["unix_ms"]) - up) / 1000)
    else:
        mean = 0
    # CPU seconds per second from the new server's start until all were back: the server's and
    # the load generator's (both share the machine's cores).
    span = [x for x in rows if int(x["unix_ms"]) >= up and (back is None or int(x["unix_ms"]) <= back)]

    def rate(key):
        pts = [(int(x["unix_ms"]) / 1000, num(x.get(key))) for x in span if num(x.get(key)) is not None]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    cpu_server, cpu_load = rate("cpu_seconds"), rate("load_cpu_seconds")
    last = after[-1] if after else {}
    rss = max((num(x["rss_bytes"]) or 0 for x in rows), default=0) / 1e6
    d = r.get("down_ms") or {}
    fails = swarm.get("attempts_failed_by_reason") or {}
    lines.append(
        f"| {describe(s)} | {swarm['sessions_connected']:,} of {swarm['sessions_requested']:,} "
        f"| {(up - sigterm) / 1000:.2f} "
        f"| {'not all' if back is None else f'{(back - sigterm) / 1000:.2f}'} "
        f"| {r.get('recovery_seconds') if r.get('recovery_seconds') is not None else 'not all'} "
        f"| {d.get('p50', 0):.0f} / {d.get('p99', 0):.0f} / {d.get('max', 0):.0f} "
        f"| {r.get('attempts', 0):,} "
        f"| {', '.join(f'{n:,} {k}' for k, n in fails.items()) or 'none'} "
        f"| {peak:,.0f} | {mean:,.0f} "
        f"| {int(num(last.get('refused_busy')) or 0):,} | {int(num(last.get('handshake_failed')) or 0):,} "
        f"| {rss:.0f} "
        f"| {'n/a' if cpu_server is None else f'{cpu_server:.2f}'} / {'n/a' if cpu_load is None else f'{cpu_load:.2f}'} |"
    )
out_md.write_text("\n".join(lines) + "\n")
print(out_md.read_text())
