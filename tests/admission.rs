//! Admission against a real server: one address cannot take every session slot or every
//! handshake, and address validation (QUIC Retry) keeps working sessions working.

mod common;

use std::time::Duration;

use common::{initial_state, TestServer};
use fleetcast::client::{self, Refused};
use tokio_tungstenite::tungstenite::Error as WsError;

const WAIT: Duration = Duration::from_secs(10);

/// The HTTP status a refused WebTransport session got, if it was refused.
async fn refusal(ts: &TestServer) -> Option<u16> {
    let endpoint = ts.endpoint();
    match client::open(&endpoint, &ts.url(), None).await {
        Ok(_) => None,
        Err(e) => Some(
            e.downcast_ref::<Refused>()
                .unwrap_or_else(|| panic!("not a refusal: {e:#}"))
                .status
                .expect("a status"),
        ),
    }
}

/// The status a WebSocket upgrade got (101 when it opened).
async fn websocket_status(ts: &TestServer) -> u16 {
    let url = format!("ws://{}/positions.ws", ts.server.http_addr);
    match tokio_tungstenite::connect_async(url).await {
        Ok((_ws, resp)) => resp.status().as_u16(),
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("websocket failed: {e}"),
    }
}

#[tokio::test]
async fn one_address_holds_at_most_max_sessions_per_ip_on_both_transports() {
    let ts = TestServer::start(|a| {
        a.max_sessions_per_ip = 3;
        a.limit_loopback = true;
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (ep, mut session) = ts.open().await;
        initial_state(&mut session).await;
        open.push((ep, session));
    }
    assert_eq!(
        refusal(&ts).await,
        Some(429),
        "a fourth WebTransport session"
    );
    assert_eq!(ts.counter("refused_per_ip"), 1);

    // The WebSocket side counts by the same rule (the test reaches it over 127.0.0.1, a
    // different address from the sessions above on [::1]).
    let url = format!("ws://{}/positions.ws", ts.server.http_addr);
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(
            tokio_tungstenite::connect_async(url.clone())
                .await
                .expect("opens"),
        );
    }
    assert_eq!(websocket_status(&ts).await, 429, "a fourth WebSocket");
    assert_eq!(ts.counter("ws_refused_per_ip"), 1);

    // One session ends: its slot is this address's again.
    let (_ep, session) = open.pop().unwrap();
    session.close();
    let deadline = tokio::time::Instant::now() + WAIT;
    while ts.server.sessions() > 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refusal(&ts).await, None, "a slot is free again");
}

#[tokio::test]
async fn loopback_is_exempt_from_per_address_limits_by_default() {
    let ts = TestServer::start(|a| a.max_sessions_per_ip = 1).await;
    let _a = ts.open().await;
    let _b = ts.open().await;
    assert_eq!(websocket_status(&ts).await, 101);
    assert_eq!(ts.counter("refused_per_ip"), 0);
}

#[tokio::test]
async fn handshakes_over_the_per_address_rate_are_retried_then_refused() {
    let ts = TestServer::start(|a| {
        a.handshakes_per_ip = 2;
        a.limit_loopback = true;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let endpoint = ts.endpoint();
        let opened = tokio::time::timeout(WAIT, client::open(&endpoint, &ts.url(), None)).await;
        statuses.push(matches!(opened, Ok(Ok(_))));
    }
    let opened = statuses.iter().filter(|&&ok| ok).count();
    assert!(
        (2..8).contains(&opened),
        "a burst of 8 at 2 per second: {statuses:?}"
    );
    assert!(ts.counter("refused_handshake_rate") >= 1);
    assert!(
        ts.counter("handshakes_retried") >= 1,
        "an unvalidated client over the rate is asked to validate before it is refused"
    );
    // The bucket refills: a client that waits gets in.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let endpoint = ts.endpoint();
        if client::open(&endpoint, &ts.url(), None).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never admitted again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn address_validation_with_retry_still_opens_sessions() {
    // --validate-above 0: every new client must answer a Retry first.
    let ts = TestServer::start(|a| a.validate_above = 0).await;
    for n in 1..=3 {
        let (_ep, mut session) = ts.open().await;
        let view = initial_state(&mut session).await;
        assert_eq!(view.initial_cars(), Some(100));
        assert_eq!(
            ts.counter("handshakes_retried"),
            n,
            "one Retry per connection"
        );
    }
    assert_eq!(ts.counter("sessions_accepted"), 3);
}

#[tokio::test]
async fn an_upper_case_header_name_is_a_malformed_request_not_a_missing_origin() {
    // HTTP/3 requires lower-case field names (RFC 9114 §4.2). An `Origin` header spelt with a
    // capital must not slip past the origin check as "no Origin header".
    let ts = TestServer::start(|_| {}).await;
    let endpoint = ts.endpoint();
    let options = wtransport::endpoint::ConnectOptions::builder(ts.url())
        .add_header("Origin", "https://evil.example")
        .build();
    match endpoint.connect(options).await {
        Err(wtransport::error::ConnectingError::SessionRejected { status }) => {
            assert_eq!(status, Some(400));
        }
        Err(e) => panic!("expected a 400 refusal, got {e}"),
        Ok(_) => panic!("a request with an upper-case header name opened a session"),
    }
    assert_eq!(ts.counter("refused_malformed"), 1);
    assert_eq!(ts.counter("sessions_accepted"), 0);
}

#[tokio::test]
async fn a_malformed_sec_websocket_key_gets_400_not_101() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ts = TestServer::start(|_| {}).await;
    for key in ["not base64!", "c2hvcnQ=", ""] {
        let mut tcp = tokio::net::TcpStream::connect(ts.server.http_addr)
            .await
            .unwrap();
        let request = format!(
            "GET /positions.ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0; 64];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut head))
            .await
            .unwrap()
            .unwrap();
        let status = String::from_utf8_lossy(&head[..n]);
        assert!(status.starts_with("HTTP/1.1 400"), "key {key:?}: {status}");
    }
    assert_eq!(ts.counter("ws_sessions_accepted"), 0);
}
