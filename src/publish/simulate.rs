//! `fleetcast sim`: the built-in simulator outside the server, as an external publisher
//! (`--publish URL`) or as a recorder of NDJSON fixes (`--record FILE`).
//!
//! Both modes share one pure core, [`sim_fixes`]: the simulator's cars at a moment, as the
//! fix objects a publisher sends.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{deliver, Finished, SendArgs, Status, Stopped};
use crate::fleet::{format_time, parse_time, Area};
use crate::server::config::{parse_duration, AreaArgs, SimArgs};
use crate::server::now_us;
use crate::sim::Simulator;

/// `fleetcast sim` options.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["publish", "record"]))]
pub struct SimCommandArgs {
    /// Publish to the server at this HTTP address (`http://HOST:8080`) every tick, each fix
    /// timed now.
    #[arg(long, value_name = "URL")]
    pub publish: Option<String>,

    /// Write NDJSON fixes for --duration of simulated time to FILE (`-`: stdout), without
    /// waiting.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,

    /// The area; the same options and defaults as `serve`, so both agree on where cars are.
    #[command(flatten)]
    pub area: AreaArgs,

    /// The simulated fleet.
    #[command(flatten)]
    pub sim: SimArgs,

    /// Time between the fixes of one car, milliseconds.
    #[arg(long, env = "FLEETCAST_SIM_TICK_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(10..=60_000))]
    pub tick_ms: u32,

    /// How long to run (publish: wall-clock time; record: simulated time, required);
    /// default for publish: until Ctrl-C.
    #[arg(long, env = "FLEETCAST_SIM_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Time of the first recorded fix, RFC 3339 (record only); default: now.
    #[arg(long, value_parser = parse_start_time, requires = "record")]
    pub start_time: Option<u64>,

    /// Token, batch size, retries and timeout.
    #[command(flatten)]
    pub send: SendArgs,

    /// Print the publishing summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_start_time(s: &str) -> Result<u64, String> {
    parse_time(s.trim())
}

/// Rounds to `decimals` decimal places (shorter files; 7 for degrees is ~1 cm).
fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Every simulated car's fix at `time_us` (µs since the Unix epoch): id = the car's label,
/// position from the area's quantisation origin, heading and speed from the simulator.
pub fn sim_fixes(sim: &Simulator, area: &Area, time_us: u64) -> Vec<Map<String, Value>> {
    let time = format_time(time_us);
    sim.labelled_motions()
        .into_iter()
        .map(|(label, m)| {
            let (lat, lon) = area.quant.to_lat_lon(m.east_m, m.north_m);
            let v = json!({
                "id": label,
                "lat": round(lat, 7),
                "lon": round(lon, 7),
                "heading_deg": round(m.heading_deg, 1),
                "speed_mps": round(m.speed_mps, 2),
                "time": time,
            });
            match v {
                Value::Object(map) => map,
                // Invariant: `json!({...})` is an object.
                _ => unreachable!("a json! object literal"),
            }
        })
        .collect()
}

/// What `--record` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Fix lines written.
    pub fixes: usize,
    /// Ticks simulated.
    pub ticks: u64,
}

/// Writes NDJSON fixes for `duration` of simulated time: one fix per car per tick, the first
/// tick at `start_us`. Pure apart from the writer.
pub fn record(
    sim: &mut Simulator,
    area: &Area,
    tick: Duration,
    duration: Duration,
    start_us: u64,
    churn_ticks: u64,
    out: &mut impl Write,
) -> std::io::Result<Recorded> {
    let tick_us = tick.as_micros() as u64;
    let duration_us = duration.as_micros() as u64;
    let mut done = Recorded { fixes: 0, ticks: 0 };
    while done.ticks * tick_us < duration_us {
        if done.ticks > 0 {
            sim.step(tick.as_secs_f64());
            if churn_ticks > 0 && done.ticks.is_multiple_of(churn_ticks) {
                sim.churn();
            }
        }
        for fix in sim_fixes(sim, area, start_us + done.ticks * tick_us) {
            serde_json::to_writer(&mut *out, &fix)?;
            out.write_all(b"\n")?;
            done.fixes += 1;
        }
        done.ticks += 1;
    }
    out.flush()?;
    Ok(done)
}

/// The area and a fresh simulator from the options.
fn setup(args: &SimCommandArgs) -> Result<(Area, Simulator)> {
    let area = args.area.area().map_err(|e| anyhow!(e))?;
    let sim = Simulator::new(&args.sim.config(area.side_m()));
    Ok((area, sim))
}

/// Runs `fleetcast sim`: publishes until `--duration` or `stop` (and returns how that went), or
/// records (and returns `None`).
pub async fn run(args: SimCommandArgs, stop: CancellationToken) -> Result<Option<Finished>> {
    if args.publish.is_some() {
        return run_publish(&args, stop).await.map(Some);
    }
    let path = args.record.clone().unwrap_or_default();
    let recorded = tokio::task::spawn_blocking(move || run_record(&args)).await??;
    info!(
        "recorded {} fixes ({} ticks) to {}",
        recorded.fixes,
        recorded.ticks,
        path.display()
    );
    Ok(None)
}

/// `fleetcast sim --record`: blocking file output; call it off the async runtime.
pub fn run_record(args: &SimCommandArgs) -> Result<Recorded> {
    let path = args
        .record
        .as_ref()
        .ok_or_else(|| anyhow!("--record FILE is needed"))?;
    let duration = args
        .duration
        .ok_or_else(|| anyhow!("--record needs --duration: how much simulated time to write"))?;
    let (area, mut sim) = setup(args)?;
    let start_us = args.start_time.unwrap_or_else(now_us);
    let tick = Duration::from_millis(u64::from(args.tick_ms));
    let churn = args.sim.churn_ticks;
    let recorded = if path.as_os_str() == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        record(&mut sim, &area, tick, duration, start_us, churn, &mut out)
    } else {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        record(&mut sim, &area, tick, duration, start_us, churn, &mut out)
    };
    recorded.with_context(|| format!("writing {}", path.display()))
}

