//! `GET /metrics`: the server's counters in Prometheus text format, plus process CPU and memory
//! read from `/proc` (Linux; elsewhere those lines are left out).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::Shared;

/// Linux reports CPU times in clock ticks of 1/100 s (USER_HZ) on every architecture.
const USER_HZ: f64 = 100.0;

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A family with one sample per transport.
    fn by_transport(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        webtransport: u64,
        websocket: u64,
    ) {
        self.family(name, kind, help);
        self.sample(name, "transport=\"webtransport\"", webtransport);
        self.sample(name, "transport=\"websocket\"", websocket);
    }

    /// A counter family with one sample per (transport, reason).
    fn by_transport_and_reason(&mut self, name: &str, help: &str, rows: &[(&str, &str, u64)]) {
        self.family(name, "counter", help);
        for (transport, reason, value) in rows {
            let labels = format!("transport=\"{transport}\",reason=\"{reason}\"");
            self.sample(name, &labels, value);
        }
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }
}

/// The cluster's families (`--nats` only).
fn cluster_metrics(o: &mut Out, shared: &Shared, cluster: &super::cluster::Cluster) {
    let s = &shared.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    o.family(
        "fleetcast_nats_connected",
        "gauge",
        "1 while this node is connected to NATS.",
    );
    o.sample(
        "fleetcast_nats_connected",
        "",
        u8::from(cluster.connected()),
    );
    o.family(
        "fleetcast_cluster_ticker",
        "gauge",
        "1 while this node holds the ticker lease.",
    );
    o.sample(
        "fleetcast_cluster_ticker",
        "",
        u8::from(cluster.is_ticker()),
    );
    let name = "fleetcast_nats_events_total";
    o.family(name, "counter", "What the NATS client reported, by event.");
    let events = &cluster.events;
    o.sample(name, "event=\"disconnected\"", get(&events.disconnects));
    o.sample(name, "event=\"slow_consumer\"", get(&events.slow_consumer));
    let name = "fleetcast_cluster_ticks_total";
    o.family(
        name,
        "counter",
        "Cluster ticks by what happened to them: published (this node as ticker), \
         publish_failed, forwarded (to this node's sessions), missed (tick numbers skipped), \
         stale, foreign (another configuration), malformed.",
    );
    for (result, value) in [
        ("published", get(&s.cluster_ticks_published)),
        ("publish_failed", get(&s.cluster_publish_failed)),
        ("forwarded", get(&s.cluster_ticks_received)),
        ("missed", get(&s.cluster_ticks_missed)),
        ("stale", get(&s.cluster_ticks_stale)),
        ("foreign", get(&s.cluster_ticks_foreign)),
        ("malformed", get(&s.cluster_ticks_malformed)),
    ] {
        o.sample(name, &format!("result=\"{result}\""), value);
    }
    for (name, help, value) in [
        (
            "fleetcast_cluster_resyncs_total",
            "Times this node rebuilt its roster from the fleet checkpoint.",
            get(&s.cluster_resyncs),
        ),
        (
            "fleetcast_cluster_elected_total",
            "Times this node won the ticker lease.",
            get(&s.cluster_elected),
        ),
        (
            "fleetcast_cluster_checkpoint_failed_total",
            "Fleet checkpoints this node (as ticker) could not write.",
            get(&s.cluster_checkpoint_failed),
        ),
    ] {
        o.family(name, "counter", help);
        o.sample(name, "", value);
    }
}

