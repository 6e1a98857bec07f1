//! Position ingest against a real server over real sockets: publishers post fixes over HTTP
//! and the streaming WebSocket, sessions see exactly those cars.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{follow, initial_state, TestServer};
use fleetcast::fleet::{format_time, parse_time};
use fleetcast::proto::quant::{age_step, heading_step, METRES_PER_DEGREE};
use fleetcast::proto::view::FleetView;
use fleetcast::server::config::{Feed, PublishToken};
use fleetcast::server::{now_us, ServeArgs};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "publisher-token-0123456789";
const OTHER_TOKEN: &str = "second-publisher-token-abcdef";
const WAIT: Duration = Duration::from_secs(10);

/// A server fed only by publishers holding `TOKEN` (and `OTHER_TOKEN`).
async fn ingest_server(tweak: impl FnOnce(&mut ServeArgs)) -> TestServer {
    TestServer::start(|args| {
        args.feed = vec![Feed::Ingest];
        args.ingest.publish_token = vec![PublishToken::new(TOKEN), PublishToken::new(OTHER_TOKEN)];
        tweak(args);
    })
    .await
}

/// A reply: status, headers, body as JSON (or `null` when it is not JSON).
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn request(
    ts: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Reply {
    let url = format!("http://{}{path}", ts.server.http_addr);
    let mut req = reqwest::Client::new().request(method, url).body(body);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("server answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Reply {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

async fn post_json(ts: &TestServer, token: &str, body: &Value) -> Reply {
    request(
        ts,
        reqwest::Method::POST,
        "/v1/positions",
        Some(token),
        Some("application/json"),
        body.to_string(),
    )
    .await
}

async fn delete(ts: &TestServer, id: &str, token: Option<&str>) -> Reply {
    let path = format!("/v1/cars/{id}");
    request(ts, reqwest::Method::DELETE, &path, token, None, "").await
}

async fn cars(ts: &TestServer) -> Vec<Value> {
    let r = request(ts, reqwest::Method::GET, "/v1/cars", Some(TOKEN), None, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.as_array().expect("an array").clone()
}

/// Latitude and longitude `east_m`, `north_m` from the default area's origin.
fn at(east_m: f64, north_m: f64) -> (f64, f64) {
    let lat = 52.35 + north_m / METRES_PER_DEGREE;
    let lon = 4.86 + east_m / (METRES_PER_DEGREE * 52.35f64.to_radians().cos());
    (lat, lon)
}

#[tokio::test]
async fn ingest_round_trip_sessions_see_posted_cars_within_a_step_with_their_fix_age() {
    let ts = ingest_server(|_| {}).await;
    // One session is open before the cars exist (they join by roster events), one opens after
    // (they are in its initial state).
    let (_ep, mut before) = ts.open().await;
    let mut early = initial_state(&mut before).await;
    assert_eq!(early.initial_cars(), Some(0), "no publisher yet: no car");

    let fix_us = now_us() - 2_000_000;
    let mut sent = HashMap::new();
    let fixes: Vec<Value> = (0..100)
        .map(|i| {
            let (lat, lon) = at(37.0 * i as f64 + 3.3, 3990.0 - 31.0 * i as f64);
            let (heading, speed) = (i as f64 * 3.5, i as f64 * 0.3);
            let id = format!("truck-{i}");
            sent.insert(format!("Truck {i}"), (lat, lon, heading, speed));
            json!({"id": id, "lat": lat, "lon": lon, "heading_deg": heading, "speed_mps": speed,
                   "time": format_time(fix_us), "label": format!("Truck {i}")})
        })
        .collect();
    let r = post_json(&ts, TOKEN, &Value::Array(fixes)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, json!({"accepted": 100, "rejected": []}));
    let posted_at = now_us();
    assert!(
        follow(&mut before, &mut early, WAIT, |v, _| v.cars().len() == 100).await,
        "the open session was told of the 100 new cars"
    );

    let (_ep2, mut after) = ts.open().await;
    let mut late = initial_state(&mut after).await;
    assert_eq!(
        late.initial_cars(),
        Some(100),
        "posted cars are in the initial state"
    );

    for (name, session, view) in [
        ("joined before", &mut before, &mut early),
        ("joined after", &mut after, &mut late),
    ] {
        let ok = follow(session, view, WAIT, |v, _| {
            v.cars().len() == 100
                && v.cars()
                    .values()
                    .all(|c| c.sample.is_some() && c.time_us >= posted_at)
        })
        .await;
        assert!(ok, "{name}: no tick after the post carried all 100 cars");
        let q = view.hello().unwrap().quant;
        let step = f64::from(q.unit_m);
        for entry in view.cars().values() {
            let &(lat, lon, heading, speed) = sent.get(&entry.label).expect("a posted label");
            let s = entry.sample.unwrap();
            let (glat, glon) = q.to_lat_lon(q.position_m(s.x), q.position_m(s.y));
            let dn = (glat - lat) * METRES_PER_DEGREE;
            let de = (glon - lon) * METRES_PER_DEGREE * q.origin_lat_deg.to_radians().cos();
            assert!(
                dn.abs() <= step / 2.0 + 1e-6 && de.abs() <= step / 2.0 + 1e-6,
                "{name} {}: off by {de:.3} m east, {dn:.3} m north (step {step})",
                entry.label
            );
            assert_eq!(s.heading, heading_step(heading), "{}", entry.label);
            assert_eq!(s.speed, q.speed_step(speed), "{}", entry.label);
            assert_eq!(
                s.age,
                age_step(entry.time_us - fix_us),
                "{name} {}: fix age is tick time minus the car's own fix time",
                entry.label
            );
            assert!(s.age >= 20, "the fix was 2 s old when posted");
        }
    }
    assert_eq!(ts.counter("ingest_fixes_accepted"), 100);
}

#[tokio::test]
async fn ingest_rejects_each_bad_fix_alone_with_index_and_reason_and_applies_the_rest() {
    let ts = ingest_server(|_| {}).await;
    let (lat, lon) = at(100.0, 100.0);
    let t0 = now_us() - 10_000_000;
    let r = post_json(
        &ts,
        TOKEN,
        &json!([{"id": "held", "lat": lat, "lon": lon,
                                           "time": format_time(t0)}]),
    )
    .await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let before = cars(&ts).await;

    let ok = |id: &str| json!({"id": id, "lat": lat, "lon": lon});
    let with = |k: &str, v: Value| {
        let mut f = ok("bad");
        f[k] = v;
        f
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("lat", json!(91.0)), "lat 91 is outside -90..90"),
        (
            with("lon", json!(-180.5)),
            "lon -180.5 is outside -180..180",
        ),
        (with("lat", json!(52.0)), "outside the served area"),
        (with("lat", json!("52.36")), "invalid type: string"),
        (with("lat", json!("NaN")), "invalid type: string"),
        (with("speed_mps", json!(-1.0)), "speed_mps -1 is negative"),
        (
            with("heading_deg", json!(361.0)),
            "heading_deg 361 is outside 0-360",
        ),
        (
            with("time", json!(format_time(now_us() + 60_000_000))),
            "in the future",
        ),
        (with("time", json!("last tuesday")), "not RFC 3339"),
        (
            json!({"id": "held", "lat": lat, "lon": lon, "time": format_time(t0 - 1_000)}),
            "older than the newest fix held",
        ),
        (with("id", json!("")), "id must be 1-64 bytes"),
        (with("id", json!("x".repeat(65))), "id must be 1-64 bytes"),
        (with("heading", json!(3)), "unknown field `heading`"),
        (json!({"id": "bad", "lat": lat}), "missing field `lon`"),
        (json!("not an object"), "invalid type"),
    ];
    let batch: Vec<Value> = cases.iter().map(|(f, _)| f.clone()).collect();
    let r = post_json(&ts, TOKEN, &Value::Array(batch)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], 0, "{}", r.body);
    let rejected = r.body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), cases.len(), "{}", r.body);
    for (i, ((_, reason), got)) in cases.iter().zip(rejected).enumerate() {
        assert_eq!(got["index"], i, "{got}");
        let error = got["error"].as_str().unwrap();
        assert!(
            error.contains(reason),
            "fix {i}: {error:?} should say {reason:?}"
        );
    }
    assert_eq!(
        cars(&ts).await,
        before,
        "no rejected fix touched the fleet state"
    );

    // One bad fix among good ones: the good ones are applied, in order.
    let r = post_json(
        &ts,
        TOKEN,
        &json!([ok("good-1"), with("lat", json!(95)), ok("good-2")]),
    )
    .await;
    assert_eq!(r.body["accepted"], 2, "{}", r.body);
    assert_eq!(r.body["rejected"][0]["index"], 1);
    assert_eq!(r.body["rejected"][0]["id"], "bad");
    assert_eq!(cars(&ts).await.len(), 3);
    assert_eq!(ts.counter("ingest_fixes_rejected"), cases.len() as u64 + 1);
}

