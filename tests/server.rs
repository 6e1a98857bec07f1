//! End-to-end tests: a real server and real WebTransport clients on loopback sockets.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::relay::{Impairment, Relay};
use common::{follow, initial_state, TestServer};
use fleetcast::client::{self, Event};
use fleetcast::proto::view::FleetView;
use fleetcast::proto::wire::{CloseCode, StreamMessage, TickPart};

type Fix = (u64, (f64, f64));

#[tokio::test]
async fn session_gets_full_initial_state_then_consecutive_moving_ticks() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep, mut session) = ts.open().await;
    let mut view = initial_state(&mut session).await;
    let hello = view.hello().expect("hello comes first").clone();
    assert_eq!(hello.version, 1);
    assert_eq!(hello.tick_interval_ms, 100);
    assert_eq!(view.initial_cars(), Some(100));
    assert_eq!(view.cars().len(), 100);
    assert!(view.cars().values().all(|c| c.sample.is_some()));

    // Follow until three consecutive complete ticks, recording every car's track.
    // Per car: (tick, (east m, north m)) in arrival order.
    let mut tracks: HashMap<u32, Vec<Fix>> = HashMap::new();
    let mut consecutive = Vec::new();
    let ok = follow(
        &mut session,
        &mut view,
        Duration::from_secs(10),
        |v, part| {
            let Some(part) = part else { return false };
            let q = v.hello().unwrap().quant;
            for car in &part.cars.0 {
                let pos = (q.position_m(car.x), q.position_m(car.y));
                tracks.entry(car.id).or_default().push((part.tick, pos));
            }
            if consecutive
                .last()
                .is_some_and(|&t: &u64| t + 1 != part.tick)
            {
                consecutive.clear();
            }
            consecutive.push(part.tick);
            consecutive.len() >= 4
        },
    )
    .await;
    assert!(ok, "no 4 consecutive ticks within 10 s");
    assert_eq!(tracks.len(), 100, "every car in every tick");
    let mut moved = 0;
    for track in tracks.values() {
        for w in track.windows(2) {
            let ((t0, a), (t1, b)) = (w[0], w[1]);
            let d = ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt();
            // 0.1 s ticks: at most ~17 m/s, so under 2 m per tick (plus quantisation).
            assert!(
                d < 2.0 * (t1 - t0) as f64,
                "car jumped {d} m in {} ticks",
                t1 - t0
            );
            if d > 0.1 {
                moved += 1;
            }
        }
    }
    assert!(moved > 100, "cars barely moved ({moved} moves)");
}

#[tokio::test]
async fn hundred_cars_fit_one_datagram_at_about_eight_bytes_per_car() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep, mut session) = ts.open().await;
    let mut view = initial_state(&mut session).await;
    let mut sizes = Vec::new();
    loop {
        match session.next().await.expect("session open") {
            Event::Datagram(bytes) => {
                let part = TickPart::decode(&bytes).unwrap();
                view.apply_part(&part);
                assert_eq!(part.parts, 1);
                sizes.push((bytes.len(), part.cars.0.len()));
                if sizes.len() == 3 {
                    break;
                }
            }
            Event::Message(m) => view.apply_message(m),
        }
    }
    for (len, cars) in sizes {
        assert_eq!(cars, 100);
        // 8 bytes per car plus a header of at most 20 bytes.
        assert!(len <= 100 * 8 + 20, "{len} bytes for {cars} cars");
    }
}

#[tokio::test]
async fn lossy_reordering_path_skips_ticks_and_never_goes_back_in_time() {
    let ts = TestServer::start(|a| a.tick_ms = 50).await;
    let relay = Relay::start(
        ts.server.wt_addr,
        Impairment {
            drop: 0.25,
            delay_share: 0.15,
            delay: Duration::from_millis(120),
            grace_packets: 20,
        },
        7,
    )
    .await;
    let endpoint = ts.endpoint();
    let url = common::url_for(relay.addr, "/positions");
    let mut session = client::open(&endpoint, &url, None).await.expect("opens");
    let mut view = initial_state(&mut session).await;
    let mut held: HashMap<u32, u64> = HashMap::new();
    let mut regressions = 0;
    let mut parts = 0;
    follow(
        &mut session,
        &mut view,
        Duration::from_secs(6),
        |v, part| {
            if part.is_some() {
                parts += 1;
                for (id, entry) in v.cars() {
                    let prev = held.insert(*id, entry.tick).unwrap_or(0);
                    if entry.tick < prev {
                        regressions += 1;
                    }
                }
            }
            false
        },
    )
    .await;
    view.finish();
    let c = view.counts();
    assert!(relay.dropped.load(std::sync::atomic::Ordering::Relaxed) > 10);
    assert!(parts > 20, "only {parts} datagrams got through");
    assert!(c.missed > 0, "loss did not show as missed ticks: {c:?}");
    assert!(c.received > 20, "{c:?}");
    assert_eq!(regressions, 0, "a car went back in time");
    // Every car still has a position despite the loss.
    assert_eq!(
        view.cars().values().filter(|c| c.sample.is_some()).count(),
        100
    );
}

