//! `fleetcast swarm`: a load generator that opens many sessions and measures what they receive.
//!
//! Sessions are spread over several client endpoints (one UDP socket each, `--sessions-per-
//! endpoint`), because one endpoint's single receive task drops datagrams at thousands of
//! sessions. Connecting is bounded in rate and concurrency. Once every session has connected (or
//! the connect phase timed out) a measurement window of `--duration` starts; each session
//! records the ticks whose server time falls in that window, and the report compares what
//! arrived with what the server sent: every connected session should get every part of every
//! tick.

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
use tracing::{info, warn};
use wtransport::endpoint::endpoint_side;
use wtransport::Endpoint;

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

    /// Sessions to open.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,

    /// Sessions per client endpoint (UDP socket).
    #[arg(long, default_value_t = 500)]
    pub sessions_per_endpoint: usize,

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
    /// Sessions asked for.
    pub sessions_requested: usize,
    /// Sessions open when the measurement started.
    pub sessions_connected: usize,
    /// Connection attempts that failed (or did not finish in time).
    pub connect_failures: usize,
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
    /// Age of the newest position each session held, sampled every 100 ms over the window
    /// (sample time minus the newest received tick's server time).
    pub position_age_ms: SwarmLatency,
    /// Server figures from its `/metrics`, when reachable.
    pub server: Option<ServerFigures>,
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
        )
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
#[derive(Default)]
struct Record {
    /// (tick, part, parts) per datagram.
    parts: Vec<(u64, u16, u16)>,
    /// Latency per datagram, microseconds.
    latency_us: Vec<u64>,
    /// Server time of each datagram's tick.
    tick_time_us: Vec<u64>,
    bytes: u64,
    /// The session ended before the swarm closed it.
    lost: bool,
}