#[tokio::test]
async fn ingest_refuses_malformed_oversized_unauthorised_and_rate_limited_requests() {
    let ts = ingest_server(|a| {
        a.ingest.max_ingest_body = 4096;
        a.ingest.ingest_rate = 6;
    })
    .await;
    let (lat, lon) = at(10.0, 10.0);
    let line = |id: &str| json!({"id": id, "lat": lat, "lon": lon}).to_string();
    let ndjson = Some("application/x-ndjson");
    let post = |token: Option<&'static str>, ct: Option<&'static str>, body: String| {
        request(&ts, reqwest::Method::POST, "/v1/positions", token, ct, body)
    };

    // Malformed JSON: 400 with the line and column, and nothing applied (not even the good
    // lines before it).
    let body = format!(
        "{}\n{}\n{{\"id\": \"c\", \"lat\": }}\n",
        line("a"),
        line("b")
    );
    let r = post(Some(TOKEN), ndjson, body).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        (r.body["line"].as_u64(), r.body["column"].as_u64()),
        (Some(3), Some(20))
    );
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("line 3 column 20"),
        "{}",
        r.body
    );
    let r = post(Some(TOKEN), None, "[{\"id\": NaN}]".into()).await;
    assert_eq!(r.status, 400, "a bare NaN is not JSON: {}", r.body);

    // Too large: 413, whether the length is declared or streamed.
    let big: String = (0..100).map(|i| line(&format!("car-{i}")) + "\n").collect();
    assert!(big.len() > 4096);
    let r = post(Some(TOKEN), ndjson, big.clone()).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let chunks: Vec<Result<String, std::io::Error>> =
        vec![Ok(big[..3000].into()), Ok(big[3000..].into())];
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let r = request(
        &ts,
        reqwest::Method::POST,
        "/v1/positions",
        Some(TOKEN),
        ndjson,
        streamed,
    )
    .await;
    assert_eq!(r.status, 413, "chunked body without a length: {}", r.body);

    // No token, a wrong token: 401 with a Bearer challenge.
    for token in [None, Some("not-the-right-token-at-all")] {
        let r = post(token, ndjson, line("z")).await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
    // Not JSON at all.
    let r = post(Some(TOKEN), Some("text/csv"), "id,lat,lon\n".into()).await;
    assert_eq!(r.status, 415, "{}", r.body);

    assert!(
        cars(&ts).await.is_empty(),
        "nothing above touched the fleet"
    );

    // The rate limit is per token: this token's budget is spent, the other one's is not.
    let mut limited = None;
    for _ in 0..10 {
        let r = post(Some(TOKEN), ndjson, line("r")).await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = limited.expect("a 429 within 10 requests at 6 per second");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After in whole seconds");
    assert!(r.body["retry_after_ms"].as_u64().unwrap() > 0);
    let r = post(Some(OTHER_TOKEN), ndjson, line("s")).await;
    assert_eq!(
        r.status, 200,
        "another token has its own budget: {}",
        r.body
    );
    assert!(ts.counter("ingest_refused_rate") >= 1);
    assert_eq!(ts.counter("ingest_refused_unauthorized"), 2);
    assert_eq!(ts.counter("ingest_refused_malformed"), 2);
    assert_eq!(ts.counter("ingest_refused_too_large"), 2);
}

#[tokio::test]
async fn two_concurrent_publishers_both_land_and_the_newest_fix_wins() {
    let ts = ingest_server(|a| a.ingest.ingest_rate = 10_000).await;
    let t0 = now_us() - 60_000_000;
    // Each publisher moves its own 20 cars and the shared car, at interleaved times.
    let publish = |token: &'static str, name: &'static str, offset: u64| {
        let ts = &ts;
        async move {
            let (mut accepted, mut rejected) = (0, 0);
            for round in 0..25u64 {
                let time = format_time(t0 + (round * 2 + offset) * 100_000);
                let mut batch: Vec<Value> = (0..20)
                    .map(|i| {
                        let (lat, lon) = at(round as f64 * 10.0, i as f64 * 50.0);
                        json!({"id": format!("{name}-{i}"), "lat": lat, "lon": lon, "time": time})
                    })
                    .collect();
                let (lat, lon) = at(1000.0 + offset as f64, round as f64);
                batch.push(json!({"id": "shared", "lat": lat, "lon": lon, "time": time}));
                let r = post_json(ts, token, &Value::Array(batch)).await;
                assert_eq!(r.status, 200, "{}", r.body);
                accepted += r.body["accepted"].as_u64().unwrap();
                rejected += r.body["rejected"].as_array().unwrap().len() as u64;
            }
            (accepted, rejected)
        }
    };
    let ((a_ok, a_bad), (b_ok, b_bad)) =
        tokio::join!(publish(TOKEN, "a", 0), publish(OTHER_TOKEN, "b", 1));
    assert_eq!(
        a_ok + a_bad + b_ok + b_bad,
        2 * 25 * 21,
        "every fix has an answer"
    );
    assert!(
        a_ok >= 500 && b_ok >= 500,
        "own cars always land: {a_ok} {b_ok}"
    );
    let fleet = cars(&ts).await;
    assert_eq!(fleet.len(), 41);
    for car in &fleet {
        let id = car["id"].as_str().unwrap();
        let time = parse_time(car["time"].as_str().unwrap()).unwrap();
        let last = if id == "shared" {
            49
        } else {
            48 + u64::from(id.starts_with('b'))
        };
        assert_eq!(time, t0 + last * 100_000, "{id} holds its newest fix");
    }
}

#[tokio::test]
async fn cars_leave_on_delete_and_after_car_timeout_and_sessions_see_them_go() {
    let ts = ingest_server(|a| a.ingest.car_timeout = Duration::from_millis(1500)).await;
    let (_ep, mut session) = ts.open().await;
    let mut view = initial_state(&mut session).await;
    let (lat, lon) = at(50.0, 50.0);
    let fix = |id: &str| json!({"id": id, "lat": lat, "lon": lon});
    let r = post_json(
        &ts,
        TOKEN,
        &json!([fix("quiet"), fix("deleted"), fix("chatty")]),
    )
    .await;
    assert_eq!(r.body["accepted"], 3);
    let labels = |v: &FleetView| {
        let mut l: Vec<String> = v.cars().values().map(|c| c.label.clone()).collect();
        l.sort();
        l
    };
    assert!(follow(&mut session, &mut view, WAIT, |v, _| v.cars().len() == 3).await);

    let r = delete(&ts, "deleted", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["removed"], "deleted");
    let r = delete(&ts, "deleted", Some(TOKEN)).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = delete(&ts, "chatty", None).await;
    assert_eq!(r.status, 401);
    assert!(
        follow(&mut session, &mut view, WAIT, |v, _| labels(v)
            == ["chatty", "quiet"])
        .await,
        "the session saw the deleted car leave: {:?}",
        labels(&view)
    );

    // "chatty" keeps reporting, "quiet" does not: only "quiet" times out.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = post_json(&ts, TOKEN, &json!([fix("chatty")])).await;
        assert_eq!(r.body["accepted"], 1);
        let gone = follow(
            &mut session,
            &mut view,
            Duration::from_millis(200),
            |v, _| labels(v) == ["chatty"],
        )
        .await;
        if gone {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "quiet never timed out"
        );
    }
    let fleet = cars(&ts).await;
    assert_eq!(fleet.len(), 1);
    assert_eq!(fleet[0]["id"], "chatty");
    assert_eq!(ts.counter("ingest_cars_expired"), 1);
    assert_eq!(ts.counter("ingest_cars_removed"), 1);
}