/// Renders every metric.
pub(crate) fn render(shared: &Shared) -> String {
    let s = &shared.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut o = Out(String::with_capacity(4096));

    o.by_transport(
        "fleetcast_sessions",
        "gauge",
        "Open sessions by transport.",
        get(&s.open_webtransport),
        get(&s.open_websocket),
    );
    o.by_transport(
        "fleetcast_sessions_accepted_total",
        "counter",
        "Sessions accepted by transport.",
        get(&s.sessions_accepted),
        get(&s.ws_sessions_accepted),
    );

    o.by_transport_and_reason(
        "fleetcast_sessions_refused_total",
        "Session attempts refused, by transport and reason.",
        &[
            ("webtransport", "malformed", get(&s.refused_malformed)),
            ("webtransport", "not_found", get(&s.refused_not_found)),
            ("webtransport", "forbidden", get(&s.refused_forbidden)),
            ("webtransport", "unauthorized", get(&s.refused_unauthorized)),
            ("webtransport", "full", get(&s.refused_full)),
            ("webtransport", "handshakes_busy", get(&s.refused_busy)),
            ("webtransport", "per_ip", get(&s.refused_per_ip)),
            (
                "webtransport",
                "handshake_rate",
                get(&s.refused_handshake_rate),
            ),
            ("webtransport", "handshake_failed", get(&s.handshake_failed)),
            ("websocket", "malformed", get(&s.ws_refused_malformed)),
            ("webtransport", "reply_timeout", get(&s.reply_timeouts)),
            ("websocket", "forbidden", get(&s.ws_refused_forbidden)),
            ("websocket", "unauthorized", get(&s.ws_refused_unauthorized)),
            ("websocket", "full", get(&s.ws_refused_full)),
            ("websocket", "per_ip", get(&s.ws_refused_per_ip)),
        ],
    );
    o.by_transport_and_reason(
        "fleetcast_sessions_closed_total",
        "Sessions the server closed, by transport and reason.",
        &[
            (
                "webtransport",
                "protocol_violation",
                get(&s.closed_protocol_violation),
            ),
            ("webtransport", "slow_consumer", get(&s.closed_slow)),
            ("webtransport", "going_away", get(&s.closed_going_away)),
            (
                "websocket",
                "protocol_violation",
                get(&s.ws_closed_protocol_violation),
            ),
            ("websocket", "slow_consumer", get(&s.ws_closed_slow)),
            ("websocket", "going_away", get(&s.ws_closed_going_away)),
        ],
    );

    o.by_transport(
        "fleetcast_datagrams_sent_total",
        "counter",
        "Tick datagrams handed to the transport (WebSocket: datagram-channel messages).",
        get(&s.datagrams_sent),
        get(&s.ws_datagrams_sent),
    );
    o.by_transport(
        "fleetcast_bytes_sent_total",
        "counter",
        "Bytes of those datagrams.",
        get(&s.bytes_sent),
        get(&s.ws_bytes_sent),
    );

    o.family(
        "fleetcast_datagrams_dropped_total",
        "counter",
        "Datagrams not delivered by the server, by reason: too_large (over the session's \
         current limit), send_buffer_full (QUIC dropped the oldest queued datagram; counted when \
         the session ends).",
    );
    o.sample(
        "fleetcast_datagrams_dropped_total",
        "reason=\"too_large\"",
        get(&s.datagrams_too_large),
    );
    o.sample(
        "fleetcast_datagrams_dropped_total",
        "reason=\"send_buffer_full\"",
        get(&s.datagrams_dropped),
    );
    o.family(
        "fleetcast_ticks_skipped_total",
        "counter",
        "Ticks a lagging WebSocket session skipped to catch up with the newest.",
    );
    o.sample(
        "fleetcast_ticks_skipped_total",
        "transport=\"websocket\"",
        get(&s.ws_ticks_skipped),
    );
    o.family(
        "fleetcast_reencoded_ticks_total",
        "counter",
        "Ticks encoded again for sessions whose datagram limit is below the budget.",
    );
    o.sample(
        "fleetcast_reencoded_ticks_total",
        "",
        get(&s.reencoded_ticks),
    );

    let name = "fleetcast_udp_datagrams_total";
    o.family(
        name,
        "counter",
        "UDP datagrams the WebTransport engine sent and received (--engine proto).",
    );
    o.sample(name, "direction=\"sent\"", get(&s.udp_sent));
    o.sample(name, "direction=\"received\"", get(&s.udp_received));
    let name = "fleetcast_packets_forwarded_total";
    o.family(
        name,
        "counter",
        "Packets a shard received for another shard's connection (the client's address changed), \
         by result: forwarded to the owning shard, or dropped (its queue was full).",
    );
    o.sample(name, "result=\"forwarded\"", get(&s.packets_forwarded));
    o.sample(name, "result=\"dropped\"", get(&s.packets_forward_dropped));

    o.family("fleetcast_ticks_total", "counter", "Ticks produced.");
    o.sample("fleetcast_ticks_total", "", get(&s.ticks));
    o.family("fleetcast_cars", "gauge", "Cars in the newest tick.");
    o.sample("fleetcast_cars", "", shared.latest.borrow().cars.len());
    o.family(
        "fleetcast_snapshot_bytes",
        "gauge",
        "Encoded size of the newest tick (all its datagram payloads, encoded once).",
    );
    o.sample("fleetcast_snapshot_bytes", "", get(&s.snapshot_bytes));
    o.family(
        "fleetcast_snapshot_datagrams",
        "gauge",
        "Datagrams in the newest tick.",
    );
    o.sample(
        "fleetcast_snapshot_datagrams",
        "",
        get(&s.snapshot_datagrams),
    );

    let name = "fleetcast_ingest_fixes_total";
    o.family(
        name,
        "counter",
        "Fixes from publishers, by result (accepted into the fleet, or rejected with a reason).",
    );
    o.sample(name, "result=\"accepted\"", get(&s.ingest_fixes_accepted));
    o.sample(name, "result=\"rejected\"", get(&s.ingest_fixes_rejected));
    let name = "fleetcast_ingest_batches_total";
    o.family(
        name,
        "counter",
        "Ingest requests and streaming batches, by outcome.",
    );
    for (outcome, value) in [
        ("parsed", get(&s.ingest_batches)),
        ("unauthorized", get(&s.ingest_refused_unauthorized)),
        ("rate_limited", get(&s.ingest_refused_rate)),
        ("malformed", get(&s.ingest_refused_malformed)),
        ("too_large", get(&s.ingest_refused_too_large)),
        ("unavailable", get(&s.ingest_refused_unavailable)),
    ] {
        o.sample(name, &format!("outcome=\"{outcome}\""), value);
    }
    o.family(
        "fleetcast_ingest_streams_total",
        "counter",
        "Streaming publisher connections accepted.",
    );
    o.sample(
        "fleetcast_ingest_streams_total",
        "",
        get(&s.ingest_streams_accepted),
    );
    let name = "fleetcast_cars_removed_total";
    o.family(name, "counter", "Publishers' cars removed, by reason.");
    o.sample(name, "reason=\"deleted\"", get(&s.ingest_cars_removed));
    o.sample(name, "reason=\"timeout\"", get(&s.ingest_cars_expired));

    o.family(
        "fleetcast_http_connections",
        "gauge",
        "TCP connections open on the HTTP port, WebSocket sessions included.",
    );
    o.sample(
        "fleetcast_http_connections",
        "",
        get(&s.open_http_connections),
    );
    let name = "fleetcast_http_connections_dropped_total";
    o.family(
        name,
        "counter",
        "HTTP connections closed or refused by the server's limits, by reason.",
    );
    o.sample(
        name,
        "reason=\"header_timeout\"",
        get(&s.http_header_timeouts),
    );
    o.sample(name, "reason=\"per_ip\"", get(&s.http_refused_per_ip));
    o.sample(name, "reason=\"no_fd\"", get(&s.http_refused_no_fd));
    o.family(
        "fleetcast_http_accept_errors_total",
        "counter",
        "Failed accepts on the HTTP listener (out of file descriptors, mostly).",
    );
    o.sample(
        "fleetcast_http_accept_errors_total",
        "",
        get(&s.http_accept_errors),
    );

    if let Some(cluster) = &shared.cluster {
        cluster_metrics(&mut o, shared, cluster);
    }

    let name = "fleetcast_tick_fanout_seconds";
    o.family(
        name,
        "histogram",
        "Time to hand one tick to every WebTransport session.",
    );
    let (buckets, count, sum) = s.fanout_seconds.cumulative();
    for (le, n) in buckets {
        o.sample(&format!("{name}_bucket"), &format!("le=\"{le}\""), n);
    }
    o.sample(&format!("{name}_bucket"), "le=\"+Inf\"", count);
    o.sample(&format!("{name}_sum"), "", sum);
    o.sample(&format!("{name}_count"), "", count);

    // Every task of the server's main runtime: session tasks, QUIC connection drivers, HTTP
    // and WebSocket connections. A count that keeps growing while sessions do not is a leak.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        o.family(
            "tokio_alive_tasks",
            "gauge",
            "Tasks alive in the server's main runtime (the tick loop's runtime not included).",
        );
        o.sample("tokio_alive_tasks", "", runtime.metrics().num_alive_tasks());
    }

    if let Some(p) = ProcessStats::read() {
        o.family(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the server process.",
        );
        o.sample("process_cpu_seconds_total", "", p.cpu_seconds);
        o.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident set size.",
        );
        o.sample("process_resident_memory_bytes", "", p.rss_bytes);
        o.family("process_open_fds", "gauge", "Open file descriptors.");
        o.sample("process_open_fds", "", p.open_fds);
    }
    o.0
}

/// CPU time and memory of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Open file descriptors.
    pub open_fds: usize,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` where it does not exist.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
        Some(Self {
            cpu_seconds: cpu_seconds(&stat)?,
            rss_bytes: rss_bytes(&status)?,
            open_fds,
        })
    }
}

/// utime + stime (fields 14 and 15 of `/proc/PID/stat`), in seconds.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so utime (14) and stime (15) are at indexes 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// `VmRSS` from `/proc/PID/status`, in bytes.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_parses_a_name_with_spaces() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
    }

    #[test]
    fn rss_bytes_reads_kilobytes() {
        assert_eq!(
            rss_bytes("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(rss_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn process_stats_read_this_process() {
        let p = ProcessStats::read().expect("Linux /proc");
        assert!(p.rss_bytes > 1024 * 1024);
        assert!(p.open_fds >= 3);
    }
}