impl Record {
    fn datagram(&mut self, header: TickHeader, len: usize, window: &Window) {
        if window.contains(header.time_us) {
            self.parts.push((header.tick, header.part, header.parts));
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
    window: Window,
    /// The server's nominal tick interval from its Hello, microseconds (0 until known).
    tick_interval_us: AtomicU64,
    connected: AtomicUsize,
    failed: AtomicUsize,
    records: Mutex<Vec<Record>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Run {
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
    let trust = match args.transport {
        // The WebSocket fallback is plain ws:// (or TLS through a proxy's own certificate).
        Transport::Websocket => Trust::SystemRoots,
        Transport::Webtransport => args.connect.trust().await?,
    };
    let run = Arc::new(Run {
        window: Window::default(),
        tick_interval_us: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        records: Mutex::new(Vec::with_capacity(args.sessions)),
        stop: tokio_util::sync::CancellationToken::new(),
        args,
    });
    let args = &run.args;

    let mut endpoints = Vec::new();
    if args.transport == Transport::Webtransport {
        let count = args.sessions.div_ceil(args.sessions_per_endpoint.max(1));
        let mut options = ClientOptions::new(trust);
        options.udp_buffer = Some(args.udp_buffer);
        // Enough for a few ticks of a large fleet, small enough for thousands of sessions.
        options.datagram_buffer = 64 * 1024;
        for _ in 0..count {
            endpoints.push(Arc::new(client::endpoint(&options)?));
        }
    }

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
    let connect_deadline = started + args.connect_timeout;
    for i in 0..args.sessions {
        pace.tick().await;
        let Ok(permit) =
            tokio::time::timeout_at(connect_deadline, permits.clone().acquire_owned()).await
        else {
            break;
        };
        let permit = permit.context("semaphore closed")?;
        let endpoint = endpoints
            .get(i / args.sessions_per_endpoint.max(1))
            .cloned();
        tasks.spawn(session(run.clone(), endpoint, permit));
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
    progress.finish(&run);
    info!(
        "{connected} sessions connected in {connect_seconds:.1} s; measuring for {:?}",
        args.duration
    );

    let at_start = scrape(&metrics_url).await;
    let start_us = now_us();
    let end_us = start_us + args.duration.as_micros() as u64;
    run.window.end_us.store(end_us, Ordering::Relaxed);
    run.window.start_us.store(start_us, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    let at_end = scrape(&metrics_url).await;
    // Datagrams of the window's last tick may still be in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.stop.cancel();
    while tasks.join_next().await.is_some() {}

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
    report.position_age_ms = position_age(&records, start_us, end_us);
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

/// Samples, every 100 ms from one second into the window, how old each session's newest
/// position was: the sample time minus the server time of the newest tick received by then.
fn position_age(records: &[Record], start_us: u64, end_us: u64) -> SwarmLatency {
    const STEP_US: u64 = 100_000;
    let mut hist = LatencyHistogram::default();
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
        let mut t = start_us + 1_000_000;
        while t < end_us {
            while next < arrivals.len() && arrivals[next].0 <= t {
                newest = Some(newest.map_or(arrivals[next].1, |n: u64| n.max(arrivals[next].1)));
                next += 1;
            }
            if let Some(n) = newest {
                hist.record(t.saturating_sub(n));
            }
            t += STEP_US;
        }
    }
    percentiles(&hist)
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
    // Ticks in the window and their part counts, from every session's view.
    let mut ticks: BTreeMap<u64, u16> = BTreeMap::new();
    for r in records {
        for &(tick, _, parts) in &r.parts {
            let e = ticks.entry(tick).or_insert(parts);
            *e = (*e).max(parts);
        }
    }
    let mut hist = LatencyHistogram::default();
    let (mut received, mut complete, mut partial, mut missed) = (0u64, 0u64, 0u64, 0u64);
    let (mut datagrams, mut bytes) = (0u64, 0u64);
    for r in records {
        let mut per_tick: HashMap<u64, Vec<u16>> = HashMap::new();
        for &(tick, part, _) in &r.parts {
            per_tick.entry(tick).or_default().push(part);
        }
        for (&tick, &parts) in &ticks {
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
    // data too: expect one tick per nominal interval (or every tick seen, if more).
    let nominal = (args.duration.as_micros() as u64)
        .checked_div(tick_interval_us)
        .unwrap_or(0);
    let ticks_expected = nominal.max(ticks.len() as u64);
    let never_sent = ticks_expected - ticks.len() as u64;
    missed += never_sent * records.len() as u64;
    let parts_per_tick = u64::from(ticks.values().copied().max().unwrap_or(1));
    let expected: u64 = (ticks.values().map(|&p| u64::from(p)).sum::<u64>()
        + never_sent * parts_per_tick)
        * connected as u64;
    SwarmReport {
        transport: args.transport,
        sessions_requested: args.sessions,
        sessions_connected: connected,
        connect_failures: failed,
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
        latency_ms: percentiles(&hist),
    }
}

/// One session: connect, read the initial state, record datagrams until the run stops.
async fn session(
    run: Arc<Run>,
    endpoint: Option<Arc<Endpoint<endpoint_side::Client>>>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let mut record = Record::default();
    let result = match endpoint {
        Some(endpoint) => webtransport_session(&run, &endpoint, permit, &mut record).await,
        None => websocket_session(&run, permit, &mut record).await,
    };
    match result {
        Err(SessionError::Connect(e)) => {
            run.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("connect failed: {e:#}");
            return;
        }
        Err(SessionError::Ended(e)) => {
            record.lost = true;
            if !run.stop.is_cancelled() {
                tracing::debug!("session ended: {e}");
            }
        }
        Ok(()) => {}
    }
    run.records.lock().expect("records lock").push(record);
}

enum SessionError {
    Connect(anyhow::Error),
    Ended(String),
}

async fn webtransport_session(
    run: &Run,
    endpoint: &Endpoint<endpoint_side::Client>,
    permit: tokio::sync::OwnedSemaphorePermit,
    record: &mut Record,
) -> Result<(), SessionError> {
    let mut session = client::open(
        endpoint,
        &run.args.connect.session_url(),
        run.args.connect.origin.as_deref(),
    )
    .await
    .map_err(SessionError::Connect)?;
    let mut permit = Some(permit);
    loop {
        let event = tokio::select! {
            _ = run.stop.cancelled() => {
                session.close();
                return Ok(());
            }
            event = session.next() => event,
        };
        match event {
            Ok(Event::Message(StreamMessage::Hello(hello))) => {
                run.note_hello(&hello);
            }
            Ok(Event::Message(StreamMessage::State(_))) => {
                // Connected once the initial state is in: release the connect slot.
                if permit.take().is_some() {
                    run.connected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Message(_)) => {}
            Ok(Event::Datagram(bytes)) => {
                if let Ok(header) = TickHeader::decode(&bytes) {
                    record.datagram(header, bytes.len(), &run.window);
                }
            }
            Err(end) => {
                if permit.is_some() {
                    return Err(SessionError::Connect(anyhow::anyhow!("{end}")));
                }
                return Err(SessionError::Ended(end.to_string()));
            }
        }
    }
}

async fn websocket_session(
    run: &Run,
    permit: tokio::sync::OwnedSemaphorePermit,
    record: &mut Record,
) -> Result<(), SessionError> {
    let url = run.args.ws_url();
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| {
            let url = client::without_query(&url);
            SessionError::Connect(anyhow::anyhow!("{url}: {e}"))
        })?;
    let mut permit = Some(permit);
    let mut frames = FrameDecoder::new();
    loop {
        let msg = tokio::select! {
            _ = run.stop.cancelled() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            msg = ws.next() => msg,
        };
        let data = match msg {
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(end_or_connect(&mut permit, e.to_string())),
            None => return Err(end_or_connect(&mut permit, "closed".into())),
        };
        match data.split_first() {
            Some((&WS_CHANNEL_STREAM, rest)) => {
                frames.push(rest);
                while let Ok(Some(msg)) = frames.next_message() {
                    if let StreamMessage::Hello(hello) = &msg {
                        run.note_hello(hello);
                    }
                    if matches!(msg, StreamMessage::State(_)) && permit.take().is_some() {
                        run.connected.fetch_add(1, Ordering::Relaxed);
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

fn end_or_connect(
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    e: String,
) -> SessionError {
    if permit.is_some() {
        SessionError::Connect(anyhow::anyhow!(e))
    } else {
        SessionError::Ended(e)
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