#[tokio::test]
async fn a_relabelled_car_keeps_its_wire_id_and_shows_the_new_label() {
    let ts = ingest_server(|_| {}).await;
    let (_ep, mut session) = ts.open().await;
    let mut view = initial_state(&mut session).await;
    let (lat, lon) = at(5.0, 5.0);
    post_json(&ts, TOKEN, &json!([{"id": "t1", "lat": lat, "lon": lon}])).await;
    assert!(follow(&mut session, &mut view, WAIT, |v, _| v.cars().len() == 1).await);
    let wire_id = *view.cars().keys().next().unwrap();
    let r = post_json(
        &ts,
        TOKEN,
        &json!([{"id": "t1", "lat": lat, "lon": lon,
                                           "label": "Truck One"}]),
    )
    .await;
    assert_eq!(r.body["accepted"], 1);
    let ok = follow(&mut session, &mut view, WAIT, |v, _| {
        v.cars()
            .get(&wire_id)
            .is_some_and(|c| c.label == "Truck One")
    })
    .await;
    assert!(ok, "the new label reached the open session");
    assert_eq!(view.cars().len(), 1, "relabelling keeps one car");
    let (_ep2, mut fresh) = ts.open().await;
    let view2 = initial_state(&mut fresh).await;
    let labels: Vec<&str> = view2.cars().values().map(|c| c.label.as_str()).collect();
    assert_eq!(labels, ["Truck One"]);
}