#[tokio::test]
async fn client_datagram_closes_only_that_session() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep1, mut bad) = ts.open().await;
    let (_ep2, mut good) = ts.open().await;
    let _ = initial_state(&mut bad).await;
    let mut good_view = initial_state(&mut good).await;
    bad.connection().send_datagram(b"\x00garbage").unwrap();
    let end = common::ended(&mut bad, Duration::from_secs(5)).await;
    assert_eq!(
        end.close_code(),
        Some(CloseCode::ProtocolViolation),
        "{end}"
    );
    assert!(end.reason.contains("datagram"), "{}", end.reason);
    assert_eq!(ts.counter("closed_protocol_violation"), 1);
    // The other session keeps receiving ticks.
    let before = good_view.counts().received;
    assert!(
        follow(&mut good, &mut good_view, Duration::from_secs(5), |v, _| {
            v.counts().received >= before + 3
        })
        .await
    );
    assert_eq!(ts.healthz().await["status"], "ok");
}

#[tokio::test]
async fn client_stream_with_garbage_closes_only_that_session() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep1, mut bad) = ts.open().await;
    let (_ep2, mut good) = ts.open().await;
    let _ = initial_state(&mut bad).await;
    let mut good_view = initial_state(&mut good).await;
    let mut stream = bad.connection().open_uni().await.unwrap().await.unwrap();
    stream.write_all(&[0xff; 64]).await.unwrap();
    let end = common::ended(&mut bad, Duration::from_secs(5)).await;
    assert_eq!(
        end.close_code(),
        Some(CloseCode::ProtocolViolation),
        "{end}"
    );
    assert!(end.reason.contains("stream"), "{}", end.reason);
    let before = good_view.counts().received;
    assert!(
        follow(&mut good, &mut good_view, Duration::from_secs(5), |v, _| {
            v.counts().received >= before + 3
        })
        .await
    );
}

#[tokio::test]
async fn raw_udp_garbage_is_ignored_and_sessions_continue() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep, mut good) = ts.open().await;
    let mut view = initial_state(&mut good).await;
    let junk = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    for i in 0..200u32 {
        let mut packet = vec![(i % 256) as u8; 1 + (i as usize * 37) % 1400];
        packet[0] = if i % 2 == 0 { 0xc0 } else { 0x40 }; // long and short header bits
        junk.send_to(&packet, ts.server.wt_addr).await.unwrap();
    }
    let before = view.counts().received;
    assert!(
        follow(&mut good, &mut view, Duration::from_secs(5), |v, _| {
            v.counts().received >= before + 3
        })
        .await
    );
    assert_eq!(ts.healthz().await["status"], "ok");
}

#[tokio::test]
async fn wrong_path_bad_origin_and_full_server_are_refused_with_reasons() {
    let ts = TestServer::start(|a| a.max_sessions = 2).await;
    let ep = ts.endpoint();

    let wrong = common::url_for(ts.server.wt_addr, "/nope");
    assert_eq!(
        common::refused_status(client::open(&ep, &wrong, None).await),
        404
    );
    assert_eq!(ts.counter("refused_not_found"), 1);

    let evil = client::open(&ep, &ts.url(), Some("https://evil.example")).await;
    assert_eq!(common::refused_status(evil), 403);
    assert_eq!(ts.counter("refused_forbidden"), 1);

    // The server's own page origin and a query string are fine.
    let own = format!("http://localhost:{}", ts.server.http_addr.port());
    let mut a = client::open(&ep, &format!("{}?v=1", ts.url()), Some(&own))
        .await
        .expect("own origin allowed");
    let (_ep2, mut b) = ts.open().await;
    let _ = initial_state(&mut a).await;
    let mut b_view = initial_state(&mut b).await;
    let third = client::open(&ep, &ts.url(), None).await;
    assert_eq!(common::refused_status(third), 429, "third session gets 429");
    assert_eq!(ts.counter("refused_full"), 1);

    // After one leaves, there is room again; the others never noticed.
    a.close();
    let mut opened = None;
    for _ in 0..50 {
        if let Ok(s) = client::open(&ep, &ts.url(), None).await {
            opened = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(opened.is_some(), "slot was not released");
    let before = b_view.counts().received;
    assert!(
        follow(&mut b, &mut b_view, Duration::from_secs(5), |v, _| {
            v.counts().received >= before + 2
        })
        .await
    );
}

#[tokio::test]
async fn shutdown_says_goodbye_and_closes_with_going_away() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep, mut session) = ts.open().await;
    let _ = initial_state(&mut session).await;
    ts.server.shutdown();
    let mut goodbye = None;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), session.next()).await {
            Err(_) => panic!("no close within 5 s"),
            Ok(Ok(Event::Message(m @ StreamMessage::Goodbye { .. }))) => goodbye = Some(m),
            Ok(Ok(_)) => {}
            Ok(Err(end)) => break end,
        }
    };
    assert_eq!(
        goodbye,
        Some(StreamMessage::Goodbye {
            code: 1,
            reason: "server shutting down".into()
        })
    );
    assert_eq!(end.close_code(), Some(CloseCode::GoingAway), "{end}");
    tokio::time::timeout(Duration::from_secs(10), ts.server.wait())
        .await
        .expect("shutdown completes");
}

