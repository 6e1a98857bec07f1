//! `fleetcast watch`: a native client that follows the fleet, reports what arrived, reconnects.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{self, ClientOptions, ConnectArgs, Event};
use crate::proto::view::{FleetView, SampleCounts, TickCounts};
use crate::proto::wire::{CloseCode, TickPart};
use crate::server::config::parse_duration;
use crate::server::now_us;

/// `fleetcast watch` options.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Server and trust.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Stop after this long (e.g. 5s, 2m); default: run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Print one JSON report on stdout at the end instead of a text summary.
    #[arg(long)]
    pub json: bool,

    /// A session that hears nothing from its server for this long ends and reconnects (to the
    /// next node with several --server). The client pings a quiet server every third of it, so
    /// only a dead or unreachable server hits it, not one whose ticks have stopped.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Longest wait between reconnection attempts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub max_backoff: Duration,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// What `fleetcast watch --json` prints.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Cars in the initial state of the newest session.
    pub initial_cars: usize,
    /// Cars on the roster with a position at the end.
    pub cars: usize,
    /// Distinct ticks with at least one datagram part received.
    pub ticks_received: u64,
    /// Ticks with every part received.
    pub ticks_complete: u64,
    /// Ticks with some parts lost.
    pub ticks_partial: u64,
    /// Ticks with every part lost.
    pub ticks_missed: u64,
    /// Parts that arrived after their tick was settled (reordered beyond the window).
    pub late_parts: u64,
    /// Parts received twice.
    pub duplicate_parts: u64,
    /// Car entries skipped because a newer sample was already held.
    pub stale_cars: u64,
    /// Car entries that arrived before their car's `CarsAdded` and were held for it.
    pub held_cars: u64,
    /// Car entries dropped because their id was not on the roster: the car had left, or no
    /// `CarsAdded` came within 8 ticks (PROTOCOL.md section 7).
    pub dropped_cars: u64,
    /// Datagrams received.
    pub datagrams: u64,
    /// Datagram payload bytes received.
    pub bytes: u64,
    /// UDP payload bytes received by the client's QUIC connections (everything on the wire:
    /// handshake, stream, datagrams, QUIC headers and tags).
    pub udp_bytes: u64,
    /// Datagrams that did not decode.
    pub decode_errors: u64,
    /// Sessions opened (1 + reconnections).
    pub sessions: u64,
    /// Tick-to-receipt latency (receive time minus the tick's server time).
    pub latency_ms: Latency,
    /// How the last session ended, if it did.
    pub last_end: Option<String>,
    /// Session URLs that sessions opened at, in the order first used (several with
    /// `--server` and more than one node).
    pub session_urls: Vec<String>,
}

impl Report {
    fn add_counts(&mut self, c: TickCounts) {
        self.ticks_received += c.received;
        self.ticks_complete += c.complete;
        self.ticks_partial += c.partial;
        self.ticks_missed += c.missed;
        self.late_parts += c.late_parts;
        self.duplicate_parts += c.duplicate_parts;
    }

    fn add_samples(&mut self, s: SampleCounts) {
        self.held_cars += s.held;
        self.dropped_cars += s.removed + s.expired + s.overflow;
    }

    /// A one-line human summary.
    pub fn summary(&self) -> String {
        format!(
            "{} cars ({} initially); {} ticks received: {} complete, {} partial, {} missed; \
             {} datagrams, {} bytes; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} session(s)",
            self.cars,
            self.initial_cars,
            self.ticks_received,
            self.ticks_complete,
            self.ticks_partial,
            self.ticks_missed,
            self.datagrams,
            self.bytes,
            self.latency_ms.p50,
            self.latency_ms.p99,
            self.latency_ms.max,
            self.sessions
        )
    }
}

/// Tick-to-receipt latency histogram in microseconds.
pub struct LatencyHistogram(hdrhistogram::Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("static histogram bounds are valid"),
        )
    }
}

impl LatencyHistogram {
    /// Records one sample (clamped into the histogram's range).
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    /// Percentiles in milliseconds.
    pub fn latency(&self) -> Latency {
        if self.0.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(self.0.value_at_quantile(0.50)),
            p99: ms(self.0.value_at_quantile(0.99)),
            max: ms(self.0.max()),
        }
    }

    /// The underlying histogram.
    pub fn inner(&self) -> &hdrhistogram::Histogram<u64> {
        &self.0
    }
}