#[tokio::test]
async fn streaming_publisher_gets_one_reply_per_batch_in_order() {
    let ts = ingest_server(|a| a.ingest.max_ingest_body = 4096).await;
    let url = format!("ws://{}/v1/publish.ws", ts.server.http_addr);

    // Without a token the upgrade is refused with 401.
    let err = tokio_tungstenite::connect_async(url.clone())
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(resp) = err else {
        panic!("expected an HTTP refusal, got {err}");
    };
    assert_eq!(resp.status(), 401);

    // The token in the query works (for clients that cannot set headers), as does the header.
    let (mut q, _) = tokio_tungstenite::connect_async(format!("{url}?token={OTHER_TOKEN}"))
        .await
        .expect("token in the query");
    q.close(None).await.unwrap();
    let mut request = url.clone().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();

    let (lat, lon) = at(200.0, 300.0);
    let fix = |id: &str| json!({"id": id, "lat": lat, "lon": lon});
    let batches = [
        format!("{}\n{}\n", fix("s1"), fix("s2")),
        json!([fix("s3"), {"id": "s4", "lat": 95.0, "lon": lon}]).to_string(),
        format!("{}\n{{broken", fix("s5")),
        fix("s6").to_string(),
    ];
    for b in &batches {
        ws.send(Message::Text(b.clone().into())).await.unwrap();
    }
    let mut replies = Vec::new();
    while replies.len() < batches.len() {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            replies.push(serde_json::from_str::<Value>(&t).unwrap());
        }
    }
    assert_eq!(
        replies[0],
        json!({"batch": 1, "accepted": 2, "rejected": []})
    );
    assert_eq!(replies[1]["batch"], 2);
    assert_eq!(replies[1]["accepted"], 1);
    assert_eq!(replies[1]["rejected"][0]["index"], 1);
    assert!(replies[1]["rejected"][0]["error"]
        .as_str()
        .unwrap()
        .contains("lat 95"));
    assert_eq!(replies[2]["batch"], 3);
    assert_eq!(replies[2]["line"], 2, "{}", replies[2]);
    assert!(replies[2]["error"]
        .as_str()
        .unwrap()
        .contains("nothing was applied"));
    assert_eq!(
        replies[3],
        json!({"batch": 4, "accepted": 1, "rejected": []})
    );
    let ids: Vec<String> = cars(&ts)
        .await
        .iter()
        .map(|c| c["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(
        ids,
        ["s1", "s2", "s3", "s6"],
        "the malformed batch applied nothing"
    );

    // A binary message is not a batch: the stream is closed with 1003, the server goes on.
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("closed") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.expect("a close frame").code), 1003);
    assert_eq!(cars(&ts).await.len(), 4);

    // A message over --max-ingest-body ends that connection only.
    let (mut big, _) = tokio_tungstenite::connect_async(format!("{url}?token={TOKEN}"))
        .await
        .unwrap();
    let line = format!("{}\n", fix("huge"));
    let _ = big.send(Message::Text(line.repeat(200).into())).await;
    let end = loop {
        match tokio::time::timeout(WAIT, big.next())
            .await
            .expect("closed")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => break None,
        }
    };
    assert_ne!(end, Some(1000), "not a normal close");
    assert_eq!(cars(&ts).await.len(), 4, "nothing of it was applied");
    assert_eq!(ts.counter("ingest_streams_accepted"), 3);
}

