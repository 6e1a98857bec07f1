//! `fleetcast publish` and `fleetcast sim --publish` as processes against `fleetcast serve
//! --feed ingest`: what the server holds afterwards, the summary and the exit status.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::{serve, Serve, BIN};
use fleetcast::fleet::parse_time;
use serde_json::Value;

const TOKEN: &str = "test-publisher-token-0123";

/// A shipped input file. `track.ndjson` (10 cars, 60 s at 1 Hz) was made with
/// `fleetcast sim --record tests/data/track.ndjson --cars 10 --duration 60s
/// --start-time 2026-11-29T14:00:00Z --seed 7`; `track.csv` and `track.gpx` by hand.
fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// A server that takes fixes from publishers with [`TOKEN`].
fn ingest_server(extra: &[&str]) -> Serve {
    let mut args = vec!["--feed", "ingest", "--publish-token", TOKEN];
    args.extend_from_slice(extra);
    serve(&args)
}

/// Runs `fleetcast publish` against `server` with the token in the environment.
fn publish(server: &Serve, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("publish")
        .args(["--url", &server.http_url()])
        .args(args)
        .env("FLEETCAST_PUBLISH_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output()
        .expect("fleetcast publish runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON summary on stdout.
fn summary(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// `GET /v1/cars`: every car the server holds, by id.
fn cars(server: &Serve) -> BTreeMap<String, Value> {
    let url = format!("{}/v1/cars", server.http_url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let list: Vec<Value> = rt.block_on(async {
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET /v1/cars");
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    });
    list.into_iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c))
        .collect()
}

/// Polls the server until `done` holds for its cars, or fails after 20 s.
fn wait_for_cars(
    server: &Serve,
    what: &str,
    done: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = cars(server);
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened; cars: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last fix of each car in NDJSON text.
fn last_fixes(ndjson: &str) -> BTreeMap<String, Value> {
    ndjson
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// Asserts the server holds exactly `expected`'s cars at their positions.
fn assert_held_at(held: &BTreeMap<String, Value>, expected: &BTreeMap<String, Value>) {
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (id, fix) in expected {
        let car = &held[id];
        assert_eq!(car["lat"], fix["lat"], "{id}: {car}");
        assert_eq!(car["lon"], fix["lon"], "{id}: {car}");
        assert_eq!(car["source"], "publisher", "{id}: {car}");
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[test]
fn publish_the_track_as_fast_as_allowed_and_the_server_holds_every_car_at_its_last_fix() {
    let server = ingest_server(&[]);
    let path = data("track.ndjson");
    let out = publish(&server, &["--json", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["read"], 600, "{s}");
    assert_eq!(s["sent"], 600, "{s}");
    assert_eq!(s["accepted"], 600, "{s}");
    assert_eq!(s["rejected"], 0, "{s}");
    assert_eq!(s["unsent"], 0, "{s}");
    assert_eq!(s["requests"], 2, "batches of 500: {s}");
    for text in [
        stderr(&out),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ] {
        assert!(!text.contains(TOKEN), "the token was printed: {text}");
    }
    let expected = last_fixes(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(expected.len(), 10);
    let held = cars(&server);
    assert_held_at(&held, &expected);
    for (id, fix) in &expected {
        assert_eq!(held[id]["time"], fix["time"], "recorded times kept: {id}");
        assert_eq!(held[id]["heading_deg"], fix["heading_deg"], "{id}");
    }

    // `fleetcast watch` sees the published cars: in its initial state once a tick has passed.
    let mut report = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new(BIN)
            .args(["watch", "--duration", "2s", "--json", "--url"])
            .arg(format!("https://localhost:{}/positions", server.wt_port))
            .arg("--cert-hash-url")
            .arg(format!("{}/certificate.sha256", server.http_url()))
            .output()
            .expect("watch runs");
        assert!(out.status.success(), "{}", stderr(&out));
        report = serde_json::from_slice(&out.stdout).expect("one JSON object");
        if report["initial_cars"] == 10 {
            break;
        }
    }
    assert_eq!(report["initial_cars"], 10, "{report}");
    assert_eq!(report["cars"], 10, "{report}");
    assert!(report["ticks_received"].as_u64().unwrap() >= 1, "{report}");
}

#[test]
fn publish_under_a_tight_rate_limit_waits_out_every_429_and_loses_nothing() {
    let server = ingest_server(&["--ingest-rate", "2"]);
    let path = data("track.ndjson");
    let out = publish(&server, &["--batch", "50", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.starts_with("read 600 fixes, sent 600 in 12 requests: 600 accepted, 0 rejected"),
        "{text}"
    );
    let waited: u64 = text
        .split("waited out ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the summary counts the 429s: {text}"));
    assert!(waited >= 1, "{text}");
}

#[test]
fn publish_reports_a_rejected_fix_by_line_and_reason_and_exits_1() {
    let server = ingest_server(&[]);
    let track = std::fs::read_to_string(data("track.ndjson")).unwrap();
    let mut lines: Vec<String> = track.lines().take(20).map(str::to_string).collect();
    let mut bad: Value = serde_json::from_str(&lines[6]).unwrap();
    bad["lat"] = 10.0.into();
    lines[6] = bad.to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.ndjson");
    std::fs::write(&file, lines.join("\n")).unwrap();

    let out = publish(&server, &["--json", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(
        (s["accepted"].as_u64(), s["rejected"].as_u64()),
        (Some(19), Some(1)),
        "{s}"
    );
    let r = &s["rejections"][0];
    assert_eq!(r["line"], 7, "{s}");
    assert_eq!(r["id"], bad["id"], "{s}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("outside the served area"),
        "{s}"
    );

    // The same in words (to a fresh server: this one holds newer fixes now).
    let server = ingest_server(&[]);
    let out = publish(&server, &[file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 rejected"), "{text}");
    assert!(
        text.contains(&format!(
            "line 7: {}: position 10, ",
            bad["id"].as_str().unwrap()
        )),
        "{text}"
    );
}

#[test]
fn publish_with_replay_speed_paces_and_rewrites_times_to_now() {
    let server = ingest_server(&[]);
    // The first five seconds of the track: recorded times 14:00:00 to 14:00:05.
    let track = std::fs::read_to_string(data("track.ndjson")).unwrap();
    let slice: Vec<&str> = track
        .lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["time"].as_str().unwrap() <= "2026-11-29T14:00:05Z"
        })
        .collect();
    assert_eq!(slice.len(), 60);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slice.ndjson");
    std::fs::write(&file, slice.join("\n")).unwrap();

    let before_us = now_us();
    let started = Instant::now();
    let out = publish(
        &server,
        &["--json", "--replay-speed", "20", file.to_str().unwrap()],
    );
    let took = started.elapsed();
    let after_us = now_us();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(summary(&out)["accepted"], 60);
    // Five recorded seconds at 20x: at least 0.25 s (a lower bound only).
    assert!(took >= Duration::from_millis(250), "took {took:?}");
    let held = cars(&server);
    assert_held_at(&held, &last_fixes(&slice.join("\n")));
    for (id, car) in &held {
        let t = parse_time(car["time"].as_str().unwrap()).unwrap();
        // Rewritten to the wall-clock moment each fix represents: during the run (the
        // milliseconds are truncated, hence the slack below).
        assert!(
            t + 1_000 >= before_us && t <= after_us,
            "{id}: time {} is not from the run",
            car["time"]
        );
    }
}

#[test]
fn sim_publish_puts_its_cars_into_an_ingest_server() {
    let server = ingest_server(&[]);
    let sim = Command::new(BIN)
        .args([
            "sim",
            "--cars",
            "20",
            "--duration",
            "3s",
            "--json",
            "--publish",
        ])
        .arg(server.http_url())
        .env("FLEETCAST_PUBLISH_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleetcast sim runs");
    let started_us = now_us();
    let held = wait_for_cars(&server, "20 simulated cars", |c| c.len() == 20);
    let out = sim.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    let read = s["read"].as_u64().unwrap();
    assert!(
        read >= 20 && read.is_multiple_of(20),
        "whole ticks of 20 cars: {s}"
    );
    assert_eq!(s["accepted"].as_u64(), Some(read), "{s}");
    assert_eq!(s["rejected"], 0, "{s}");
    let ids: Vec<&String> = held.keys().collect();
    assert_eq!(ids[0], "FC-0001");
    assert_eq!(ids[19], "FC-0020");
    for car in held.values() {
        assert_eq!(car["source"], "publisher");
        let t = parse_time(car["time"].as_str().unwrap()).unwrap();
        assert!(t + 5_000_000 >= started_us, "timed now: {car}");
    }
}

#[test]
fn publish_csv_round_trip() {
    let server = ingest_server(&[]);
    let out = publish(&server, &["--json", data("track.csv").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(summary(&out)["accepted"], 9);
    let held = cars(&server);
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        ["bike-5", "truck-17", "van-2"]
    );
    let truck = &held["truck-17"];
    assert_eq!(
        (truck["lat"].as_f64(), truck["lon"].as_f64()),
        (Some(52.3702), Some(4.8956))
    );
    assert_eq!(truck["label"], "Truck 17, refrigerated");
    assert_eq!(
        (truck["heading_deg"].as_f64(), truck["speed_mps"].as_f64()),
        (Some(90.0), Some(13.0))
    );
    assert_eq!(truck["time"], "2026-11-29T14:00:02Z");
    assert_eq!(held["van-2"]["label"], "Van \"Blue\" 2");
    assert_eq!(held["van-2"]["lat"].as_f64(), Some(52.3602));
    assert_eq!(
        held["bike-5"]["label"], "Bike 5",
        "relabelled by its last row"
    );
}

#[test]
fn publish_gpx_tracks_by_name() {
    let server = ingest_server(&[]);
    let out = publish(&server, &["--json", data("track.gpx").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(summary(&out)["accepted"], 5);
    let held = cars(&server);
    assert_eq!(held.keys().collect::<Vec<_>>(), ["Ferry & Co", "tram-4"]);
    assert_eq!(held["tram-4"]["lat"].as_f64(), Some(52.3706));
    assert_eq!(held["tram-4"]["time"], "2026-11-29T14:00:02Z");
}

#[test]
fn publish_stops_before_sending_on_a_bad_line_or_a_wrong_token() {
    let server = ingest_server(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.ndjson");
    std::fs::write(
        &file,
        "{\"id\":\"a\",\"lat\":52.36,\"lon\":4.87}\n\n{\"id\":\"b\",\"lat\":52.36,,}\n",
    )
    .unwrap();
    let out = publish(&server, &[file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("broken.ndjson:3: column"), "{err}");
    assert!(cars(&server).is_empty(), "nothing was sent");

    let out = Command::new(BIN)
        .args(["publish", "--url", &server.http_url(), "--token"])
        .arg("a-wrong-token-of-some-length")
        .arg(data("track.csv"))
        .env_remove("FLEETCAST_PUBLISH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("did not accept the token (401)"), "{err}");
    assert!(
        !err.contains("a-wrong-token"),
        "the token was printed: {err}"
    );
    assert_eq!(
        summary_text_unsent(&out),
        9,
        "every fix counted as not sent"
    );
}

/// The `NOT SENT: N fixes` count of a text summary.
fn summary_text_unsent(out: &Output) -> u64 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("NOT SENT: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no NOT SENT count: {text}"))
}
