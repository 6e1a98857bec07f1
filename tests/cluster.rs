//! Many nodes joined by a real `nats-server`: every node's sessions get the same ticks, byte
//! for byte, from one ticker; the ticker, a node and NATS itself die in turn.
//!
//! Every node is a real `fleetcast serve` process, killed with SIGKILL when a test kills it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::nats::{node, Nats, TOKEN};
use common::process::Serve;
use fleetcast::client::{self, ClientOptions, Event, Session, Trust};
use fleetcast::proto::view::FleetView;
use fleetcast::proto::wire::TickPart;
use serde_json::{json, Value};
use wtransport::endpoint::endpoint_side;
use wtransport::Endpoint;

/// Fast ticks and a short lease keep the tests short: the ticker's death must be noticed
/// within 1 s plus one 250 ms tick.
const FAST: &[&str] = &["--tick-ms", "250", "--lease", "1s"];

async fn get_json(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn health(node: &Serve) -> Value {
    get_json(&format!("{}/healthz", node.http_url())).await.1
}

/// `n` cars `car-0..n` in the default area, as a JSON batch, at fix time now.
fn fixes(n: usize, step: f64) -> Value {
    let cars: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "id": format!("car-{i}"),
                "lat": 52.355 + (i as f64) * 0.0002 + step * 0.00001,
                "lon": 4.865 + (i as f64) * 0.0003,
                "heading_deg": 90.0,
                "speed_mps": 10.0,
            })
        })
        .collect();
    Value::Array(cars)
}

