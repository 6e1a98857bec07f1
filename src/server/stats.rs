//! Server counters, shared lock-free between the tick loop, the sessions and the HTTP side.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters since the server started (and a few gauges, marked as such).
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Time to hand one tick to every WebTransport session.
            pub fanout_seconds: Histogram,
        }

        impl Stats {
            /// Every counter with its name, for `/healthz` and tests.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Gauge: WebTransport sessions open now.
    open_webtransport,
    /// Gauge: WebSocket sessions open now.
    open_websocket,
    /// Gauge: TCP connections open now on the HTTP port (WebSocket sessions included).
    open_http_connections,
    /// Gauge: bytes of the newest tick's datagrams (one encoding, without per-session headers).
    snapshot_bytes,
    /// Gauge: datagrams the newest tick was split into.
    snapshot_datagrams,
    /// Datagrams queued for a session but dropped by QUIC before sending (its datagram send
    /// buffer was full: the session could not keep up). Counted when the session ends.
    datagrams_dropped,
    /// Certificates switched to while running (self-signed renewed, CA-issued reloaded).
    cert_rotations,
    /// Changed --cert/--key files that could not be loaded (the old pair kept serving).
    cert_reload_failed,
    /// Ticks encoded and fanned out.
    ticks,
    /// WebTransport sessions accepted.
    sessions_accepted,
    /// Session requests refused with 400 (malformed: an upper-case header name).
    refused_malformed,
    /// WebSocket upgrades refused with 400 (a malformed Sec-WebSocket-Key).
    ws_refused_malformed,
    /// Sessions refused with 404 (wrong path).
    refused_not_found,
    /// Sessions refused with 403 (origin not allowed).
    refused_forbidden,
    /// Sessions refused with 401 (subscriber token missing, invalid or expired).
    refused_unauthorized,
    /// Sessions refused with 429 (--max-sessions reached).
    refused_full,
    /// Connection attempts refused because --max-handshakes were in progress.
    refused_busy,
    /// Sessions refused with 429 because their address holds --max-sessions-per-ip.
    refused_per_ip,
    /// Connection attempts refused because their address exceeded --handshakes-per-ip.
    refused_handshake_rate,
    /// Connection attempts answered with a QUIC Retry (address validation) before any
    /// handshake work.
    handshakes_retried,
    /// WebSocket upgrades refused with 429 because their address holds --max-sessions-per-ip.
    ws_refused_per_ip,
    /// Handshakes that failed or did not send CONNECT within --handshake-timeout.
    handshake_failed,
    /// Answers to session requests (accept, 401, 403, 404, 429) the client did not take within
    /// --write-timeout; its connection was dropped.
    reply_timeouts,
    /// Sessions closed for sending what protocol v1 forbids.
    closed_protocol_violation,
    /// Sessions closed for not reading the reliable stream in time.
    closed_slow,
    /// Sessions closed at shutdown.
    closed_going_away,
    /// Ingest requests answered 503: in a cluster, no ticker or no NATS to apply them.
    ingest_refused_unavailable,
    /// Cluster (`--nats`): ticks this node published as the ticker.
    cluster_ticks_published,
    /// Cluster: ticks the ticker could not publish to NATS.
    cluster_publish_failed,
    /// Cluster: fleet checkpoints the ticker could not write.
    cluster_checkpoint_failed,
    /// Cluster: ticks received from NATS and forwarded to this node's sessions.
    cluster_ticks_received,
    /// Cluster: tick numbers skipped between forwarded ticks (lost on NATS, a slow
    /// consumer, or no ticker for a while).
    cluster_ticks_missed,
    /// Cluster: ticks not newer than the newest forwarded one, dropped.
    cluster_ticks_stale,
    /// Cluster: ticks from a node with another configuration, dropped.
    cluster_ticks_foreign,
    /// Cluster: tick messages that did not decode, dropped.
    cluster_ticks_malformed,
    /// Cluster: times this node rebuilt its roster from the checkpoint (it joined, or roster
    /// events were lost).
    cluster_resyncs,
    /// Cluster: times this node won the ticker lease.
    cluster_elected,
    /// UDP datagrams the engine's shards sent (QUIC packets, coalesced ones counted once).
    udp_sent,
    /// UDP datagrams the engine's shards received.
    udp_received,
    /// Packets a shard received for a connection of another shard (the client's address
    /// changed: NAT rebinding, migration) and handed to it (`--engine proto`).
    packets_forwarded,
    /// Packets for another shard dropped because its queue was full.
    packets_forward_dropped,
    /// Datagrams handed to QUIC.
    datagrams_sent,
    /// Payload bytes of those datagrams (with the WebTransport header).
    bytes_sent,
    /// Datagrams refused by QUIC as too large for the session's current limit.
    datagrams_too_large,
    /// Ticks re-encoded for a session whose datagram limit is below --datagram-budget.
    reencoded_ticks,
    /// WebSocket sessions accepted (`/positions.ws`).
    ws_sessions_accepted,
    /// WebSocket upgrades refused with 403 (origin not allowed).
    ws_refused_forbidden,
    /// WebSocket upgrades refused with 401 (subscriber token missing, invalid or expired).
    ws_refused_unauthorized,
    /// WebSocket upgrades refused with 429 (--max-sessions reached).
    ws_refused_full,
    /// WebSocket sessions closed (1008) for sending anything but ping, pong or close.
    ws_closed_protocol_violation,
    /// WebSocket sessions dropped for not reading within --write-timeout.
    ws_closed_slow,
    /// WebSocket sessions closed (1001) at shutdown.
    ws_closed_going_away,
    /// Datagram-channel messages sent to WebSocket sessions.
    ws_datagrams_sent,
    /// Bytes of those messages (with the channel byte).
    ws_bytes_sent,
    /// Ticks a lagging WebSocket session skipped to catch up with the newest.
    ws_ticks_skipped,
    /// Ingest requests (`POST /v1/positions`) and streaming batches that were parsed.
    ingest_batches,
    /// Fixes accepted into the fleet state.
    ingest_fixes_accepted,
    /// Fixes rejected, each with its reason in the reply.
    ingest_fixes_rejected,
    /// Ingest requests refused with 401 (no or wrong token).
    ingest_refused_unauthorized,
    /// Ingest requests refused with 429 (the token's rate limit).
    ingest_refused_rate,
    /// Ingest requests or batches refused as malformed JSON (400).
    ingest_refused_malformed,
    /// Ingest requests or batches refused as larger than --max-ingest-body (413).
    ingest_refused_too_large,
    /// Streaming publisher connections accepted (`/v1/publish.ws`).
    ingest_streams_accepted,
    /// Cars removed with `DELETE /v1/cars/{id}`.
    ingest_cars_removed,
    /// Cars removed after --car-timeout without a fix.
    ingest_cars_expired,
    /// HTTP connections closed for sending no complete request header within
    /// --http-header-timeout (half-sent headers, or idle between requests).
    http_header_timeouts,
    /// HTTP connections refused (429, closed) because their address had
    /// --max-http-conns-per-ip open.
    http_refused_per_ip,
    /// Failed accepts on the HTTP listener other than clients giving up (out of file
    /// descriptors, mostly).
    http_accept_errors,
    /// HTTP connections accepted on the spare descriptor only to be refused (503) because the
    /// process had no file descriptor left.
    http_refused_no_fd,
}

/// Upper bounds of the fan-out histogram's buckets, seconds.
pub const FANOUT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A fixed-bucket histogram of durations, lock-free, in Prometheus' cumulative form on output.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; FANOUT_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = FANOUT_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Cumulative counts per bucket bound, the total count and the sum in seconds.
    pub fn cumulative(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let buckets = FANOUT_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| {
                acc += c.load(Ordering::Relaxed);
                (b, acc)
            })
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (buckets, count, sum)
    }
}

/// Holds a gauge one higher while alive.
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads one counter by name (tests and tools).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_is_cumulative_and_sums() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(5));
        let (buckets, count, sum) = h.cumulative();
        assert_eq!(count, 3);
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets[5], (0.005, 2));
        assert_eq!(buckets.last().unwrap().1, 2, "5 s is only in +Inf");
        assert!((sum - 5.00305).abs() < 1e-6);
    }

    #[test]
    fn gauge_guard_counts_while_alive() {
        let g = AtomicU64::new(0);
        {
            let _a = GaugeGuard::new(&g);
            let _b = GaugeGuard::new(&g);
            assert_eq!(g.load(Ordering::Relaxed), 2);
        }
        assert_eq!(g.load(Ordering::Relaxed), 0);
    }
}
