//! `fleetcast swarm`: a load generator that opens many sessions and measures what they receive.
//!
//! Two WebTransport engines open the sessions. `--engine proto` (the default, `swarm/engine.rs`)
//! drives quinn-proto from one thread per `--engine-threads`, thousands of sessions per thread,
//! with the HTTP/3 side in `swarm/h3.rs`; `--engine wtransport` runs a tokio task per session on
//! wtransport. Either spreads its sessions over several client endpoints (one UDP socket each,
//! `--sessions-per-endpoint`), because one socket (for wtransport, its single receive task)
//! drops datagrams at thousands of sessions. Both fill the same records, so every option and
//! report works on both.
//! Connecting is bounded in rate and concurrency. Once every session has connected (or
//! the connect phase timed out) a measurement window of `--duration` starts; each session
//! records the ticks whose server time falls in that window, and the report compares what
//! arrived with what the server sent: every connected session should get every part of every
//! tick.
//!
//! Two more modes for long runs (issue 8): `--reconnect` opens a lost session again after a
//! jittered backoff (the web demo's schedule, [`crate::backoff`]) and reports how long it took
//! until every session was back; `--churn-per-s N` closes the oldest N sessions a second through
//! the window and opens as many new ones. Sessions that do not connect are counted by reason
//! ([`ConnectFailure`]).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};
use wtransport::endpoint::endpoint_side;
use wtransport::Endpoint;

use crate::backoff::{Backoff, Jitter};

mod engine;
mod h3;
use crate::client::{self, ClientOptions, ConnectArgs, Event, Trust};
use crate::proto::wire::{
    FrameDecoder, StreamMessage, TickHeader, WS_CHANNEL_DATAGRAM, WS_CHANNEL_STREAM,
};
use crate::server::config::{parse_bytes, parse_duration};
use crate::server::now_us;
use crate::watch::LatencyHistogram;

/// Which transport the swarm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebTransport sessions (datagrams).
    Webtransport,
    /// The WebSocket fallback (newest tick only).
    Websocket,
}

/// Which client drives the WebTransport sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// wtransport (on quinn): a tokio task per session, a client endpoint per
    /// `--sessions-per-endpoint` sessions. (`quinn` is accepted too, as in `serve --engine`.)
    #[value(alias = "quinn")]
    Wtransport,
    /// quinn-proto driven directly: one thread per `--engine-threads` holds thousands of
    /// sessions, packets read and sent in batches.
    Proto,
}

/// `fleetcast swarm` options.
#[derive(Debug, Clone, Args)]
pub struct SwarmArgs {
    /// Server and trust.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// WebSocket URL for `--transport websocket`; default `ws://HOST:PORT/positions.ws` on the
    /// host and port of the certificate hash URL.
    #[arg(long, env = "FLEETCAST_WS_URL")]
    pub ws_url: Option<String>,

    /// Transport to load.
    #[arg(long, value_enum, default_value = "webtransport")]
    pub transport: Transport,

    /// WebTransport client: `proto` (quinn-proto driven from `--engine-threads` threads; about
    /// half the CPU and a third of the memory per session) or `wtransport` (a tokio task per
    /// session, the client `fleetcast watch` uses). WebSocket sessions ignore it.
    #[arg(
        long,
        value_enum,
        default_value = "proto",
        env = "FLEETCAST_SWARM_ENGINE"
    )]
    pub engine: Engine,

    /// Threads of `--engine proto`, each holding its share of the sessions.
    #[arg(long, default_value_t = 1)]
    pub engine_threads: usize,

    /// Sessions to open.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,

    /// Sessions per client endpoint (UDP socket); default 500 with `--engine wtransport`,
    /// 1000 with `--engine proto`.
    #[arg(long)]
    pub sessions_per_endpoint: Option<usize>,

    /// Connection attempts in flight at most.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,

    /// New connection attempts per second at most.
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,

    /// Give up connecting the rest after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Measured time once the sessions are connected.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    /// UDP buffer per client endpoint.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    pub udp_buffer: usize,

    /// The server's Prometheus endpoint, read before connecting and around the window to
    /// report server CPU per datagram and memory per session; default `http://HOST:PORT/metrics`
    /// on the certificate hash URL's host and port. `none` skips it.
    #[arg(long, env = "FLEETCAST_METRICS_URL")]
    pub metrics_url: Option<String>,

    /// Open a session again when it is lost (the server went away or closed it), after a
    /// backoff with jitter like the web demo's; the report says when all were back.
    #[arg(long)]
    pub reconnect: bool,

    /// First reconnect window after a lost session; it doubles with every failed attempt.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub reconnect_base: Duration,

    /// Largest reconnect window.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub reconnect_cap: Duration,

    /// How the wait is drawn from the window: `full` (anywhere in it: the web demo's schedule)
    /// or `equal` (its second half: the web demo before issue 8, for comparison).
    #[arg(long, value_enum, default_value = "full")]
    pub reconnect_jitter: Jitter,

    /// With --reconnect or --churn-per-s: an attempt without the initial state after this long
    /// counts as failed ("timeout") and is given up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub attempt_timeout: Duration,

    /// Churn: through the window, close this many sessions a second (the oldest first) and open
    /// as many new ones, so --sessions stay open. 0 is off.
    #[arg(long, default_value_t = 0.0)]
    pub churn_per_s: f64,

    /// Print one JSON object on stdout instead of a text summary.
    #[arg(long)]
    pub json: bool,
}

impl SwarmArgs {
    /// The WebSocket URL, with `?token=...` when a token is given.
    fn ws_url(&self) -> String {
        let url = match &self.ws_url {
            Some(u) => u.clone(),
            None => format!("ws://{}/positions.ws", self.connect.http_authority()),
        };
        client::with_token(&url, self.connect.token.as_deref())
    }