#[tokio::test]
async fn ingest_is_off_with_the_simulator_and_sim_cars_belong_to_it() {
    // A publisher token without --feed ingest (say, exported for `fleetcast publish`) does not
    // turn ingest on.
    let sim = TestServer::start(|a| a.ingest.publish_token = vec![PublishToken::new(TOKEN)]).await;
    let r = request(
        &sim,
        reqwest::Method::POST,
        "/v1/positions",
        Some(TOKEN),
        None,
        "[]",
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(
        r.body["error"].as_str().unwrap().contains("--feed ingest"),
        "{}",
        r.body
    );

    let both = TestServer::start(|a| {
        a.feed = vec![Feed::Sim, Feed::Ingest];
        a.sim.cars = 5;
        a.ingest.publish_token = vec![PublishToken::new(TOKEN)];
    })
    .await;
    let (lat, lon) = at(1.0, 1.0);
    let r = post_json(
        &both,
        TOKEN,
        &json!([{"id": "FC-0001", "lat": lat, "lon": lon},
                                            {"id": "real", "lat": lat, "lon": lon}]),
    )
    .await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    assert!(r.body["rejected"][0]["error"]
        .as_str()
        .unwrap()
        .contains("belongs to the simulator"));
    let r = delete(&both, "FC-0002", Some(TOKEN)).await;
    assert_eq!(r.status, 409);
    let (_ep, mut session) = both.open().await;
    let mut view = initial_state(&mut session).await;
    assert!(
        follow(&mut session, &mut view, WAIT, |v, _| v.cars().len() == 6).await,
        "five simulated cars and one real one"
    );
}

#[tokio::test]
async fn impossible_option_combinations_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |tweak: &dyn Fn(&mut ServeArgs), why: &str| {
        let mut args = ServeArgs::ephemeral(dir.path().to_path_buf());
        tweak(&mut args);
        let why = why.to_string();
        async move {
            let Err(e) = fleetcast::server::Server::start(args).await else {
                panic!("started despite: {why}");
            };
            assert!(e.to_string().contains(&why), "{e} should mention {why}");
        }
    };
    refused(
        &|a| a.feed = vec![Feed::Ingest],
        "needs at least one --publish-token",
    )
    .await;
    refused(
        &|a| {
            a.sim.cars = 0;
            a.sim.churn_ticks = 3;
        },
        "--churn-ticks needs at least one simulated car",
    )
    .await;
    refused(&|a| a.area.area_m = 0.0, "at least 1 m").await;
}

