"""Turns bench/soak.sh's samples into a start / middle / end table and a plot.

usage: python3 bench/soak_report.py SOAK.csv SWARM.json OUT.md OUT.png

The CSV is bench/sample_metrics.sh's. "Start" is the first sample with every session open, so
the connect phase does not count as growth; the last row is the sample taken after the swarm
closed everything.
"""
import csv
import json
import sys
from pathlib import Path

csv_path, swarm_path, out_md, out_png = (Path(a) for a in sys.argv[1:5])
rows = [r for r in csv.DictReader(csv_path.open()) if r["rss_bytes"]]
t0 = int(rows[0]["unix_ms"])
for r in rows:
    r["t"] = (int(r["unix_ms"]) - t0) / 1000
try:
    swarm = json.loads(swarm_path.read_text())
except (OSError, json.JSONDecodeError):
    swarm = {}

target = swarm.get("sessions_requested") or max(int(r["sessions_webtransport"]) for r in rows)
# Steady state: from the first sample with (nearly) every session open to the last one with any.
live = [r for r in rows if int(r["sessions_webtransport"]) >= 0.95 * target]
steady = rows[rows.index(live[0]):rows.index(live[-1]) + 1] if live else rows
after = rows[-1] if int(rows[-1]["sessions_webtransport"]) == 0 else None


def fig(r, key):
    v = float(r[key])
    return f"{v / 1e6:.1f} MB" if key == "rss_bytes" else f"{v:,.0f}"


keys = [("rss_bytes", "RSS"), ("open_fds", "open files"), ("tokio_alive_tasks", "tokio tasks"),
        ("sessions_webtransport", "sessions open"), ("accepted_total", "sessions accepted so far")]
picks = [("start", steady[0]), ("middle", steady[len(steady) // 2]), ("end", steady[-1])]
if after:
    picks.append(("after the swarm left", after))
lines = [
    "| when | minute | " + " | ".join(label for _, label in keys) + " |",
    "| --- | --- | " + " | ".join("---" for _ in keys) + " |",
]
for name, r in picks:
    lines.append(f"| {name} | {r['t'] / 60:.1f} | " + " | ".join(fig(r, k) for k, _ in keys) + " |")


def slope(key):
    """Least-squares growth per hour over the steady state."""
    xs = [r["t"] / 3600 for r in steady]
    ys = [float(r[key]) for r in steady]
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


churn = swarm.get("churn") or {}
lines += [
    "",
    f"Steady state {steady[0]['t'] / 60:.1f}-{steady[-1]['t'] / 60:.1f} min, {len(steady)} samples; "
    f"trend (least squares) per hour: RSS {slope('rss_bytes') / 1e6:+.1f} MB, "
    f"open files {slope('open_fds'):+.1f}, tokio tasks {slope('tokio_alive_tasks'):+.1f}. "
    f"Swarm: {swarm.get('sessions_connected', '?')} of {swarm.get('sessions_requested', '?')} "
    f"connected at the start, {swarm.get('sessions_lost', '?')} lost (not closed by the churn), "
    f"{churn.get('sessions_closed', '?')} closed and {churn.get('sessions_opened', '?')} opened "
    f"by the churn ({churn.get('per_s', '?')}/s), connect failures "
    f"{swarm.get('connect_failures_by_reason', {})}, later failed attempts "
    f"{swarm.get('attempts_failed_by_reason', {})}.",
]
out_md.write_text("\n".join(lines) + "\n")
print(out_md.read_text())

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig_, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
series = [("rss_bytes", "RSS, MB", 1e6), ("open_fds", "open files", 1),
          ("tokio_alive_tasks", "tokio tasks", 1), ("sessions_webtransport", "sessions open", 1)]
for ax, (key, label, scale) in zip(axes, series):
    ax.plot([r["t"] / 60 for r in rows], [float(r[key]) / scale for r in rows], marker=".", lw=1)
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
axes[-1].set_xlabel("minutes")
fig_.suptitle(f"fleetcast soak: {target:,} sessions, {churn.get('per_s', '?')}/s joining and leaving")
fig_.tight_layout()
fig_.savefig(out_png, dpi=100)
print(f"plot: {out_png}")