    /// The reconnect schedule.
    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.reconnect_base,
            cap: self.reconnect_cap.max(self.reconnect_base),
            jitter: self.reconnect_jitter,
        }
    }

    /// Sessions per client endpoint, the engine's default unless given.
    fn sessions_per_endpoint(&self) -> usize {
        self.sessions_per_endpoint
            .unwrap_or(match self.engine {
                Engine::Wtransport => 500,
                Engine::Proto => 1000,
            })
            .max(1)
    }

    /// Whether attempts after the connect phase are bounded by --attempt-timeout.
    fn timed_attempts(&self) -> bool {
        self.reconnect || self.churn_per_s > 0.0
    }

    fn metrics_url(&self) -> Option<String> {
        match self.metrics_url.as_deref() {
            Some("none") => None,
            Some(u) => Some(u.to_string()),
            None => Some(format!("http://{}/metrics", self.connect.http_authority())),
        }
    }
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct SwarmLatency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// What `fleetcast swarm --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmReport {
    /// Transport used.
    pub transport: Transport,
    /// WebTransport client engine (none for WebSocket).
    pub engine: Option<Engine>,
    /// Sessions asked for.
    pub sessions_requested: usize,
    /// Sessions open when the measurement started.
    pub sessions_connected: usize,
    /// Sessions that did not connect in the connect phase (failed, or not done in time).
    pub connect_failures: usize,
    /// The same sessions by reason ([`ConnectFailure`]), e.g. `{"refused 429": 3}`.
    pub connect_failures_by_reason: BTreeMap<String, usize>,
    /// Time from the first attempt until every session was open (or the connect phase ended).
    pub connect_seconds: f64,
    /// Sessions that ended during the measurement.
    pub sessions_lost: usize,
    /// Length of the measurement window, seconds.
    pub duration_seconds: f64,
    /// Ticks the server sent during the window (seen by at least one session).
    pub ticks: usize,
    /// Ticks the window should hold at the server's nominal tick rate (from its Hello); more
    /// than `ticks` when the server could not keep its rate. Delivery counts against these.
    pub ticks_expected: u64,
    /// Datagram parts per tick (the largest seen).
    pub parts_per_tick: u16,
    /// Parts received / (parts sent × sessions connected), over the window.
    pub delivery_ratio: f64,
    /// (session, tick) pairs with every part received.
    pub ticks_complete: u64,
    /// (session, tick) pairs with some parts lost.
    pub ticks_partial: u64,
    /// (session, tick) pairs with every part lost.
    pub ticks_missed: u64,
    /// Datagrams received in the window.
    pub datagrams: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Tick-to-receipt latency (receive time minus the tick's server time).
    pub latency_ms: SwarmLatency,
    /// Age of the newest position each session held, sampled about every 100 ms (at times out
    /// of phase with the tick) over the window: sample time minus the newest received tick's
    /// server time.
    pub position_age_ms: SwarmLatency,
    /// Server figures from its `/metrics`, when reachable.
    pub server: Option<ServerFigures>,
    /// The load generator's own CPU and memory over the window (the whole `swarm` process:
    /// it includes an in-process server when a test runs one).
    pub load_generator: Option<LoadFigures>,
    /// Attempts after the connect phase (reconnects, churn) that failed, by reason.
    pub attempts_failed_by_reason: BTreeMap<String, usize>,
    /// With `--reconnect`: sessions lost and how long until all were back.
    pub reconnect: Option<ReconnectReport>,
    /// With `--churn-per-s`: sessions closed and opened through the window.
    pub churn: Option<ChurnReport>,
}

/// What `--reconnect` saw.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReconnectReport {
    /// The schedule's jitter.
    pub jitter: Option<Jitter>,
    /// First window and cap of the schedule, milliseconds.
    pub base_ms: u64,
    /// Largest window, milliseconds.
    pub cap_ms: u64,
    /// Times a connected session was lost.
    pub losses: u64,
    /// Times a lost session connected again.
    pub reconnects: u64,
    /// Attempts made to reconnect (failed ones included).
    pub attempts: u64,
    /// Unix time of the first loss, milliseconds.
    pub first_loss_unix_ms: Option<u64>,
    /// Unix time at which every lost session was back (the last time none was down).
    pub all_back_unix_ms: Option<u64>,
    /// From the first loss until all were back, seconds (none: not all came back).
    pub recovery_seconds: Option<f64>,
    /// Sessions still down when the run ended.
    pub still_down: usize,
    /// Per session, from its loss until it was back, milliseconds.
    pub down_ms: SwarmLatency,
}

/// What `--churn-per-s` did.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ChurnReport {
    /// The rate asked for.
    pub per_s: f64,
    /// Sessions closed by the churn (each replaced by a new one).
    pub sessions_closed: u64,
    /// New sessions that connected.
    pub sessions_opened: u64,
}

/// Why a session attempt did not get as far as the initial state: a short, stable key to
/// count attempts by (`fleetcast swarm` prints the counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Still connecting when --connect-timeout (or --attempt-timeout) passed.
    Timeout,
    /// The server refused the session with this HTTP status (none: it stopped the request
    /// without one).
    Refused(Option<u16>),
    /// QUIC, TLS or HTTP/3 failed before the session opened.
    Handshake(String),
    /// The session opened, then ended before its initial state arrived.
    EndedEarly(String),
    /// Anything else (a WebSocket I/O error, a bad URL).
    Other(String),
}

impl ConnectFailure {
    /// Sorts a connect error into a reason.
    pub fn classify(e: &anyhow::Error) -> Self {
        if let Some(refused) = e.downcast_ref::<client::Refused>() {
            return Self::Refused(refused.status);
        }
        if let Some(e) = e.downcast_ref::<wtransport::error::ConnectingError>() {
            return match e {
                wtransport::error::ConnectingError::ConnectionError(e) => {
                    Self::Handshake(short(&e.to_string()))
                }
                wtransport::error::ConnectingError::SessionRejected { status } => {
                    Self::Refused(*status)
                }
                other => Self::Other(short(&other.to_string())),
            };
        }
        if let Some(tokio_tungstenite::tungstenite::Error::Http(response)) =
            e.downcast_ref::<tokio_tungstenite::tungstenite::Error>()
        {
            return Self::Refused(Some(response.status().as_u16()));
        }
        Self::Other(short(&e.root_cause().to_string()))
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("timeout"),
            Self::Refused(Some(status)) => write!(f, "refused {status}"),
            Self::Refused(None) => f.write_str("refused (no status)"),
            Self::Handshake(e) => write!(f, "handshake: {e}"),
            Self::EndedEarly(e) => write!(f, "ended before the initial state: {e}"),
            Self::Other(e) => write!(f, "{e}"),
        }
    }
}

/// The first line of an error message, at most 100 characters, so reasons stay countable.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    match line.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// What the server's `/metrics` said over the measurement window.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ServerFigures {
    /// Server CPU (user + system) during the window, seconds.
    pub cpu_seconds: f64,
    /// Server CPU per datagram the sessions received in the window, microseconds.
    pub cpu_us_per_delivered_datagram: f64,
    /// Server resident memory at the end of the window, bytes.
    pub rss_bytes: u64,
    /// Server resident memory before the swarm connected, bytes.
    pub rss_before_bytes: u64,
    /// (RSS at the end − RSS before) / sessions connected, bytes.
    pub rss_per_session_bytes: f64,
}

/// The load generator's own cost over the measurement window.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct LoadFigures {
    /// CPU (user + system) of this process during the window, seconds.
    pub cpu_seconds: f64,
    /// That CPU per datagram the sessions received in the window, microseconds.
    pub cpu_us_per_delivered_datagram: f64,
    /// Resident memory at the end of the window, bytes.
    pub rss_bytes: u64,
    /// Resident memory per session connected, bytes (everything the process holds).
    pub rss_per_session_bytes: f64,
}

