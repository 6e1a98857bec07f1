//! Subscriber tokens against a real server on both transports: a valid token opens a session, a
//! missing, tampered, foreign or expired one gets 401 before any position is sent.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{follow, initial_state, TestServer};
use fleetcast::client;
use fleetcast::proto::view::FleetView;
use fleetcast::proto::wire::{FrameDecoder, TickPart};
use fleetcast::token::{self, Claims, Secret};
use futures::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "tokens-test-secret-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(10);

fn secret() -> Secret {
    Secret::parse(SECRET).expect("long enough")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A token signed with `secret` that expires `ttl_s` seconds from now; returns it with `exp`.
fn mint_with(secret: &Secret, ttl_s: u64) -> (String, u64) {
    let exp = unix_now() + ttl_s;
    let claims = Claims {
        sub: Some("tokens-test".into()),
        ..Claims::expiring_at(exp as i64)
    };
    (token::mint(secret, &claims), exp)
}

fn mint(ttl_s: u64) -> String {
    mint_with(&secret(), ttl_s).0
}

/// A server with 20 cars that requires tokens signed with [`SECRET`].
async fn start() -> TestServer {
    common::start(20, |a| a.subscribe_secret = Some(secret())).await
}

/// Opens a WebTransport session, with `token` in the URL if given.
async fn open_wt(ts: &TestServer, token: Option<&str>) -> anyhow::Result<client::Session> {
    let endpoint = ts.endpoint();
    let url = client::with_token(&ts.url(), token);
    // quinn keeps the endpoint's driver running while the session's connection lives.
    client::open(&endpoint, &url, None).await
}

/// The status of a refused WebTransport session, or a panic if it was not refused.
fn wt_status(result: anyhow::Result<client::Session>) -> u16 {
    common::refused_status(result)
}

/// Opens the WebSocket fallback, with `token` in the URL if given.
async fn open_ws(ts: &TestServer, token: Option<&str>) -> Result<Ws, WsError> {
    let url = format!("ws://{}/positions.ws", ts.server.http_addr);
    let url = client::with_token(&url, token);
    let (ws, response) = tokio_tungstenite::connect_async(url.as_str()).await?;
    assert_eq!(response.status(), 101);
    Ok(ws)
}

/// The status of a refused WebSocket upgrade, or a panic if it was upgraded.
fn ws_status(result: Result<Ws, WsError>) -> u16 {
    match result {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the WebSocket was upgraded (101)"),
    }
}

/// Reads a WebSocket session into a view until `done` holds; panics after [`WAIT`].
async fn ws_follow(ws: &mut Ws, view: &mut FleetView, done: impl Fn(&FleetView) -> bool) {
    let mut frames = FrameDecoder::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(view) {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("condition reached in time")
            .expect("socket open")
            .expect("no socket error");
        let Message::Binary(bytes) = msg else {
            continue;
        };
        let (&channel, body) = bytes.split_first().expect("channel byte");
        if channel == 0 {
            frames.push(body);
            while let Some(m) = frames.next_message().expect("frames decode") {
                view.apply_message(m);
            }
        } else {
            view.apply_part(&TickPart::decode(body).expect("datagram decodes"));
        }
    }
}

/// Opens a session on each transport with `token` and checks the initial state and ticks.
async fn assert_opens_both(ts: &TestServer, token: &str) {
    let mut wt = open_wt(ts, Some(token)).await.expect("WebTransport opens");
    let mut view = initial_state(&mut wt).await;
    assert_eq!(view.initial_cars(), Some(20));
    assert!(
        follow(&mut wt, &mut view, WAIT, |v, _| v.counts().received >= 2).await,
        "ticks over WebTransport"
    );
    wt.close();

    let mut ws = open_ws(ts, Some(token)).await.expect("WebSocket opens");
    let mut view = FleetView::new();
    ws_follow(&mut ws, &mut view, |v| {
        v.initial_cars() == Some(20) && v.counts().received >= 2
    })
    .await;
}

/// Waits until the server has produced `n` more ticks, so refused clients had the chance to
/// receive positions if the server had (wrongly) sent any.
async fn wait_ticks(ts: &TestServer, n: u64) {
    let start = ts.counter("ticks");
    let deadline = tokio::time::Instant::now() + WAIT;
    while ts.counter("ticks") < start + n {
        assert!(tokio::time::Instant::now() < deadline, "ticks too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Nothing was ever sent to any session: no positions reached a refused client.
fn assert_no_positions_sent(ts: &TestServer) {
    assert_eq!(ts.counter("sessions_accepted"), 0);
    assert_eq!(ts.counter("ws_sessions_accepted"), 0);
    assert_eq!(ts.counter("datagrams_sent"), 0);
    assert_eq!(ts.counter("ws_datagrams_sent"), 0);
    assert_eq!(ts.server.sessions(), 0);
}

#[tokio::test]
async fn valid_token_opens_both_transports_and_ticks_arrive() {
    let ts = start().await;
    assert_opens_both(&ts, &mint(3600)).await;
    assert_eq!(ts.counter("sessions_accepted"), 1);
    assert_eq!(ts.counter("ws_sessions_accepted"), 1);
    assert_eq!(ts.counter("refused_unauthorized"), 0);
    assert_eq!(ts.counter("ws_refused_unauthorized"), 0);
}

#[tokio::test]
async fn token_among_other_query_params_is_found() {
    let ts = start().await;
    let url = format!("{}?v=1&token={}&x=y", ts.url(), mint(3600));
    let mut wt = client::open(&ts.endpoint(), &url, None)
        .await
        .expect("opens");
    let view = initial_state(&mut wt).await;
    assert_eq!(view.initial_cars(), Some(20));
}

#[tokio::test]
async fn missing_token_gets_401_on_both_transports_and_no_positions() {
    let ts = start().await;
    assert_eq!(wt_status(open_wt(&ts, None).await), 401);
    assert_eq!(ws_status(open_ws(&ts, None).await), 401);
    // An empty token and one in another parameter are missing too.
    let url = format!("{}?token=&tokens={}", ts.url(), mint(3600));
    assert_eq!(
        wt_status(client::open(&ts.endpoint(), &url, None).await),
        401
    );
    assert_eq!(ts.counter("refused_unauthorized"), 2);
    assert_eq!(ts.counter("ws_refused_unauthorized"), 1);
    wait_ticks(&ts, 3).await;
    assert_no_positions_sent(&ts);

    let url = format!("http://{}/metrics", ts.server.http_addr);
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    for line in [
        "fleetcast_sessions_refused_total{transport=\"webtransport\",reason=\"unauthorized\"} 2",
        "fleetcast_sessions_refused_total{transport=\"websocket\",reason=\"unauthorized\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
    }
}

#[tokio::test]
async fn tampered_foreign_and_malformed_tokens_get_401_on_both_transports() {
    let ts = start().await;
    let good = mint(3600);
    // The claims re-encoded with a later expiry, the signature kept.
    let parts: Vec<&str> = good.split('.').collect();
    let forged_claims = {
        use base64::Engine;
        let claims = br#"{"exp":99999999999,"sub":"tokens-test"}"#;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
    };
    let tampered = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
    let other = Secret::parse("some-other-secret-0123456789abcdef!").unwrap();
    let foreign = mint_with(&other, 3600).0;
    let unsigned = format!("{}.{}.", "eyJhbGciOiJub25lIn0", parts[1]); // alg "none"
    let huge = "a".repeat(5000);
    for bad in [
        &tampered,
        &foreign,
        &unsigned,
        &huge,
        &"garbage".to_string(),
    ] {
        assert_eq!(wt_status(open_wt(&ts, Some(bad)).await), 401, "{bad:.40}");
        assert_eq!(ws_status(open_ws(&ts, Some(bad)).await), 401, "{bad:.40}");
    }
    assert_eq!(ts.counter("refused_unauthorized"), 5);
    assert_eq!(ts.counter("ws_refused_unauthorized"), 5);
    assert_no_positions_sent(&ts);
    // The server is unharmed: a good token still opens.
    assert_opens_both(&ts, &good).await;
}

#[tokio::test]
async fn expired_token_gets_401_on_both_transports() {
    let ts = start().await;
    // Valid for 3 to 4 s (exp is whole seconds): time to open sessions on a busy machine.
    let (token, exp) = mint_with(&secret(), 4);
    // Valid now: both transports open and receive the fleet.
    assert_opens_both(&ts, &token).await;
    let mut early = open_wt(&ts, Some(&token)).await.expect("opens before exp");
    let mut early_view = initial_state(&mut early).await;

    // Wait for the condition, not a fixed time: the wall clock reaching exp.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4 + 10);
    while unix_now() < exp {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clock never reached exp"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = (
        ts.counter("sessions_accepted"),
        ts.counter("ws_sessions_accepted"),
    );
    assert_eq!(wt_status(open_wt(&ts, Some(&token)).await), 401);
    assert_eq!(ws_status(open_ws(&ts, Some(&token)).await), 401);
    assert_eq!(ts.counter("refused_unauthorized"), 1);
    assert_eq!(ts.counter("ws_refused_unauthorized"), 1);
    assert_eq!(
        (
            ts.counter("sessions_accepted"),
            ts.counter("ws_sessions_accepted")
        ),
        accepted,
        "no session was opened with the expired token"
    );

    // The token is checked when a session opens: one opened before exp keeps running.
    let before = early_view.counts().received;
    assert!(
        follow(&mut early, &mut early_view, WAIT, |v, _| v
            .counts()
            .received
            >= before + 2)
        .await
    );
    // A fresh token opens again.
    assert_opens_both(&ts, &mint(3600)).await;
}

#[tokio::test]
async fn refusals_keep_the_order_path_origin_token_capacity() {
    let ts = common::start(20, |a| {
        a.subscribe_secret = Some(secret());
        a.max_sessions = 1;
    })
    .await;
    let ep = ts.endpoint();
    // Without a token, a wrong path is still 404 and a foreign origin still 403.
    let wrong = common::url_for(ts.server.wt_addr, "/nope");
    assert_eq!(wt_status(client::open(&ep, &wrong, None).await), 404);
    let evil = client::open(&ep, &ts.url(), Some("https://evil.example")).await;
    assert_eq!(wt_status(evil), 403);
    // A full server says 401 to a client without a token, 429 to one with a good token.
    let good = mint(3600);
    let mut first = open_wt(&ts, Some(&good)).await.expect("first opens");
    let _ = initial_state(&mut first).await;
    assert_eq!(wt_status(open_wt(&ts, None).await), 401);
    assert_eq!(wt_status(open_wt(&ts, Some(&good)).await), 429);
    assert_eq!(ws_status(open_ws(&ts, None).await), 401);
    assert_eq!(ws_status(open_ws(&ts, Some(&good)).await), 429);
    assert_eq!(ts.counter("refused_not_found"), 1);
    assert_eq!(ts.counter("refused_forbidden"), 1);
    assert_eq!(ts.counter("refused_unauthorized"), 1);
    assert_eq!(ts.counter("refused_full"), 1);
    assert_eq!(ts.counter("ws_refused_unauthorized"), 1);
    assert_eq!(ts.counter("ws_refused_full"), 1);
}

#[tokio::test]
async fn without_a_secret_no_token_is_needed_and_a_given_one_is_ignored() {
    let ts = common::start(20, |_| {}).await;
    assert_opens_both(&ts, "not-a-token").await;
    let mut wt = open_wt(&ts, None).await.expect("opens without a token");
    let _ = initial_state(&mut wt).await;
    assert_eq!(ts.counter("refused_unauthorized"), 0);
    assert_eq!(ts.counter("ws_refused_unauthorized"), 0);
}

#[tokio::test]
async fn config_json_says_whether_a_token_is_required() {
    for (required, ts) in [
        (true, start().await),
        (false, common::start(5, |_| {}).await),
    ] {
        let url = format!("http://{}/config.json", ts.server.http_addr);
        let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let config: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(config["token_required"], required, "{config}");
    }
}

#[tokio::test]
async fn secret_file_is_read_and_a_short_one_fails_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{SECRET}\n# rotated monthly\n")).unwrap();
    let ts = common::start(20, |a| a.subscribe_secret_file = Some(path.clone())).await;
    assert_eq!(wt_status(open_wt(&ts, None).await), 401);
    assert_opens_both(&ts, &mint(3600)).await;

    std::fs::write(&path, "too-short\n").unwrap();
    let mut args = fleetcast::server::ServeArgs::ephemeral(dir.path().to_path_buf());
    args.subscribe_secret_file = Some(path);
    let err = match fleetcast::server::Server::start(args).await {
        Ok(_) => panic!("started with a 9-byte secret"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("at least 32"), "{err}");
}

#[test]
fn serve_args_debug_never_shows_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = fleetcast::server::ServeArgs::ephemeral(dir.path().to_path_buf());
    args.subscribe_secret = Some(secret());
    let shown = format!("{args:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
}
