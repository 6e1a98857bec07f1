//! `fleetcast publish` and `fleetcast sim`: put positions into a server's fleet over HTTP ingest.
//!
//! Layout:
//! - [`input`]: pure readers: NDJSON, CSV and GPX text to fix objects with their input lines.
//! - [`plan`]: pure: batches, the replay schedule and time rewriting, what each HTTP answer
//!   means, the tally and the summary.
//! - [`sender`]: the HTTP shell: one request to `/v1/positions` with the token.
//! - [`simulate`]: `fleetcast sim`: the simulator as an external publisher or a recorder.
//! - this file: the `publish` command: reading, pacing, retrying, the progress line.
//!
//! Nothing is dropped silently: every fix read is either answered for by the server (accepted,
//! or rejected with its input line and reason) or counted as not sent when a fatal error stops
//! the run.

pub mod input;
pub mod plan;
pub mod sender;
pub mod simulate;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::server::config::{parse_duration, PublishToken};
use crate::server::now_us;
use input::Format;
use plan::{backoff, fix_to_send, ndjson_body, Plan, Reply, Step, Summary, Tally};
use sender::Sender;

/// How `publish` and `sim --publish` talk to the server.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Publisher token, sent as `Authorization: Bearer TOKEN` (the server's --publish-token).
    /// Never printed; prefer the environment variable, which `ps` does not show.
    #[arg(long, env = "FLEETCAST_PUBLISH_TOKEN", hide_env_values = true,
          value_parser = any_secret)]
    pub token: Option<PublishToken>,

    /// Fixes per request.
    #[arg(long, env = "FLEETCAST_PUBLISH_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,

    /// Times one request is sent again after a 5xx answer or a connection error before the run
    /// stops (with backoff: 0.25 s, 0.5 s, 1 s, ... up to 8 s). 429 answers are waited out as
    /// the server says and not counted.
    #[arg(long, env = "FLEETCAST_PUBLISH_RETRIES", default_value_t = 5)]
    pub retries: u32,

    /// Longest wait for the answer to one request.
    #[arg(long, env = "FLEETCAST_PUBLISH_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Takes any token text; its rules are checked later, with a message that does not repeat it
/// (clap's own error would print the rejected value).
fn any_secret(s: &str) -> Result<PublishToken, std::convert::Infallible> {
    Ok(PublishToken::new(s))
}

impl SendArgs {
    /// The token, checked, or an error that says how to give one.
    pub fn token(&self) -> Result<PublishToken> {
        let token = self.token.as_ref().ok_or_else(|| {
            anyhow!("a publisher token is needed: --token or FLEETCAST_PUBLISH_TOKEN")
        })?;
        token
            .expose()
            .parse::<PublishToken>()
            .map_err(|e| anyhow!("--token: {e}"))
    }

    /// A sender to `url` with these options.
    pub fn sender(&self, url: &str) -> Result<Sender> {
        Ok(Sender::new(url, self.token()?, self.timeout)?)
    }
}

/// The input layout, or `auto`: from the file's extension (`.csv`, `.gpx`, else NDJSON; stdin
/// is NDJSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatChoice {
    /// From the extension.
    Auto,
    /// One JSON fix object per line.
    Ndjson,
    /// A header line (id,lat,lon required; heading_deg,speed_mps,time,label optional).
    Csv,
    /// GPX tracks: the track's name is the car's id.
    Gpx,
}

/// `fleetcast publish` options.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Fixes to send: a file, or `-` (the default) for stdin.
    #[arg(value_name = "FILE|-", default_value = "-")]
    pub input: PathBuf,

    /// The server's HTTP address; fixes go to URL/v1/positions.
    #[arg(
        long,
        env = "FLEETCAST_PUBLISH_URL",
        default_value = "http://localhost:8080"
    )]
    pub url: String,

    /// Input layout.
    #[arg(long, value_enum, default_value_t = FormatChoice::Auto)]
    pub format: FormatChoice,

    /// Replay at the recorded pace divided by X (1.0: real time), with each fix's `time`
    /// rewritten to the moment it now represents, so an old recording plays as live. Without
    /// it, fixes are sent as fast as the server allows, unchanged.
    #[arg(long, value_name = "X", value_parser = parse_speed)]
    pub replay_speed: Option<f64>,

    /// Token, batch size, retries and timeout.
    #[command(flatten)]
    pub send: SendArgs,

    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// A positive, finite replay speed.
fn parse_speed(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!(
            "'{s}' is not a speed factor above 0, like 1.0 or 20"
        )),
    }
}

/// How a run ended: the summary, and the error that stopped it early, if any.
#[derive(Debug)]
pub struct Finished {
    /// What was read, sent, accepted and rejected.
    pub summary: Summary,
    /// Why the run stopped before every fix was answered for.
    pub error: Option<anyhow::Error>,
}