#[tokio::test]
async fn roster_churn_arrives_on_the_stream_and_the_view_follows() {
    let ts = TestServer::start(|a| a.sim.churn_ticks = 3).await;
    let (_ep, mut session) = ts.open().await;
    let mut view = initial_state(&mut session).await;
    let mut added = 0;
    let mut removed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while added < 2 || removed < 2 {
        let event = tokio::time::timeout_at(deadline, session.next())
            .await
            .expect("churn within 10 s")
            .expect("session open");
        match event {
            Event::Message(msg) => {
                match &msg {
                    StreamMessage::CarsAdded(c) => added += c.len(),
                    StreamMessage::CarsRemoved(ids) => removed += ids.len(),
                    _ => {}
                }
                view.apply_message(msg);
            }
            Event::Datagram(b) => {
                view.apply_part(&TickPart::decode(&b).unwrap());
            }
        }
    }
    assert_eq!(view.cars().len(), 100);
    assert!(!view.cars().contains_key(&0), "car 0 retired first");
    assert!(view.cars().contains_key(&100), "car 100 joined");
}

#[tokio::test]
async fn watch_reconnects_after_a_restart_on_the_same_ports() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = fleetcast::server::ServeArgs::ephemeral(dir.path().to_path_buf());
    args.tick_ms = 100;
    let first = fleetcast::server::Server::start(args.clone())
        .await
        .unwrap();
    args.wt_listen = first.wt_addr;
    args.http_listen = first.http_addr;
    let watch_args = fleetcast::watch::WatchArgs {
        connect: fleetcast::client::ConnectArgs {
            cert_hash_url: Some(format!("http://{}/certificate.sha256", first.http_addr)),
            ..fleetcast::client::ConnectArgs::new(common::url_for(first.wt_addr, "/positions"))
        },
        duration: None,
        json: true,
        idle_timeout: Duration::from_secs(6),
        max_backoff: Duration::from_millis(500),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(fleetcast::watch::run(watch_args, stop.clone()));
    // The only client: every datagram the server sends goes to the watcher.
    let sent = |s: &fleetcast::server::Server| s.stats().get("datagrams_sent").unwrap();
    common::wait_until(
        "10 ticks sent to the watcher",
        Duration::from_secs(10),
        || sent(&first) >= 10,
    )
    .await;
    first.shutdown();
    first.wait().await;
    // Same ports again, as soon as the old sockets are gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let second = loop {
        match fleetcast::server::Server::start(args.clone()).await {
            Ok(server) => break server,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("restart not yet possible: {e:#}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot restart on the same ports: {e:#}"),
        }
    };
    common::wait_until(
        "the watcher back, 12 ticks sent",
        Duration::from_secs(15),
        || sent(&second) >= 12,
    )
    .await;
    stop.cancel();
    let report = watcher.await.unwrap().unwrap();
    assert_eq!(report.sessions, 2, "{report:?}");
    assert!(report.ticks_received >= 20, "{report:?}");
    assert_eq!(report.ticks_missed, 0, "{report:?}");
    assert_eq!(report.initial_cars, 100);
    second.shutdown();
    second.wait().await;
}

/// What a client saw: the tick of its initial state and how many datagrams arrived.
#[derive(Default)]
struct Seen {
    initial_tick: Option<u64>,
    datagrams: u64,
}

impl Seen {
    fn count(&mut self, view: &FleetView, part: Option<&TickPart>) {
        if part.is_some() {
            self.datagrams += 1;
        } else if self.initial_tick.is_none() && view.initial_cars().is_some() {
            // Right after the State message every car holds the initial tick.
            self.initial_tick = view.cars().values().map(|c| c.tick).max();
        }
    }
}