/// This process's CPU time (user + system) so far, seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// This process's resident memory, bytes (0 where /proc is missing).
fn own_rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// Reads one unlabelled sample from Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(url: &Option<String>) -> Option<(f64, f64)> {
    let url = url.as_ref()?;
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    Some((
        metric(&text, "process_cpu_seconds_total")?,
        metric(&text, "process_resident_memory_bytes")?,
    ))
}

impl SwarmReport {
    /// A readable multi-line summary.
    pub fn summary(&self) -> String {
        let mut text = String::new();
        if let Some(warning) = self.incomplete() {
            text += &format!("WARNING            {warning}\n");
        }
        text += &self.measured_summary();
        let reasons = |map: &BTreeMap<String, usize>| {
            map.iter()
                .map(|(reason, n)| format!("{n} {reason}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.connect_failures_by_reason.is_empty() {
            text += &format!(
                "\nconnect failures   {}",
                reasons(&self.connect_failures_by_reason)
            );
        }
        if let Some(r) = &self.reconnect {
            text += &format!(
                "\nreconnect          {} lost, {} back after {} attempts, {} still down; all back {}; \
                 down ms p50 {:.0}  p99 {:.0}  max {:.0}",
                r.losses,
                r.reconnects,
                r.attempts,
                r.still_down,
                match r.recovery_seconds {
                    Some(s) => format!("{s:.2} s after the first loss"),
                    None => "never".to_string(),
                },
                r.down_ms.p50,
                r.down_ms.p99,
                r.down_ms.max,
            );
        }
        if let Some(c) = &self.churn {
            text += &format!(
                "\nchurn              {} closed, {} opened ({}/s asked)",
                c.sessions_closed, c.sessions_opened, c.per_s
            );
        }
        if !self.attempts_failed_by_reason.is_empty() {
            text += &format!(
                "\nlater attempts     failed: {}",
                reasons(&self.attempts_failed_by_reason)
            );
        }
        text
    }

    /// Says so when sessions did not connect or were lost in the window: the delivery ratio
    /// leaves out sessions that never connected, so a run must not look complete without them.
    pub fn incomplete(&self) -> Option<String> {
        if self.sessions_connected >= self.sessions_requested && self.sessions_lost == 0 {
            return None;
        }
        Some(format!(
            "only {} of {} sessions connected ({} failed; they are not in the delivery ratio), \
             {} lost during the run",
            self.sessions_connected,
            self.sessions_requested,
            self.connect_failures,
            self.sessions_lost
        ))
    }

    fn measured_summary(&self) -> String {
        format!(
            "transport          {:?}\n\
             sessions           {} connected of {} ({} failed, {} lost during the run)\n\
             connect time       {:.1} s\n\
             window             {:.1} s, {} of {} expected ticks × {} part(s)\n\
             delivery ratio     {:.5}\n\
             session-ticks      {} complete, {} partial, {} missed\n\
             latency ms         p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
             position age ms    p50 {:.1}  p99 {:.1}  max {:.1}\n\
             received           {} datagrams, {} bytes{}",
            self.transport,
            self.sessions_connected,
            self.sessions_requested,
            self.connect_failures,
            self.sessions_lost,
            self.connect_seconds,
            self.duration_seconds,
            self.ticks,
            self.ticks_expected,
            self.parts_per_tick,
            self.delivery_ratio,
            self.ticks_complete,
            self.ticks_partial,
            self.ticks_missed,
            self.latency_ms.p50,
            self.latency_ms.p99,
            self.latency_ms.p999,
            self.latency_ms.max,
            self.position_age_ms.p50,
            self.position_age_ms.p99,
            self.position_age_ms.max,
            self.datagrams,
            self.bytes,
            match &self.server {
                Some(s) => format!(
                    "\nserver             {:.2} CPU s in the window, {:.2} us per delivered datagram, \
                     RSS {:.1} MB ({:.1} KB per session)",
                    s.cpu_seconds,
                    s.cpu_us_per_delivered_datagram,
                    s.rss_bytes as f64 / 1e6,
                    s.rss_per_session_bytes / 1e3
                ),
                None => String::new(),
            }
        ) + &match &self.load_generator {
            Some(l) => format!(
                "\nswarm ({})  {:.2} CPU s in the window, {:.2} us per delivered datagram, \
                 RSS {:.1} MB ({:.1} KB per session)",
                self.engine.map_or("websocket".into(), |e| format!("{e:?}").to_lowercase()),
                l.cpu_seconds,
                l.cpu_us_per_delivered_datagram,
                l.rss_bytes as f64 / 1e6,
                l.rss_per_session_bytes / 1e3
            ),
            None => String::new(),
        }
    }
}

/// The measurement window in server microseconds; 0 until the connect phase ends.
#[derive(Default)]
struct Window {
    start_us: AtomicU64,
    end_us: AtomicU64,
}

impl Window {
    fn contains(&self, time_us: u64) -> bool {
        let start = self.start_us.load(Ordering::Relaxed);
        start != 0 && time_us >= start && time_us < self.end_us.load(Ordering::Relaxed)
    }
}

/// What one session received inside the window.
struct Record {
    /// (tick's server time, part, parts) per datagram: the time, not the tick number, names a
    /// tick, because a restarted server counts its ticks from 1 again.
    parts: Vec<(u64, u16, u16)>,
    /// Latency per datagram, microseconds.
    latency_us: Vec<u64>,
    /// Server time of each datagram's tick.
    tick_time_us: Vec<u64>,
    bytes: u64,
    /// The session ended before the swarm closed it.
    lost: bool,
    /// Ticks from this time on count for this session (its first initial state), µs.
    from_us: u64,
    /// Ticks before this time count for it: the churn closed it then (else `u64::MAX`).
    to_us: u64,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            parts: Vec::new(),
            latency_us: Vec::new(),
            tick_time_us: Vec::new(),
            bytes: 0,
            lost: false,
            from_us: 0,
            to_us: u64::MAX,
        }
    }
}

impl Record {
    /// Whether a tick of this time should have reached the session: during its life, and
    /// not in the last second before the churn closed it (those may still be in flight).
    fn expects(&self, time_us: u64) -> bool {
        time_us >= self.from_us && time_us.saturating_add(1_000_000) <= self.to_us
    }

    fn datagram(&mut self, header: TickHeader, len: usize, window: &Window) {
        if window.contains(header.time_us) {
            self.parts.push((header.time_us, header.part, header.parts));
            self.latency_us
                .push(now_us().saturating_sub(header.time_us));
            self.tick_time_us.push(header.time_us);
            self.bytes += len as u64;
        }
    }
}