/// Reads the input, then sends every fix; fails before sending anything if the input or the
/// options are wrong.
pub async fn run(args: PublishArgs, stop: CancellationToken) -> Result<Finished> {
    let stdin = args.input.as_os_str() == "-";
    let name = if stdin {
        "stdin".to_string()
    } else {
        args.input.display().to_string()
    };
    let format = match args.format {
        FormatChoice::Auto => Format::from_path((!stdin).then_some(args.input.as_path())),
        FormatChoice::Ndjson => Format::Ndjson,
        FormatChoice::Csv => Format::Csv,
        FormatChoice::Gpx => Format::Gpx,
    };
    let sender = args.send.sender(&args.url)?;
    let bytes = if stdin {
        if std::io::stdin().is_terminal() {
            anyhow::bail!("no input: give a FILE, or pipe fixes into stdin");
        }
        tokio::task::spawn_blocking(|| {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map(|_| buf)
        })
        .await?
        .context("reading stdin")?
    } else {
        tokio::fs::read(&args.input)
            .await
            .with_context(|| format!("reading {name}"))?
    };
    let records = input::read(&bytes, format)
        .map_err(|e| anyhow!("{name}:{}: {} (read as {format})", e.line, e.kind))?;
    drop(bytes);
    let batch = args.send.batch as usize;
    let mut plan = match args.replay_speed {
        Some(speed) => Plan::replay(&records, speed, batch),
        None => Plan::immediate(records.len(), batch),
    };
    let mut status = Status::new(records.len());
    let start_us = now_us();
    let error = loop {
        match plan.next(status.start.elapsed()) {
            Step::Done => break None,
            Step::Wait(d) => {
                if let Err(e) = status
                    .pause(d, "replaying at the recorded pace", &stop)
                    .await
                {
                    break Some(e);
                }
            }
            Step::Send(planned) => {
                let fixes: Vec<Map<String, Value>> = planned
                    .iter()
                    .map(|&p| fix_to_send(&records[p.index], p, start_us))
                    .collect();
                let lines: Vec<Option<usize>> =
                    planned.iter().map(|p| records[p.index].line).collect();
                let sent = deliver(&sender, &fixes, &lines, &args.send, &mut status, &stop).await;
                if let Err(e) = sent {
                    break Some(e);
                }
            }
        }
    };
    let summary = status.finish();
    let error = error.map(|e| match e {
        Stopped::Interrupted => anyhow!("interrupted: {} fixes not sent", summary.unsent),
        Stopped::Failed(why) => anyhow!(
            "stopped after {} of {} fixes ({} accepted), {} not sent: {why}",
            summary.sent,
            summary.read,
            summary.accepted,
            summary.unsent
        ),
    });
    Ok(Finished { summary, error })
}

/// Why sending stopped early.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// The server refused in a way retrying cannot fix, or kept failing.
    Failed(String),
}

/// The tally, the clock and the progress line of one run.
pub(crate) struct Status {
    tally: Tally,
    start: Instant,
    progress: Progress,
}

impl Status {
    pub(crate) fn new(read: usize) -> Status {
        Status {
            tally: Tally {
                read,
                ..Tally::default()
            },
            start: Instant::now(),
            progress: Progress::new(),
        }
    }

    /// Redraws the progress line if it is due.
    fn show(&mut self, note: Option<&str>) {
        let (tally, elapsed) = (&self.tally, self.start.elapsed());
        self.progress.update(|| tally.progress_line(elapsed, note));
    }

    /// Waits `d`, keeping the progress line fresh; returns early on `stop`.
    async fn pause(
        &mut self,
        d: Duration,
        note: &str,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let end = Instant::now() + d;
        loop {
            self.show(Some(note));
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(Stopped::Interrupted),
                _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
            }
        }
    }

    /// Ends the progress line and returns the summary.
    pub(crate) fn finish(&mut self) -> Summary {
        let elapsed = self.start.elapsed();
        self.progress
            .finish(&self.tally.progress_line(elapsed, None));
        Summary::new(&self.tally, elapsed)
    }
}

/// Sends one batch until the server has answered for every fix in it: waits out 429s as long
/// as the server says, retries 5xx answers and connection errors with backoff up to
/// `--retries` times, and stops on any other refusal with the server's message.
pub(crate) async fn deliver(
    sender: &Sender,
    fixes: &[Map<String, Value>],
    lines: &[Option<usize>],
    args: &SendArgs,
    status: &mut Status,
    stop: &CancellationToken,
) -> Result<(), Stopped> {
    let body = bytes::Bytes::from(ndjson_body(fixes));
    let mut failures = 0;
    loop {
        let reply = tokio::select! {
            _ = stop.cancelled() => return Err(Stopped::Interrupted),
            r = sender.post(body.clone(), lines) => r,
        };
        let why = match reply {
            Ok(Reply::Applied(outcome)) => {
                status.tally.add(lines, &outcome);
                status.show(None);
                return Ok(());
            }
            Ok(Reply::RateLimited(wait)) => {
                status.tally.rate_limited += 1;
                status
                    .pause(wait, "rate limited by the server", stop)
                    .await?;
                continue;
            }
            Ok(Reply::Fatal(why)) => return Err(Stopped::Failed(why)),
            Ok(Reply::Transient(why)) => why,
            Err(why) => why,
        };
        failures += 1;
        if failures > args.retries {
            return Err(Stopped::Failed(format!(
                "{} gave no answer after {} attempts: {why}",
                sender.positions_url(),
                failures
            )));
        }
        status.tally.retries += 1;
        let note = format!("retry {failures} of {}: {why}", args.retries);
        status.pause(backoff(failures), &note, stop).await?;
    }
}

/// The progress line on stderr: redrawn in place on a terminal, else one line every few
/// seconds (logs and CI keep every line).
struct Progress {
    tty: bool,
    every: Duration,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    fn new() -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            tty,
            every: if tty {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            },
            // Not a terminal: the first line after a few seconds, so a short run prints only
            // its summary.
            last: (!tty).then(Instant::now),
            drawn: false,
        }
    }

    fn update(&mut self, line: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return;
        }
        self.last = Some(now);
        if self.tty {
            eprint!("\r{}\x1b[K", line());
            self.drawn = true;
        } else {
            eprintln!("{}", line());
        }
    }

    fn finish(&mut self, line: &str) {
        if self.tty && self.drawn {
            eprintln!("\r{line}\x1b[K");
        }
    }
}