/// `fleetcast sim --publish`: every tick, every car's fix timed now, until `--duration` or
/// `stop`.
pub async fn run_publish(args: &SimCommandArgs, stop: CancellationToken) -> Result<Finished> {
    let url = args
        .publish
        .as_deref()
        .ok_or_else(|| anyhow!("--publish URL is needed"))?;
    let sender = args.send.sender(url)?;
    let (area, mut sim) = setup(args)?;
    let period = Duration::from_millis(u64::from(args.tick_ms));
    let start = Instant::now();
    let mut interval = tokio::time::interval_at(start, period);
    // A slow server delays ticks; carry on from now instead of bursting the missed ones.
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut status = Status::new(0);
    let mut stepped = start;
    let mut tick: u64 = 0;
    let batch = args.send.batch as usize;
    let error = 'ticks: loop {
        let at = tokio::select! {
            _ = stop.cancelled() => break None,
            at = interval.tick() => at,
        };
        if args.duration.is_some_and(|d| at.duration_since(start) >= d) {
            break None;
        }
        if tick > 0 {
            // Live: the cars move as far as the wall clock did.
            sim.step(at.duration_since(stepped).as_secs_f64());
            stepped = at;
            let churn = args.sim.churn_ticks;
            if churn > 0 && tick.is_multiple_of(churn) {
                if let Some((gone, _)) = sim.churn() {
                    if let Err(e) = sender.delete_car(&gone).await {
                        warn!("removing car {gone} from the server: {e}");
                    }
                }
            }
        }
        tick += 1;
        let fixes = sim_fixes(&sim, &area, now_us());
        status.tally.read += fixes.len();
        let lines = vec![None; fixes.len()];
        for (chunk, lines) in fixes.chunks(batch).zip(lines.chunks(batch)) {
            match deliver(&sender, chunk, lines, &args.send, &mut status, &stop).await {
                Ok(()) => {}
                // Ctrl-C is how an open-ended simulation ends.
                Err(Stopped::Interrupted) => break 'ticks None,
                Err(Stopped::Failed(why)) => break 'ticks Some(anyhow!("tick {tick}: {why}")),
            }
        }
        let note = format!("tick {tick}");
        status.show(Some(&note));
    };
    let summary = status.finish();
    Ok(Finished { summary, error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::fix_from_json;
    use crate::sim::SimConfig;

    fn setup(cars: u32) -> (Area, Simulator) {
        let area = Area::square(52.35, 4.86, 4000.0).unwrap();
        let sim = Simulator::new(&SimConfig {
            cars,
            area_m: area.side_m(),
            block_m: 400.0,
            seed: 7,
        });
        (area, sim)
    }

    #[test]
    fn sim_fixes_are_valid_fixes_inside_the_area_named_by_label() {
        let (area, sim) = setup(5);
        let t = parse_time("2026-11-29T14:00:00Z").unwrap();
        let fixes = sim_fixes(&sim, &area, t);
        assert_eq!(fixes.len(), 5);
        for (fix, (label, m)) in fixes.iter().zip(sim.labelled_motions()) {
            assert_eq!(fix["id"], label);
            assert_eq!(fix["time"], "2026-11-29T14:00:00Z");
            let valid = fix_from_json(Value::Object(fix.clone()), &area).unwrap();
            let (east, north) = area.to_metres(valid.lat, valid.lon);
            assert!((east - m.east_m).abs() < 0.02 && (north - m.north_m).abs() < 0.02);
            assert!((valid.speed_mps.unwrap() - m.speed_mps).abs() <= 0.005);
        }
    }

    #[test]
    fn record_writes_one_fix_per_car_per_tick_with_advancing_times() {
        let (area, mut sim) = setup(3);
        let t0 = parse_time("2026-11-29T14:00:00Z").unwrap();
        let mut out = Vec::new();
        let done = record(
            &mut sim,
            &area,
            Duration::from_millis(500),
            Duration::from_millis(1200),
            t0,
            0,
            &mut out,
        )
        .unwrap();
        assert_eq!(done, Recorded { fixes: 9, ticks: 3 });
        let records =
            crate::publish::input::read_ndjson(std::str::from_utf8(&out).unwrap()).unwrap();
        let times: Vec<&str> = records
            .iter()
            .map(|r| r.fix["time"].as_str().unwrap())
            .collect();
        assert_eq!(
            times,
            [
                ["2026-11-29T14:00:00Z"; 3],
                ["2026-11-29T14:00:00.5Z"; 3],
                ["2026-11-29T14:00:01Z"; 3]
            ]
            .concat()
        );
        let at = |i: usize| (records[i].fix["lat"].clone(), records[i].fix["lon"].clone());
        assert_ne!(at(0), at(6), "cars move");
        // The same seed records the same fixes.
        let (_, mut again) = setup(3);
        let mut out2 = Vec::new();
        record(
            &mut again,
            &area,
            Duration::from_millis(500),
            Duration::from_millis(1200),
            t0,
            0,
            &mut out2,
        )
        .unwrap();
        assert_eq!(out, out2);
    }

    #[test]
    fn record_with_churn_replaces_a_car() {
        let (area, mut sim) = setup(2);
        let mut out = Vec::new();
        record(
            &mut sim,
            &area,
            Duration::from_secs(1),
            Duration::from_secs(3),
            0,
            2,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            ids,
            ["FC-0001", "FC-0002", "FC-0001", "FC-0002", "FC-0002", "FC-0003"]
        );
    }
}