/// Shared state of a swarm run.
struct Run {
    args: SwarmArgs,
    /// Session URLs (one per node; tokens included): session `i` starts at `i % len` and
    /// moves to the next each time an attempt fails or its session is lost.
    targets: Vec<String>,
    /// Sessions handed a first target so far.
    next_target: AtomicUsize,
    window: Window,
    /// The server's nominal tick interval from its Hello, microseconds (0 until known).
    tick_interval_us: AtomicU64,
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Sessions the connect phase started (the proto engine counts them here).
    started: AtomicUsize,
    /// Failed attempts by reason, over the whole run.
    failures: Mutex<BTreeMap<String, usize>>,
    recovery: Mutex<Recovery>,
    /// Sessions opened by the churn that connected.
    churn_opened: AtomicU64,
    /// Sessions the proto engine's churn closed.
    churn_closed: AtomicU64,
    records: Mutex<Vec<Record>>,
    stop: tokio_util::sync::CancellationToken,
}

/// Losses and returns under `--reconnect`.
#[derive(Default)]
struct Recovery {
    /// Sessions lost and not back yet.
    down: usize,
    losses: u64,
    reconnects: u64,
    attempts: u64,
    first_loss_unix_ms: Option<u64>,
    all_back_unix_ms: Option<u64>,
    down_us: LatencyHistogram,
}

impl Run {
    fn note_failure(&self, reason: &ConnectFailure) {
        *self
            .failures
            .lock()
            .expect("failures lock")
            .entry(reason.to_string())
            .or_default() += 1;
    }

    fn note_loss(&self) {
        let mut r = self.recovery.lock().expect("recovery lock");
        r.down += 1;
        r.losses += 1;
        r.first_loss_unix_ms.get_or_insert(now_us() / 1000);
    }

    fn note_back(&self, down_for: Duration) {
        let mut r = self.recovery.lock().expect("recovery lock");
        r.down = r.down.saturating_sub(1);
        r.reconnects += 1;
        r.down_us.record(down_for.as_micros() as u64);
        if r.down == 0 {
            r.all_back_unix_ms = Some(now_us() / 1000);
        }
    }

    fn note_hello(&self, hello: &crate::proto::wire::Hello) {
        self.tick_interval_us
            .store(u64::from(hello.tick_interval_ms) * 1000, Ordering::Relaxed);
    }
}

/// Runs the swarm and returns its report.
pub async fn run(args: SwarmArgs) -> Result<SwarmReport> {
    if args.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    if !(args.churn_per_s.is_finite() && args.churn_per_s >= 0.0) {
        bail!("--churn-per-s must be a rate of 0 or more");
    }
    // The engine is the WebTransport client's: WebSocket sessions are tokio tasks either way.
    let proto_engine = args.engine == Engine::Proto && args.transport == Transport::Webtransport;
    if args.engine_threads == 0 {
        bail!("--engine-threads must be at least 1");
    }
    let (targets, trust) = match args.transport {
        // The WebSocket fallback is plain ws:// (or TLS through a proxy's own certificate).
        Transport::Websocket => (vec![args.ws_url()], Trust::SystemRoots),
        Transport::Webtransport => client::every_target(&args.connect).await?,
    };
    let run = Arc::new(Run {
        targets,
        next_target: AtomicUsize::new(0),
        window: Window::default(),
        tick_interval_us: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        started: AtomicUsize::new(0),
        failures: Mutex::default(),
        recovery: Mutex::default(),
        churn_opened: AtomicU64::new(0),
        churn_closed: AtomicU64::new(0),
        records: Mutex::new(Vec::with_capacity(args.sessions)),
        stop: tokio_util::sync::CancellationToken::new(),
        args,
    });
    let args = &run.args;

    let mut endpoints = Vec::new();
    if args.transport == Transport::Webtransport && !proto_engine {
        let count = args.sessions.div_ceil(args.sessions_per_endpoint());
        let mut options = ClientOptions::new(trust.clone());
        options.udp_buffer = Some(args.udp_buffer);
        // Enough for a few ticks of a large fleet, small enough for thousands of sessions.
        options.datagram_buffer = 64 * 1024;
        for _ in 0..count {
            endpoints.push(Arc::new(client::endpoint(&options)?));
        }
    }
    let endpoint_of = |i: usize| endpoints.get(i / args.sessions_per_endpoint()).cloned();

    let metrics_url = args.metrics_url();
    let before = scrape(&metrics_url).await;
    if metrics_url.is_some() && before.is_none() {
        warn!("cannot read the server's metrics; server figures are left out");
    }
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut pace = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(args.connect_rate.max(1)),
    ));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let progress = Progress::new(args.sessions);
    let mut tasks = tokio::task::JoinSet::new();
    // One stop token per session slot, so the churn can close one session.
    let mut slots = Vec::with_capacity(args.sessions);
    let connect_deadline = started + args.connect_timeout;
    let mut engine_threads = Vec::new();
    if proto_engine {
        // The engine threads pace their own connect phase; wait for it like for the tasks.
        engine_threads = engine::spawn(&run, trust, connect_deadline.into_std())?;
        while (run.started.load(Ordering::Relaxed) < args.sessions
            || run.connected.load(Ordering::Relaxed) + run.failed.load(Ordering::Relaxed)
                < run.started.load(Ordering::Relaxed))
            && Instant::now() < connect_deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            progress.update(&run);
        }
    }
    for i in (0..args.sessions).filter(|_| !proto_engine) {
        pace.tick().await;
        let Ok(permit) =
            tokio::time::timeout_at(connect_deadline, permits.clone().acquire_owned()).await
        else {
            break;
        };
        let permit = permit.context("semaphore closed")?;
        let stop = run.stop.child_token();
        slots.push(stop.clone());
        tasks.spawn(session(run.clone(), endpoint_of(i), Some(permit), stop));
        progress.update(&run);
    }
    // Wait for the attempts in flight to finish connecting.
    while run.connected.load(Ordering::Relaxed) + run.failed.load(Ordering::Relaxed) < tasks.len()
        && Instant::now() < connect_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        progress.update(&run);
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    let connected = run.connected.load(Ordering::Relaxed);
    let failed = args.sessions - connected;
    // Every session that is neither connected nor counted with a reason was still connecting
    // (or never started) when the connect phase ended.
    let connect_failures_by_reason = {
        let mut map = run.failures.lock().expect("failures lock").clone();
        let counted: usize = map.values().sum();
        if failed > counted {
            *map.entry(ConnectFailure::Timeout.to_string()).or_default() += failed - counted;
        }
        map
    };
    progress.finish(&run);
    info!(
        "{connected} sessions connected in {connect_seconds:.1} s; measuring for {:?}",
        args.duration
    );

    let at_start = scrape(&metrics_url).await;
    let own_cpu_at_start = own_cpu_seconds();
    let start_us = now_us();
    let end_us = start_us + args.duration.as_micros() as u64;
    run.window.end_us.store(end_us, Ordering::Relaxed);
    run.window.start_us.store(start_us, Ordering::Relaxed);
    let churn = if proto_engine && args.churn_per_s > 0.0 {
        // The engine threads churn their own sessions through the window.
        tokio::time::sleep(args.duration).await;
        Some(ChurnReport {
            per_s: args.churn_per_s,
            sessions_closed: run.churn_closed.load(Ordering::Relaxed),
            sessions_opened: run.churn_opened.load(Ordering::Relaxed),
        })
    } else if args.churn_per_s > 0.0 && !slots.is_empty() {
        let closed = churn(
            &run,
            &mut slots,
            &mut tasks,
            &endpoint_of,
            Instant::now() + args.duration,
        )
        .await;
        Some(ChurnReport {
            per_s: args.churn_per_s,
            sessions_closed: closed,
            sessions_opened: run.churn_opened.load(Ordering::Relaxed),
        })
    } else {
        tokio::time::sleep(args.duration).await;
        None
    };
    let at_end = scrape(&metrics_url).await;
    let own_cpu = own_cpu_seconds() - own_cpu_at_start;
    let own_rss = own_rss_bytes();
    // Datagrams of the window's last tick may still be in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.stop.cancel();
    while tasks.join_next().await.is_some() {}
    for thread in engine_threads {
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("joining an engine thread")?
            .map_err(|_| anyhow::anyhow!("a swarm engine thread panicked"))?;
    }

    let records = std::mem::take(&mut *run.records.lock().expect("records lock"));
    let interval_us = run.tick_interval_us.load(Ordering::Relaxed);
    let mut report = report(
        args,
        &records,
        connected,
        failed,
        connect_seconds,
        interval_us,
    );
    report.connect_failures_by_reason = connect_failures_by_reason.clone();
    report.attempts_failed_by_reason = {
        // Everything counted after the connect phase.
        let mut later = run.failures.lock().expect("failures lock").clone();
        for (reason, n) in &connect_failures_by_reason {
            if let Some(v) = later.get_mut(reason) {
                *v = v.saturating_sub(*n);
            }
        }
        later.retain(|_, n| *n > 0);
        later
    };
    report.churn = churn;
    if args.reconnect {
        let r = run.recovery.lock().expect("recovery lock");
        report.reconnect = Some(ReconnectReport {
            jitter: Some(args.reconnect_jitter),
            base_ms: args.reconnect_base.as_millis() as u64,
            cap_ms: args.reconnect_cap.as_millis() as u64,
            losses: r.losses,
            reconnects: r.reconnects,
            attempts: r.attempts,
            first_loss_unix_ms: r.first_loss_unix_ms,
            all_back_unix_ms: r.all_back_unix_ms.filter(|_| r.down == 0),
            recovery_seconds: match (r.first_loss_unix_ms, r.all_back_unix_ms) {
                (Some(first), Some(back)) if r.down == 0 => {
                    Some(back.saturating_sub(first) as f64 / 1000.0)
                }
                _ => None,
            },
            still_down: r.down,
            down_ms: percentiles(&r.down_us),
        });
    }
    report.position_age_ms = position_age(&records, start_us, end_us);
    report.load_generator = Some(LoadFigures {
        cpu_seconds: own_cpu,
        cpu_us_per_delivered_datagram: if report.datagrams > 0 {
            own_cpu * 1e6 / report.datagrams as f64
        } else {
            0.0
        },
        rss_bytes: own_rss,
        rss_per_session_bytes: if connected > 0 {
            own_rss as f64 / connected as f64
        } else {
            0.0
        },
    });
    if let (Some(before), Some(start), Some(end)) = (before, at_start, at_end) {
        let cpu = end.0 - start.0;
        report.server = Some(ServerFigures {
            cpu_seconds: cpu,
            cpu_us_per_delivered_datagram: if report.datagrams > 0 {
                cpu * 1e6 / report.datagrams as f64
            } else {
                0.0
            },
            rss_bytes: end.1 as u64,
            rss_before_bytes: before.1 as u64,
            rss_per_session_bytes: if connected > 0 {
                (end.1 - before.1) / connected as f64
            } else {
                0.0
            },
        });
    }
    Ok(report)
}

