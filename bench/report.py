"""Turns the swarm's JSON results into a Markdown table and a plot.

usage: python3 bench/report.py RAW_DIR OUT.md OUT.png
"""
import json
import platform
import subprocess
import sys
from pathlib import Path

raw, out_md, out_png = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

ORDER = ["wt-1k", "wt-10k", "wt-20k", "wt-50k", "wt-10k-10hz",
         "wtq-1k", "wtq-10k", "wtq-20k", "wtq-10k-10hz",
         "ws-1k", "ws-10k", "ws-10k-10hz",
         "wt-1k-loss0", "wt-1k-loss5", "ws-1k-loss0", "ws-1k-loss5"]


def load(name):
    path = raw / f"{name}.json"
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


rows = []
# Runs that did not connect every session, or lost some in the window: named under the table,
# so no table can look complete without them.
incomplete = []
for name in ORDER:
    r = load(name)
    if r is None:
        if (raw / f"{name}.swarm.log").exists():
            rows.append(f"| {name} | failed: see bench/results/raw/{name}.swarm.log |" + " |" * 10)
        continue
    s = r.get("server") or {}
    rate = "10 Hz" if "10hz" in name else "1 Hz"
    lat, age = r["latency_ms"], r["position_age_ms"]
    transport = r["transport"]
    if transport == "webtransport":
        transport += " (quinn)" if name.startswith("wtq-") else " (proto)"
    lost = r.get("sessions_lost", 0)
    missing = r["sessions_requested"] - r["sessions_connected"]
    if missing > 0 or lost > 0:
        reasons = ", ".join(f"{n:,} {k}" for k, n in (r.get("connect_failures_by_reason") or {}).items())
        incomplete.append(f"- **{name}: {r['sessions_connected']:,} of {r['sessions_requested']:,} sessions "
                          f"connected, {lost:,} lost in the window**"
                          + (f" (connect failures: {reasons})" if reasons else ""))
    warn = " ⚠" if missing > 0 or lost > 0 else ""
    rows.append(
        f"| {name} | {transport} | {rate} "
        f"| {r['sessions_connected']:,} of {r['sessions_requested']:,}{warn} | {lost:,}{warn} | {r['connect_seconds']:.1f} "
        f"| {r['delivery_ratio']*100:.2f} % "
        f"| {lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} "
        f"| {age['p50']:.0f} / {age['p99']:.0f} "
        f"| {fmt(s.get('cpu_us_per_delivered_datagram'), '.1f')} "
        f"| {fmt(s.get('rss_per_session_bytes', 0) / 1e3 if s else None, '.1f')} "
        f"| {r['ticks']} of {r.get('ticks_expected', r['ticks'])} |"
    )

cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                     capture_output=True, text=True).stdout.strip()
header = [
    f"Machine: {platform.node()}, {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, "
    f"Linux {platform.release()}; server and swarm share the cores.",
    "",
    "| run | transport | tick rate | sessions connected of requested | lost in window | connect s | delivery | latency ms p50 / p99 / max "
    "| position age ms p50 / p99 | server CPU µs per delivered datagram | server RSS KB per session | ticks sent of expected |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
footer = []
if incomplete:
    footer = ["", "Runs that did not hold every session (delivery leaves out sessions that never connected "
              "and charges lost ones for the rest of the window):", ""] + incomplete
out_md.write_text("\n".join(header + rows + footer) + "\n")
print(out_md.read_text())

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib missing: no plot (pip install matplotlib)")
    sys.exit(0)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
for prefix, label, marker in [("wt", "WebTransport (proto)", "o"), ("wtq", "WebTransport (quinn)", "^"),
                              ("ws", "WebSocket", "s")]:
    xs, p50, p99, cpu_us = [], [], [], []
    for n in ["1k", "10k", "20k", "50k"]:
        r = load(f"{prefix}-{n}")
        if r is None or r["sessions_connected"] == 0:
            continue
        xs.append(r["sessions_connected"])
        p50.append(r["latency_ms"]["p50"])
        p99.append(r["latency_ms"]["p99"])
        cpu_us.append((r.get("server") or {}).get("cpu_us_per_delivered_datagram", float("nan")))
    if xs:
        ax1.plot(xs, p99, marker=marker, label=f"{label} p99")
        ax1.plot(xs, p50, marker=marker, linestyle="--", label=f"{label} p50")
        ax2.plot(xs, cpu_us, marker=marker, label=label)
for ax in (ax1, ax2):
    ax.set_xscale("log")
    ax.set_xlabel("sessions connected (1 Hz, 100 cars)")
    ax.grid(True, alpha=0.3)
    ax.legend()
ax1.set_yscale("log")
ax1.set_ylabel("tick-to-receipt latency, ms (log)")
ax1.set_title("Latency")
ax2.set_ylabel("server CPU µs per delivered datagram")
ax2.set_title("Server CPU")
fig.suptitle("fleetcast on 2 cores, server and load generator on the same machine")
fig.tight_layout()
fig.savefig(out_png, dpi=110)
print(f"plot: {out_png}")