/// POSTs a batch to a node: its status and answer.
async fn post(node: &Serve, batch: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/positions", node.http_url()))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Waits until `check` holds for a node's `/healthz`, for at most `limit`; returns it.
async fn health_until(node: &Serve, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let h = health(node).await;
        if check(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node holding the ticker lease, once exactly one does and every node follows it.
async fn ticker_of(nodes: &[&Serve], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let mut tickers = Vec::new();
        let mut followed = BTreeSet::new();
        for (i, n) in nodes.iter().enumerate() {
            let h = health(n).await;
            if h["ticker"] == true {
                tickers.push(i);
            }
            followed.insert(h["cluster"]["ticker_node"].to_string());
        }
        if tickers.len() == 1 && followed.len() == 1 && !followed.contains("null") {
            return tickers[0];
        }
        assert!(
            Instant::now() < deadline,
            "no single ticker within {limit:?}: tickers {tickers:?}, followed {followed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A session on a node, recording every datagram payload by tick.
struct Watcher {
    _endpoint: Endpoint<endpoint_side::Client>,
    session: Session,
    view: FleetView,
    /// Every datagram payload received, by tick, in arrival order.
    ticks: BTreeMap<u64, Vec<Bytes>>,
}

impl Watcher {
    async fn open(node: &Serve) -> Watcher {
        let hashes = client::fetch_cert_hashes(&format!("{}/certificate.sha256", node.http_url()))
            .await
            .unwrap()
            .expect("self-signed");
        let endpoint = client::endpoint(&ClientOptions::new(Trust::Hashes(hashes))).unwrap();
        let url = format!("https://[::1]:{}/positions", node.wt_port);
        let session = client::open(&endpoint, &url, None).await.unwrap();
        Watcher {
            _endpoint: endpoint,
            session,
            view: FleetView::new(),
            ticks: BTreeMap::new(),
        }
    }

    /// Reads until `done` holds (checked after every event) or `limit` passes.
    async fn until(&mut self, limit: Duration, what: &str, mut done: impl FnMut(&Watcher) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            let event = tokio::time::timeout_at(deadline, self.session.next())
                .await
                .unwrap_or_else(|_| panic!("not within {limit:?}: {what}"));
            match event.unwrap_or_else(|e| panic!("session ended: {e} (waiting for: {what})")) {
                Event::Message(msg) => self.view.apply_message(msg),
                Event::Datagram(bytes) => {
                    let part = TickPart::decode(&bytes).expect("datagrams decode");
                    self.view.apply_part(&part);
                    self.ticks.entry(part.tick).or_default().push(bytes);
                }
            }
        }
    }

    /// Ticks whose every part arrived, with all their cars: tick → (ids, payloads sorted).
    fn complete(&self) -> BTreeMap<u64, Vec<Bytes>> {
        self.ticks
            .iter()
            .filter_map(|(&tick, parts)| {
                let parts_total = TickPart::decode(&parts[0]).unwrap().parts as usize;
                let mut sorted = parts.clone();
                sorted.sort_by_key(|p| TickPart::decode(p).unwrap().part);
                sorted.dedup();
                (sorted.len() == parts_total).then_some((tick, sorted))
            })
            .collect()
    }

    fn newest_tick(&self) -> Option<u64> {
        self.ticks.keys().next_back().copied()
    }

    /// Ids of the newest complete tick.
    fn newest_ids(&self) -> BTreeSet<u32> {
        let complete = self.complete();
        let Some((_, parts)) = complete.iter().next_back() else {
            return BTreeSet::new();
        };
        parts
            .iter()
            .flat_map(|p| TickPart::decode(p).unwrap().cars.0)
            .map(|c| c.id)
            .collect()
    }

    fn labels(&self) -> BTreeMap<u32, String> {
        self.view
            .cars()
            .iter()
            .map(|(&id, c)| (id, c.label.clone()))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_forward_byte_identical_ticks_from_one_ticker() {
    let nats = Nats::start();
    let nodes: Vec<Serve> = (0..3)
        .map(|i| node(&nats, "same", &format!("n{i}"), FAST))
        .collect();
    let all: Vec<&Serve> = nodes.iter().collect();
    let ticker = ticker_of(&all, Duration::from_secs(20)).await;

    // A publisher reports 100 cars to one node; the others never hear from it.
    let (status, answer) = post(&nodes[(ticker + 1) % 3], &fixes(100, 0.0)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 100, "{answer}");

    let mut watchers = Vec::new();
    for n in &nodes {
        watchers.push(Watcher::open(n).await);
    }
    // Every session, on every node, sees the whole fleet for ten complete ticks.
    for w in watchers.iter_mut() {
        w.until(
            Duration::from_secs(20),
            "10 complete ticks of 100 cars",
            |w| {
                w.labels().len() == 100
                    && w.complete()
                        .values()
                        .filter(|parts| {
                            parts
                                .iter()
                                .map(|p| TickPart::decode(p).unwrap().cars.0.len())
                                .sum::<usize>()
                                == 100
                        })
                        .count()
                        >= 10
            },
        )
        .await;
    }
    // The same roster (wire ids and labels) everywhere.
    let labels = watchers[0].labels();
    assert_eq!(labels.len(), 100);
    for w in &watchers[1..] {
        assert_eq!(w.labels(), labels, "every node has the same roster");
    }
    // The same tick numbers with the same payload bytes, over the ticks all three saw.
    let complete: Vec<_> = watchers.iter().map(Watcher::complete).collect();
    let first = complete
        .iter()
        .map(|c| *c.keys().next().unwrap())
        .max()
        .unwrap();
    let last = complete
        .iter()
        .map(|c| *c.keys().next_back().unwrap())
        .min()
        .unwrap();
    assert!(
        last >= first + 5,
        "at least six ticks in common: {first}..={last}"
    );
    let range = |c: &BTreeMap<u64, Vec<Bytes>>| -> Vec<(u64, Vec<Bytes>)> {
        c.range(first..=last)
            .map(|(t, p)| (*t, p.clone()))
            .collect()
    };
    let reference = range(&complete[0]);
    for (i, c) in complete.iter().enumerate().skip(1) {
        let mine = range(c);
        let ticks: Vec<u64> = mine.iter().map(|(t, _)| *t).collect();
        let expected: Vec<u64> = reference.iter().map(|(t, _)| *t).collect();
        assert_eq!(ticks, expected, "node {i} got the same tick numbers");
        assert_eq!(mine, reference, "node {i} got byte-identical payloads");
    }
    // Tick numbers are wall-clock tick boundaries: 250 ms intervals since the Unix epoch.
    let now_tick = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        / 250) as u64;
    assert!(
        last <= now_tick && last + 40 > now_tick,
        "tick {last} vs now {now_tick}"
    );
    // Exactly one ticker, named by every node.
    assert_eq!(ticker_of(&all, Duration::from_secs(1)).await, ticker);
    let h = health(&nodes[ticker]).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert!(
        h["counters"]["cluster_ticks_published"].as_u64().unwrap() > 0,
        "{h}"
    );
    for (i, n) in nodes.iter().enumerate() {
        let h = health(n).await;
        assert_eq!(h["ticker"], i == ticker, "{h}");
        assert_eq!(h["counters"]["cluster_ticks_foreign"], 0, "{h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticker_dies_and_another_node_continues_its_fleet_and_tick_sequence() {
    let nats = Nats::start();
    let mut nodes: Vec<Serve> = (0..3)
        .map(|i| node(&nats, "death", &format!("n{i}"), FAST))
        .collect();
    let ticker = ticker_of(&nodes.iter().collect::<Vec<_>>(), Duration::from_secs(20)).await;
    let edge = (ticker + 1) % 3;
    let (status, answer) = post(&nodes[edge], &fixes(100, 0.0)).await;
    assert_eq!(status, 200, "{answer}");

    let mut w = Watcher::open(&nodes[edge]).await;
    w.until(
        Duration::from_secs(20),
        "a complete tick of 100 cars",
        |w| w.newest_ids().len() == 100 && w.labels().len() == 100,
    )
    .await;
    let ids_before = w.newest_ids();
    let labels_before = w.labels();

    // SIGKILL: no goodbye, no lease released. The lease expires at NATS.
    let killed_at = Instant::now();
    let mut dead = nodes.remove(ticker);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let last_before = w.newest_tick().unwrap();
    let survivors: Vec<&Serve> = nodes.iter().collect();
    ticker_of(&survivors, Duration::from_secs(20)).await;
    w.until(Duration::from_secs(20), "ticks from the new ticker", |w| {
        w.newest_tick().unwrap() > last_before + 1 && w.newest_ids().len() == 100
    })
    .await;
    let taken = killed_at.elapsed();
    // The new ticker continued: same cars, same wire ids, same labels, later tick numbers.
    assert_eq!(
        w.newest_ids(),
        ids_before,
        "the same wire ids after the failover"
    );
    assert_eq!(
        w.labels(),
        labels_before,
        "no roster change from a failover"
    );
    let after: Vec<u64> = w
        .ticks
        .keys()
        .copied()
        .filter(|&t| t > last_before)
        .collect();
    // The gap in tick numbers is the time without a ticker: the lease (1 s = 4 ticks) plus
    // one tick, and at most two ticks' slack for this shared machine's scheduling.
    let gap = after[0] - last_before - 1;
    println!("failover: {gap} ticks missed, new ticks seen {taken:?} after SIGKILL");
    assert!(gap <= 4 + 1 + 2, "{gap} ticks without a ticker");
    // Nothing went backwards and no number came twice with different bytes (the watcher
    // keys by number: a second content for a number would show as extra parts).
    for (tick, parts) in &w.ticks {
        let total = TickPart::decode(&parts[0]).unwrap().parts as usize;
        let distinct: BTreeSet<&Bytes> = parts.iter().collect();
        assert!(
            distinct.len() <= total,
            "tick {tick} came with two contents"
        );
    }
    // Ingest goes to the new ticker.
    let (status, answer) = post(&nodes[0], &fixes(100, 1.0)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 100, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_keeps_sessions_refuses_ingest_and_recovers_without_restarts() {
    let mut nats = Nats::start();
    let nodes: Vec<Serve> = (0..2)
        .map(|i| node(&nats, "outage", &format!("n{i}"), FAST))
        .collect();
    ticker_of(&nodes.iter().collect::<Vec<_>>(), Duration::from_secs(20)).await;
    assert_eq!(post(&nodes[0], &fixes(10, 0.0)).await.0, 200);
    let mut watchers = Vec::new();
    for n in &nodes {
        let mut w = Watcher::open(n).await;
        w.until(Duration::from_secs(20), "ticks with 10 cars", |w| {
            w.newest_ids().len() == 10
        })
        .await;
        watchers.push(w);
    }

    nats.kill();
    for n in &nodes {
        let h = health_until(n, Duration::from_secs(10), |h| {
            h["status"] == "degraded" && h["cluster"]["nats_connected"] == false
        })
        .await;
        assert_eq!(h["ticker"], false, "nobody ticks without NATS: {h}");
        assert!(
            h["reason"].as_str().unwrap().contains("NATS unreachable"),
            "{h}"
        );
        let (status, metrics) = {
            let r = reqwest::get(format!("{}/metrics", n.http_url()))
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(status, 200);
        assert!(metrics.contains("fleetcast_nats_connected 0"), "{metrics}");
        let (status, answer) = post(n, &fixes(10, 1.0)).await;
        assert_eq!(status, 503, "ingest without NATS: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("NATS"),
            "{answer}"
        );
    }
    // /healthz stays 200 (degraded): restarting a node would not bring NATS back.
    let response = reqwest::get(format!("{}/healthz", nodes[0].http_url()))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let stalled: Vec<u64> = watchers.iter().map(|w| w.newest_tick().unwrap()).collect();

    nats.restart();
    ticker_of(&nodes.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    // The same sessions (never closed) get ticks again, with the fleet from before.
    for (w, stalled) in watchers.iter_mut().zip(stalled) {
        w.until(Duration::from_secs(20), "ticks after NATS returned", |w| {
            w.newest_tick().unwrap() > stalled + 1 && w.newest_ids().len() == 10
        })
        .await;
    }
    for n in &nodes {
        health_until(n, Duration::from_secs(10), |h| {
            h["status"] == "ok" && h["cluster"]["nats_connected"] == true
        })
        .await;
    }
    let (status, answer) = post(&nodes[1], &fixes(12, 2.0)).await;
    assert_eq!(status, 200, "{answer}");
    for w in watchers.iter_mut() {
        w.until(Duration::from_secs(20), "the two new cars", |w| {
            w.newest_ids().len() == 12 && w.labels().len() == 12
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_ticks_on_nats_counts_them_and_resyncs_its_roster() {
    let nats = Nats::start();
    // 40 ms ticks: a node stopped for 6 s has ~150 ticks waiting, more than its
    // subscription holds (64), so NATS messages are really lost, roster events among them.
    let fast = ["--tick-ms", "40", "--lease", "1s"];
    let nodes: Vec<Serve> = (0..2)
        .map(|i| node(&nats, "slow", &format!("n{i}"), &fast))
        .collect();
    let ticker = ticker_of(&nodes.iter().collect::<Vec<_>>(), Duration::from_secs(20)).await;
    let (slow, ticker_node) = (&nodes[1 - ticker], &nodes[ticker]);
    assert_eq!(post(ticker_node, &fixes(20, 0.0)).await.0, 200);
    let mut w = Watcher::open(slow).await;
    w.until(Duration::from_secs(20), "20 cars", |w| {
        w.labels().len() == 20 && w.newest_ids().len() == 20
    })
    .await;

    // Stop the slow node's process: it reads nothing while the fleet changes.
    let pid = slow.child.id().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let resumed = async {
        // Past the first 64 ticks: the ones the node's subscription keeps; the roster
        // changes go out in ticks NATS has to drop.
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        // Cars 0..10 leave, cars 20..30 join (a new batch only reports 10..30).
        for id in 0..10 {
            let response = reqwest::Client::new()
                .delete(format!("{}/v1/cars/car-{id}", ticker_node.http_url()))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
        }
        let joined: Vec<Value> = (20..30)
            .map(|i| json!({"id": format!("car-{i}"), "lat": 52.36, "lon": 4.87}))
            .collect();
        assert_eq!(post(ticker_node, &Value::Array(joined)).await.0, 200);
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    };
    resumed.await;
    signal("-CONT");

    // The session ends up with exactly the cluster's roster, never a stale one.
    let (_, cars) = {
        let r = reqwest::Client::new()
            .get(format!("{}/v1/cars", ticker_node.http_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (
            r.status(),
            serde_json::from_str::<Vec<Value>>(&r.text().await.unwrap()).unwrap(),
        )
    };
    let expected: BTreeMap<u32, String> = cars
        .iter()
        .map(|c| {
            (
                c["wire_id"].as_u64().unwrap() as u32,
                c["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(expected.len(), 20);
    w.until(Duration::from_secs(20), "the roster after the loss", |w| {
        w.labels() == expected && w.newest_ids() == expected.keys().copied().collect()
    })
    .await;
    let h = health(slow).await;
    let counters: HashMap<String, u64> = serde_json::from_value(h["counters"].clone()).unwrap();
    assert!(counters["cluster_ticks_missed"] > 0, "{h}");
    assert!(
        counters["cluster_resyncs"] > 0,
        "lost roster events mean a resync: {h}"
    );
    let metrics = reqwest::get(format!("{}/metrics", slow.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let slow_consumer = metrics
        .lines()
        .find(|l| l.starts_with("fleetcast_nats_events_total{event=\"slow_consumer\"}"))
        .unwrap();
    assert!(!slow_consumer.ends_with(" 0"), "{slow_consumer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_moves_to_a_node_from_the_servers_list_when_its_node_dies() {
    let nats = Nats::start();
    let second = node(&nats, "move", "n1", FAST);
    let listed = format!("http://127.0.0.1:{}", second.http_port);
    let mut extra = FAST.to_vec();
    extra.extend(["--servers", listed.as_str()]);
    let mut first = node(&nats, "move", "n0", &extra);
    ticker_of(&[&first, &second], Duration::from_secs(20)).await;
    assert_eq!(post(&first, &fixes(10, 0.0)).await.0, 200);
    let (_, config) = get_json(&format!("{}/config.json", first.http_url())).await;
    assert_eq!(config["servers"], json!([listed]), "{config}");

    // `watch` is told only of the first node; its /config.json names the second.
    let watch = std::process::Command::new(common::process::BIN)
        .args(["watch", "--server", &first.http_url(), "--duration", "14s"])
        .args(["--json", "--max-backoff", "1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    health_until(&first, Duration::from_secs(10), |h| h["sessions"] == 1).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    health_until(&second, Duration::from_secs(10), |h| h["sessions"] == 1).await;
    let output = tokio::task::spawn_blocking(move || watch.wait_with_output().unwrap())
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["sessions"].as_u64().unwrap() >= 2, "{report}");
    let urls = report["session_urls"].as_array().unwrap();
    assert_eq!(urls.len(), 2, "one session URL per node: {report}");
    assert!(
        urls[1]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}/positions", second.wt_port)),
        "{report}"
    );
    assert_eq!(report["cars"], 10, "{report}");
}