/// Until `until`: every 1/rate seconds closes the next slot's session (round robin, so the
/// oldest goes first) and opens a new one in its place. Returns how many it closed.
async fn churn(
    run: &Arc<Run>,
    slots: &mut [tokio_util::sync::CancellationToken],
    tasks: &mut tokio::task::JoinSet<()>,
    endpoint_of: &impl Fn(usize) -> Option<Arc<Endpoint<endpoint_side::Client>>>,
    until: Instant,
) -> u64 {
    let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / run.args.churn_per_s));
    // A late tick is made up for, so the rate holds on average.
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    every.tick().await;
    let mut closed = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return closed,
            _ = every.tick() => {}
        }
        let i = (closed % slots.len() as u64) as usize;
        slots[i].cancel();
        slots[i] = run.stop.child_token();
        tasks.spawn(session(run.clone(), endpoint_of(i), None, slots[i].clone()));
        closed += 1;
        // Finished sessions leave their results in the set: collect them as we go.
        while tasks.try_join_next().is_some() {}
    }
}

/// Samples, about every 100 ms from one second into the window (or into the session's life, if
/// it opened later) until the window or the session ends, how old each session's newest
/// position was: the sample time minus the server time of the newest tick received by then.
///
/// The samples are not on a grid: sample `k` falls at `k × 100 ms` plus a low-discrepancy offset
/// within its 100 ms ([`sample_offset_us`]). A plain 100 ms grid is in phase with a 1 s tick and
/// sees only ten phases of it, so a fixed delivery delay gave ten distinct ages instead of the
/// spread a browser sampling at a random moment sees.
fn position_age(records: &[Record], start_us: u64, end_us: u64) -> SwarmLatency {
    let mut hist = LatencyHistogram::default();
    // The offsets' sequence runs on across sessions, so sessions do not all sample the same
    // instants.
    let mut j = 0u64;
    for r in records {
        // (receive time, tick time), by receive time.
        let mut arrivals: Vec<(u64, u64)> = r
            .latency_us
            .iter()
            .zip(&r.tick_time_us)
            .map(|(&lat, &t)| (t + lat, t))
            .collect();
        arrivals.sort_unstable();
        let mut newest = None::<u64>;
        let mut next = 0;
        // Only while the session was open (the churn opens and closes sessions in the window).
        let first = (start_us + 1_000_000).max(r.from_us.saturating_add(1_000_000));
        let end_us = end_us.min(r.to_us);
        for k in 0u64.. {
            let t = first + k * AGE_STEP_US + sample_offset_us(j);
            j += 1;
            if t >= end_us {
                break;
            }
            while next < arrivals.len() && arrivals[next].0 <= t {
                newest = Some(newest.map_or(arrivals[next].1, |n: u64| n.max(arrivals[next].1)));
                next += 1;
            }
            if let Some(n) = newest {
                hist.record(t.saturating_sub(n));
            }
        }
    }
    percentiles(&hist)
}

/// Mean spacing of position-age samples.
const AGE_STEP_US: u64 = 100_000;