/// Follows the fleet until `--duration` passes or `stop` is cancelled; returns the report.
pub async fn run(args: WatchArgs, stop: CancellationToken) -> Result<Report> {
    let deadline = args.duration.map(|d| Instant::now() + d);
    let until_deadline = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let mut report = Report::default();
    let mut hist = LatencyHistogram::default();
    let mut backoff = Duration::from_millis(250);
    let status = std::io::stderr().is_terminal() && !args.json;
    let mut session_no = 0u64;
    let mut nodes = client::Nodes::default();
    loop {
        let attempt = async {
            let target = args.connect.target(&mut nodes).await?;
            let mut options = ClientOptions::new(target.trust);
            options.idle_timeout = args.idle_timeout;
            options.keep_alive = Some(args.idle_timeout / 3);
            let endpoint = client::endpoint(&options)?;
            let session =
                client::open(&endpoint, &target.url, args.connect.origin.as_deref()).await?;
            Ok::<_, anyhow::Error>((endpoint, session, target.shown))
        };
        let opened = tokio::select! {
            _ = &mut until_deadline => break,
            _ = stop.cancelled() => break,
            opened = attempt => opened,
        };
        match opened {
            Err(e) => warn!("cannot connect: {e:#}"),
            Ok((_endpoint, mut session, shown)) => {
                session_no += 1;
                report.sessions += 1;
                info!("session {session_no} open at {shown}");
                if !report.session_urls.contains(&shown) {
                    report.session_urls.push(shown);
                }
                let mut view = FleetView::new();
                let mut last_status = Instant::now();
                let ended = loop {
                    let event = tokio::select! {
                        _ = &mut until_deadline => { session.close(); break None; }
                        _ = stop.cancelled() => { session.close(); break None; }
                        event = session.next() => event,
                    };
                    match event {
                        Ok(Event::Message(msg)) => view.apply_message(msg),
                        Ok(Event::Datagram(bytes)) => {
                            report.datagrams += 1;
                            report.bytes += bytes.len() as u64;
                            match TickPart::decode(&bytes) {
                                Ok(part) => {
                                    hist.record(now_us().saturating_sub(part.time_us));
                                    let outcome = view.apply_part(&part);
                                    report.stale_cars += outcome.stale as u64;
                                }
                                Err(e) => {
                                    report.decode_errors += 1;
                                    warn!("undecodable datagram: {e}");
                                }
                            }
                        }
                        Err(end) => break Some(end),
                    }
                    if status && last_status.elapsed() >= Duration::from_secs(1) {
                        last_status = Instant::now();
                        let c = view.counts();
                        let l = hist.latency();
                        eprint!(
                            "\r{} cars | {} ticks, {} missed | p50 {:.1} ms p99 {:.1} ms   ",
                            view.cars().len(),
                            report.ticks_received + c.received,
                            report.ticks_missed + c.missed,
                            l.p50,
                            l.p99
                        );
                        let _ = std::io::stderr().flush();
                    }
                };
                report.udp_bytes += session.connection().quic_connection().stats().udp_rx.bytes;
                view.finish();
                report.add_counts(view.counts());
                report.add_samples(view.samples());
                report.initial_cars = view.initial_cars().unwrap_or(0);
                report.cars = view.cars().values().filter(|c| c.sample.is_some()).count();
                if status {
                    eprintln!();
                }
                match ended {
                    None => break,
                    Some(end) => {
                        warn!("session ended: {end}");
                        report.last_end = Some(end.to_string());
                        if end.by_client && end.close_code() == Some(CloseCode::UnsupportedVersion)
                        {
                            // Only a newer client (or an older server) helps: retry slowly.
                            warn!("this client cannot read that server; upgrade fleetcast");
                            backoff = args.max_backoff;
                        } else if view.counts().received > 0 {
                            backoff = Duration::from_millis(250);
                        }
                    }
                }
            }
        }
        // Full jitter over the upper half, so a restarted server is not hit by every client
        // at the same instant.
        let wait = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
        backoff = (backoff * 2).min(args.max_backoff);
        tokio::select! {
            _ = &mut until_deadline => break,
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    report.latency_ms = hist.latency();
    Ok(report)
}