#[tokio::test]
async fn posted_cars_reach_open_sessions_roster_first_then_their_datagrams() {
    // PROTOCOL.md section 7 rule 3: a session gets a car's CarsAdded before the first tick
    // that carries it. On a clean loopback path no sample should have to wait for its car.
    let ts = ingest_server(|_| {}).await;
    let (_endpoint, mut session) = ts.open().await;
    let mut view = initial_state(&mut session).await;
    let area = fleetcast::fleet::Area::square(52.35, 4.86, 4000.0).unwrap();
    let fixes: Vec<Value> = (0..50)
        .map(|i| {
            let (lat, lon) = area.quant.to_lat_lon(100.0 + 20.0 * f64::from(i), 200.0);
            json!({"id": format!("new-{i}"), "lat": lat, "lon": lon})
        })
        .collect();
    let reply = post_json(&ts, TOKEN, &Value::Array(fixes)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        follow(&mut session, &mut view, Duration::from_secs(10), |v, _| {
            v.cars().values().filter(|c| c.sample.is_some()).count() == 50
        })
        .await,
        "the 50 posted cars did not all arrive"
    );
    assert_eq!(view.samples().held, 0, "{:?}", view.samples());
}

#[tokio::test]
async fn the_car_list_holds_a_fleet_bigger_than_one_page() {
    // The list is collected 2,000 cars a page (one NATS reply each in a cluster).
    let ts = ingest_server(|_| {}).await;
    let area = fleetcast::fleet::Area::square(52.35, 4.86, 4000.0).unwrap();
    let fixes: Vec<Value> = (0..4500)
        .map(|i| {
            let (lat, lon) = area.quant.to_lat_lon(f64::from(i % 3000), 100.0);
            json!({"id": format!("car-{i}"), "lat": lat, "lon": lon})
        })
        .collect();
    let reply = post_json(&ts, TOKEN, &Value::Array(fixes)).await;
    assert_eq!(reply.body["accepted"], 4500, "{}", reply.body);
    let listed = cars(&ts).await;
    let ids: std::collections::BTreeSet<&str> =
        listed.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!((listed.len(), ids.len()), (4500, 4500));
}