#[tokio::test]
async fn fleet_view_tick_counts_match_the_server_on_a_clean_path() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep, mut session) = ts.open().await;
    let mut view = FleetView::new();
    let mut seen = Seen::default();
    assert!(
        follow(
            &mut session,
            &mut view,
            Duration::from_secs(10),
            |v, part| {
                seen.count(v, part);
                v.counts().received >= 10
            }
        )
        .await,
        "no 10 ticks within 10 s"
    );
    // Hold the ticks still: from here the server's counters do not move.
    let pause = ts.server.danger_pause_ticks().await;
    // The only session: every datagram the server queued was for it, one per tick.
    let sent = ts.counter("datagrams_sent");
    let last_tick = ts.healthz().await["tick"].as_u64().unwrap();
    let arrived = seen.datagrams >= sent
        || follow(
            &mut session,
            &mut view,
            Duration::from_secs(5),
            |v, part| {
                seen.count(v, part);
                seen.datagrams >= sent
            },
        )
        .await;
    let datagrams = seen.datagrams;
    assert!(arrived, "the client got {datagrams} of {sent} datagrams");
    drop(pause);
    view.finish();
    let c = view.counts();
    let initial_tick = seen.initial_tick.expect("initial state");
    assert_eq!(datagrams, sent, "{c:?}");
    assert_eq!(c.missed, 0, "{c:?}");
    assert_eq!(c.partial, 0, "{c:?}");
    // Every tick the server made after the initial state, complete; none counted twice.
    assert_eq!(c.complete, last_tick - initial_tick, "{c:?}");
    assert_eq!(c.received, c.complete, "{c:?}");
    assert_eq!(c.complete + c.late_parts, datagrams, "{c:?}");
}

#[tokio::test]
async fn metrics_expose_sessions_datagrams_fanout_and_process() {
    let ts = TestServer::start(|_| {}).await;
    let (_ep, mut session) = ts.open().await;
    let mut view = initial_state(&mut session).await;
    assert!(
        follow(&mut session, &mut view, Duration::from_secs(5), |v, _| {
            v.counts().received >= 3
        })
        .await,
        "no 3 ticks within 5 s"
    );
    let url = format!("http://{}/metrics", ts.server.http_addr);
    let value = |text: &str, line: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // CPU time is counted in 10 ms steps: wait until the process has used a step.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if value(&text, "process_cpu_seconds_total") > 0.0
            || tokio::time::Instant::now() >= deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let value = |line: &str| value(&text, line);
    assert_eq!(value("fleetcast_sessions{transport=\"webtransport\"}"), 1.0);
    assert_eq!(value("fleetcast_sessions{transport=\"websocket\"}"), 0.0);
    assert!(value("fleetcast_datagrams_sent_total{transport=\"webtransport\"}") >= 3.0);
    assert!(value("fleetcast_tick_fanout_seconds_count") >= 3.0);
    assert!(value("fleetcast_snapshot_bytes") > 700.0);
    assert_eq!(value("fleetcast_snapshot_datagrams"), 1.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_cpu_seconds_total") > 0.0, "{text}");
    assert!(text.contains("# TYPE fleetcast_tick_fanout_seconds histogram"));
    assert_eq!(
        value("fleetcast_sessions_refused_total{transport=\"websocket\",reason=\"full\"}"),
        0.0
    );
    assert_eq!(
        value("fleetcast_sessions_closed_total{transport=\"webtransport\",reason=\"going_away\"}"),
        0.0
    );
}

#[tokio::test]
async fn healthz_fails_with_503_while_the_tick_loop_is_behind_or_stopped() {
    let ts = TestServer::start(|_| {}).await;
    let (status, body) = ts.health().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");

    // Behind: no tick for more than three 100 ms intervals and a second.
    let pause = ts.server.danger_pause_ticks().await;
    let body = ts.health_becomes(503, Duration::from_secs(5)).await;
    assert_eq!(body["status"], "unhealthy", "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.starts_with("no tick for"), "{body}");
    // Whole milliseconds: a gap of 1300.4 ms is over the limit and shows as 1300.
    assert!(body["last_tick_ms_ago"].as_u64().unwrap() >= 1300, "{body}");
    // Back on time once ticks resume.
    drop(pause);
    let body = ts.health_becomes(200, Duration::from_secs(5)).await;
    assert_eq!(body["reason"], serde_json::Value::Null, "{body}");

    // Stopped: the tick thread panics, the process and its HTTP side live on.
    ts.server.danger_panic_tick_loop();
    // On a loaded machine the tick thread may first be late ("no tick for ...") before it
    // reaches the tick that panics: wait for the reason, not just the status.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = ts.health_becomes(503, Duration::from_secs(5)).await;
        if body["reason"] == "the tick loop has stopped" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