/// Where in its 100 ms step sample `k` falls: the fractional part of `k × φ` (a Weyl sequence),
/// so samples cover every phase of any tick interval evenly, and the same records always give
/// the same report.
fn sample_offset_us(k: u64) -> u64 {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    ((k as f64 * GOLDEN).fract() * AGE_STEP_US as f64) as u64
}

/// p50, p99, p99.9 and max of a histogram of microseconds, in milliseconds (zeros if empty).
fn percentiles(hist: &LatencyHistogram) -> SwarmLatency {
    let h = hist.inner();
    if h.is_empty() {
        return SwarmLatency::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    SwarmLatency {
        p50: ms(h.value_at_quantile(0.5)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// Summarises every session's record.
fn report(
    args: &SwarmArgs,
    records: &[Record],
    connected: usize,
    failed: usize,
    connect_seconds: f64,
    tick_interval_us: u64,
) -> SwarmReport {
    // Ticks in the window (by server time) and their part counts, from every session's view.
    let mut ticks: BTreeMap<u64, u16> = BTreeMap::new();
    for r in records {
        for &(tick, _, parts) in &r.parts {
            let e = ticks.entry(tick).or_insert(parts);
            *e = (*e).max(parts);
        }
    }
    let mut hist = LatencyHistogram::default();
    let (mut received, mut complete, mut partial, mut missed) = (0u64, 0u64, 0u64, 0u64);
    let (mut datagrams, mut bytes, mut expected) = (0u64, 0u64, 0u64);
    for r in records {
        let mut per_tick: HashMap<u64, Vec<u16>> = HashMap::new();
        for &(tick, part, _) in &r.parts {
            per_tick.entry(tick).or_default().push(part);
        }
        for (&tick, &parts) in ticks.iter().filter(|(&t, _)| r.expects(t)) {
            expected += u64::from(parts);
            match per_tick.get_mut(&tick) {
                None => missed += 1,
                Some(got) => {
                    got.sort_unstable();
                    got.dedup();
                    received += got.len() as u64;
                    if got.len() == usize::from(parts) {
                        complete += 1;
                    } else {
                        partial += 1;
                    }
                }
            }
        }
        for &us in &r.latency_us {
            hist.record(us);
        }
        datagrams += r.parts.len() as u64;
        bytes += r.bytes;
    }
    // A server too busy to keep its tick rate produces fewer ticks, and that is undelivered
    // data too: expect one tick per nominal interval (or every tick seen, if more), from every
    // session open through the whole window.
    let nominal = (args.duration.as_micros() as u64)
        .checked_div(tick_interval_us)
        .unwrap_or(0);
    let ticks_expected = nominal.max(ticks.len() as u64);
    let never_sent = ticks_expected - ticks.len() as u64;
    let whole_window = records.iter().filter(|r| r.to_us == u64::MAX).count() as u64;
    missed += never_sent * whole_window;
    let parts_per_tick = u64::from(ticks.values().copied().max().unwrap_or(1));
    expected += never_sent * parts_per_tick * whole_window;
    SwarmReport {
        transport: args.transport,
        engine: (args.transport == Transport::Webtransport).then_some(args.engine),
        sessions_requested: args.sessions,
        sessions_connected: connected,
        connect_failures: failed,
        connect_failures_by_reason: BTreeMap::new(),
        connect_seconds,
        sessions_lost: records.iter().filter(|r| r.lost).count(),
        duration_seconds: args.duration.as_secs_f64(),
        ticks: ticks.len(),
        ticks_expected,
        parts_per_tick: ticks.values().copied().max().unwrap_or(0),
        delivery_ratio: if expected == 0 {
            0.0
        } else {
            received as f64 / expected as f64
        },
        ticks_complete: complete,
        ticks_partial: partial,
        ticks_missed: missed,
        datagrams,
        bytes,
        position_age_ms: SwarmLatency::default(),
        server: None,
        load_generator: None,
        latency_ms: percentiles(&hist),
        attempts_failed_by_reason: BTreeMap::new(),
        reconnect: None,
        churn: None,
    }
}

/// One session slot: connect, read the initial state, record datagrams until `stop` (the end
/// of the run, or the churn) is cancelled; with `--reconnect`, open it again whenever it is
/// lost or an attempt fails, after the backoff.
async fn session(
    run: Arc<Run>,
    endpoint: Option<Arc<Endpoint<endpoint_side::Client>>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut record = Record::default();
    let mut life = Life {
        // Only the connect phase hands out permits; the churn opens sessions without one.
        churned_in: permit.is_none(),
        permit,
        ever: false,
        down_since: None,
        target: run.next_target.fetch_add(1, Ordering::Relaxed) % run.targets.len(),
    };
    let backoff = run.args.backoff();
    let mut attempt = 0u32;
    loop {
        let outcome = match &endpoint {
            Some(endpoint) => {
                webtransport_session(&run, endpoint, &stop, &mut life, &mut record).await
            }
            None => websocket_session(&run, &stop, &mut life, &mut record).await,
        };
        if !matches!(outcome, Outcome::Stopped) {
            // Failed or lost: the next attempt tries the next node.
            life.target = (life.target + 1) % run.targets.len();
        }
        match outcome {
            Outcome::Stopped => break,
            Outcome::Failed(reason) => {
                debug!("connect failed: {reason}");
                run.note_failure(&reason);
                if !run.args.reconnect {
                    if !life.ever {
                        run.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                attempt = attempt.saturating_add(1);
            }
            Outcome::Lost(e) => {
                record.lost = true;
                debug!("session ended: {e}");
                if !run.args.reconnect {
                    break;
                }
                life.down_since = Some(Instant::now());
                run.note_loss();
                attempt = 0;
            }
        }
        let wait = backoff.delay(attempt, rand::random::<f64>());
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        run.recovery.lock().expect("recovery lock").attempts += 1;
    }
    if life.ever {
        if !run.stop.is_cancelled() {
            // The churn closed it: ticks after now are not its to receive.
            record.to_us = now_us();
        }
        run.records.lock().expect("records lock").push(record);
    }
}

/// Where a session slot is in its life.
struct Life {
    /// The connect-phase slot, held until the first initial state.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Opened by the churn (after the connect phase).
    churned_in: bool,
    /// Connected at least once.
    ever: bool,
    /// Lost at this time and not back yet.
    down_since: Option<Instant>,
    /// The node (index into the targets) its next attempt goes to.
    target: usize,
}

impl Life {
    /// The initial state arrived on this attempt.
    fn connected(&mut self, run: &Run, record: &mut Record) {
        if !self.ever {
            self.ever = true;
            record.from_us = now_us();
            if self.churned_in {
                run.churn_opened.fetch_add(1, Ordering::Relaxed);
            } else {
                run.connected.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(since) = self.down_since.take() {
            run.note_back(since.elapsed());
        }
        self.permit = None;
    }
}

/// How one attempt ended.
enum Outcome {
    /// The swarm stopped it.
    Stopped,
    /// It never got its initial state.
    Failed(ConnectFailure),
    /// It was connected, then the server or the network ended it.
    Lost(String),
}

/// The deadline of an attempt that has not connected yet: --attempt-timeout from now when
/// attempts are timed, else never (the connect phase has its own limit).
fn attempt_deadline(run: &Run) -> Option<Instant> {
    run.args
        .timed_attempts()
        .then(|| Instant::now() + run.args.attempt_timeout)
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn webtransport_session(
    run: &Run,
    endpoint: &Endpoint<endpoint_side::Client>,
    stop: &tokio_util::sync::CancellationToken,
    life: &mut Life,
    record: &mut Record,
) -> Outcome {
    let deadline = attempt_deadline(run);
    let url = &run.targets[life.target];
    let opened = tokio::select! {
        _ = stop.cancelled() => return Outcome::Stopped,
        _ = until(deadline) => return Outcome::Failed(ConnectFailure::Timeout),
        opened = client::open(endpoint, url, run.args.connect.origin.as_deref()) => opened,
    };
    let mut session = match opened {
        Ok(session) => session,
        Err(e) => return Outcome::Failed(ConnectFailure::classify(&e)),
    };
    let mut up = false;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => {
                session.close();
                return Outcome::Stopped;
            }
            _ = until(deadline), if !up => {
                session.close();
                return Outcome::Failed(ConnectFailure::Timeout);
            }
            event = session.next() => event,
        };
        match event {
            Ok(Event::Message(StreamMessage::Hello(hello))) => {
                run.note_hello(&hello);
            }
            Ok(Event::Message(StreamMessage::State(_))) => {
                // Connected once the initial state is in: release the connect slot.
                if !up {
                    up = true;
                    life.connected(run, record);
                }
            }
            Ok(Event::Message(_)) => {}
            Ok(Event::Datagram(bytes)) => {
                if let Ok(header) = TickHeader::decode(&bytes) {
                    record.datagram(header, bytes.len(), &run.window);
                }
            }
            Err(end) if up => return Outcome::Lost(end.to_string()),
            Err(end) => {
                return Outcome::Failed(ConnectFailure::EndedEarly(short(&end.to_string())))
            }
        }
    }
}

async fn websocket_session(
    run: &Run,
    stop: &tokio_util::sync::CancellationToken,
    life: &mut Life,
    record: &mut Record,
) -> Outcome {
    let url = run.args.ws_url();
    let deadline = attempt_deadline(run);
    let opened = tokio::select! {
        _ = stop.cancelled() => return Outcome::Stopped,
        _ = until(deadline) => return Outcome::Failed(ConnectFailure::Timeout),
        opened = tokio_tungstenite::connect_async(url.as_str()) => opened,
    };
    let mut ws = match opened {
        Ok((ws, _)) => ws,
        Err(e) => return Outcome::Failed(ConnectFailure::classify(&anyhow::Error::new(e))),
    };
    let mut up = false;
    let mut frames = FrameDecoder::new();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                return Outcome::Stopped;
            }
            _ = until(deadline), if !up => {
                let _ = ws.close(None).await;
                return Outcome::Failed(ConnectFailure::Timeout);
            }
            msg = ws.next() => msg,
        };
        let data = match msg {
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(_)) => continue,
            Some(Err(e)) if up => return Outcome::Lost(e.to_string()),
            Some(Err(e)) => {
                return Outcome::Failed(ConnectFailure::EndedEarly(short(&e.to_string())))
            }
            None if up => return Outcome::Lost("closed".into()),
            None => return Outcome::Failed(ConnectFailure::EndedEarly("closed".into())),
        };
        match data.split_first() {
            Some((&WS_CHANNEL_STREAM, rest)) => {
                frames.push(rest);
                while let Ok(Some(msg)) = frames.next_message() {
                    if let StreamMessage::Hello(hello) = &msg {
                        run.note_hello(hello);
                    }
                    if matches!(msg, StreamMessage::State(_)) && !up {
                        up = true;
                        life.connected(run, record);
                    }
                }
            }
            Some((&WS_CHANNEL_DATAGRAM, rest)) => {
                if let Ok(header) = TickHeader::decode(rest) {
                    record.datagram(header, rest.len(), &run.window);
                }
            }
            _ => {}
        }
    }
}

/// Connect progress on stderr: a live line on a terminal, a log line every 5 s otherwise.
struct Progress {
    total: usize,
    terminal: bool,
    last: Mutex<Instant>,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            terminal: std::io::stderr().is_terminal(),
            last: Mutex::new(Instant::now()),
        }
    }

    fn update(&self, run: &Run) {
        let mut last = self.last.lock().expect("progress lock");
        let every = if self.terminal { 200 } else { 5000 };
        if last.elapsed() < Duration::from_millis(every) {
            return;
        }
        *last = Instant::now();
        let (ok, failed) = (
            run.connected.load(Ordering::Relaxed),
            run.failed.load(Ordering::Relaxed),
        );
        if self.terminal {
            let width = 30;
            let filled = (ok * width / self.total.max(1)).min(width);
            eprint!(
                "\rconnecting [{}{}] {ok}/{} ({failed} failed)   ",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.total
            );
        } else {
            info!("connecting: {ok}/{} open, {failed} failed", self.total);
        }
    }

    fn finish(&self, run: &Run) {
        if self.terminal {
            eprintln!(
                "\rconnected {}/{} ({} failed)                              ",
                run.connected.load(Ordering::Relaxed),
                self.total,
                run.failed.load(Ordering::Relaxed)
            );
        }
        if run.failed.load(Ordering::Relaxed) > 0 {
            warn!(
                "{} sessions failed to connect",
                run.failed.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> SwarmArgs {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: SwarmArgs,
        }
        let mut argv = vec!["swarm"];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).args
    }

    #[test]
    fn connect_failure_refusal_is_its_status() {
        let e = anyhow::Error::new(client::Refused { status: Some(429) }).context("opening");
        assert_eq!(
            ConnectFailure::classify(&e),
            ConnectFailure::Refused(Some(429))
        );
        assert_eq!(
            ConnectFailure::Refused(Some(429)).to_string(),
            "refused 429"
        );
        assert_eq!(
            ConnectFailure::Refused(None).to_string(),
            "refused (no status)"
        );
    }

    #[test]
    fn connect_failure_handshake_names_the_quic_error() {
        use wtransport::error::{ConnectingError, ConnectionError};
        let e = anyhow::Error::new(ConnectingError::ConnectionError(ConnectionError::TimedOut))
            .context("opening a WebTransport session at https://h:1/positions");
        let reason = ConnectFailure::classify(&e);
        assert_eq!(reason.to_string(), "handshake: connection timed out");
    }

    #[test]
    fn connect_failure_websocket_http_status_is_a_refusal() {
        let response = tokio_tungstenite::tungstenite::http::Response::builder()
            .status(401)
            .body(None)
            .unwrap();
        let e = anyhow::Error::new(tokio_tungstenite::tungstenite::Error::Http(Box::new(
            response,
        )));
        assert_eq!(
            ConnectFailure::classify(&e),
            ConnectFailure::Refused(Some(401))
        );
    }

    #[test]
    fn connect_failure_other_keeps_the_root_cause_only() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused\nmore");
        let e = anyhow::Error::new(io).context("ws://127.0.0.1:9/positions.ws");
        assert_eq!(ConnectFailure::classify(&e).to_string(), "refused");
    }

    #[test]
    fn short_cuts_long_messages() {
        assert_eq!(short("  one line \n two"), "one line");
        let long = "é".repeat(150);
        let cut = short(&long);
        assert_eq!(cut.chars().count(), 101);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn record_expects_ticks_in_its_life_only() {
        let mut r = Record {
            from_us: 10_000_000,
            ..Record::default()
        };
        assert!(!r.expects(9_999_999));
        assert!(r.expects(10_000_000));
        assert!(r.expects(u64::MAX - 1), "open until the run stops");
        r.to_us = 20_000_000;
        assert!(r.expects(19_000_000));
        assert!(
            !r.expects(19_000_001),
            "the last second may still be in flight"
        );
    }

    fn record(from_s: u64, to_s: Option<u64>, got: &[u64]) -> Record {
        Record {
            parts: got.iter().map(|&t| (t * 1_000_000, 0, 1)).collect(),
            latency_us: got.iter().map(|_| 1000).collect(),
            tick_time_us: got.iter().map(|&t| t * 1_000_000).collect(),
            from_us: from_s * 1_000_000,
            to_us: to_s.map_or(u64::MAX, |t| t * 1_000_000),
            ..Record::default()
        }
    }

    #[test]
    fn report_charges_churned_sessions_only_for_their_life() {
        let a = args(&["--duration", "5s"]);
        let records = [
            // Open the whole window, got ticks 1-5.
            record(0, None, &[1, 2, 3, 4, 5]),
            // Closed by the churn at 4 s: expects 1-3, got them.
            record(0, Some(4), &[1, 2, 3]),
            // Opened by the churn at 3 s: expects 3-5, missed 5.
            record(3, None, &[3, 4]),
        ];
        let r = report(&a, &records, 2, 0, 1.0, 1_000_000);
        assert_eq!(r.ticks, 5);
        assert_eq!(r.ticks_complete, 10);
        assert_eq!(r.ticks_missed, 1);
        assert!((r.delivery_ratio - 10.0 / 11.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn report_charges_a_lost_session_for_the_rest_of_the_window() {
        let a = args(&["--duration", "4s"]);
        let mut lost = record(0, None, &[1, 2]);
        lost.lost = true;
        let r = report(
            &a,
            &[record(0, None, &[1, 2, 3, 4]), lost],
            2,
            0,
            1.0,
            1_000_000,
        );
        assert_eq!(r.sessions_lost, 1);
        assert_eq!(r.ticks_missed, 2);
        assert!((r.delivery_ratio - 0.75).abs() < 1e-9);
    }

    #[test]
    fn position_age_samples_a_churned_session_only_while_it_was_open() {
        // Ticks every second, each received 100 ms late; closed by the churn at 5 s.
        let mut r = record(0, Some(5), &[1, 2, 3, 4]);
        r.latency_us = vec![100_000; 4];
        let age = position_age(&[r], 0, 60_000_000);
        // At most a tick interval plus the delay old (histogram precision aside), never the
        // minute after. (With samples on a 100 ms grid this bound was 1,000 ms: the grid never
        // looked just before a tick arrived.)
        assert!(age.max <= 1_101.0, "no sample after it closed: {age:?}");
        assert!(age.p50 >= 100.0, "{age:?}");
    }

    #[test]
    fn summary_warns_of_sessions_missing_or_lost() {
        let a = args(&["--duration", "4s", "--sessions", "3"]);
        let full = report(&a, &[record(0, None, &[1, 2, 3, 4])], 3, 0, 1.0, 1_000_000);
        assert!(full.incomplete().is_none());
        assert!(!full.summary().contains("WARNING"));
        let short = report(&a, &[record(0, None, &[1, 2, 3, 4])], 2, 1, 1.0, 1_000_000);
        assert!(
            short.summary().starts_with("WARNING"),
            "{}",
            short.summary()
        );
        assert!(short
            .summary()
            .contains("only 2 of 3 sessions connected (1 failed"));
        let mut gone = record(0, None, &[1]);
        gone.lost = true;
        let lost = report(&a, &[gone], 3, 0, 1.0, 1_000_000);
        assert!(
            lost.summary().contains("1 lost during the run"),
            "{}",
            lost.summary()
        );
    }

    #[test]
    fn position_age_sees_every_phase_of_the_tick() {
        // Ticks every second, each received exactly 100 ms late: a browser looking at a random
        // moment sees an age spread evenly over 100..1100 ms. A 100 ms grid in phase with the
        // tick saw only 100, 200, ..., 1000 ms (p50 500, max 1000).
        let ticks: Vec<u64> = (1..=120).collect();
        let mut r = record(0, None, &ticks);
        r.latency_us = vec![100_000; ticks.len()];
        let age = position_age(&[r], 0, 120_000_000);
        assert!((580.0..=620.0).contains(&age.p50), "{age:?}");
        assert!(age.p99 >= 1_070.0 && age.max >= 1_090.0, "{age:?}");
        assert!(
            age.max <= 1_101.0,
            "never older than a tick plus the delay: {age:?}"
        );
    }

    #[test]
    fn sample_offset_stays_inside_its_step_and_spreads() {
        let offsets: Vec<u64> = (0..1000).map(sample_offset_us).collect();
        assert!(offsets.iter().all(|&o| o < AGE_STEP_US));
        // Every tenth of the step holds about a tenth of the samples.
        for decile in 0..10 {
            let n = offsets
                .iter()
                .filter(|&&o| o / (AGE_STEP_US / 10) == decile)
                .count();
            assert!((90..=110).contains(&n), "decile {decile}: {n}");
        }
    }

    #[test]
    fn swarm_args_backoff_follows_the_options() {
        let a = args(&["--reconnect-base", "500ms", "--reconnect-cap", "10s"]);
        assert_eq!(a.backoff().window(0), Duration::from_millis(500));
        assert_eq!(a.backoff().window(9), Duration::from_secs(10));
        assert_eq!(
            args(&[]).backoff(),
            Backoff::PAGE,
            "defaults are the page's"
        );
        let a = args(&["--reconnect-base", "2s", "--reconnect-cap", "1s"]);
        assert_eq!(
            a.backoff().window(3),
            Duration::from_secs(2),
            "cap below base: base"
        );
        assert!(!args(&[]).timed_attempts());
        assert!(args(&["--churn-per-s", "2"]).timed_attempts());
    }
}
