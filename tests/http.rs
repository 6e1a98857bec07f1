//! The HTTP side's limits against a real server over real sockets: header-read and keep-alive
//! timeouts, connections per client address, and shutdown with clients that never finish.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::TestServer;

/// Reads until the server closes the connection (or `limit` passes); returns what it sent and
/// how long it took, `None` if it was still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<(String, Duration)> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&got).into_owned(),
                    started.elapsed(),
                ))
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn half_a_request_header_is_cut_off_after_the_header_timeout() {
    let ts = TestServer::start(|a| a.http_header_timeout = Duration::from_secs(1)).await;
    let mut slow = TcpStream::connect(ts.server.http_addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    // A connection that sends nothing at all is cut off the same way.
    let mut silent = TcpStream::connect(ts.server.http_addr).await.unwrap();
    let (sent, after) = read_until_closed(&mut slow, Duration::from_secs(5))
        .await
        .expect("the half-sent request is still open after 5 s");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    assert!(!sent.contains("200 OK"), "{sent}");
    read_until_closed(&mut silent, Duration::from_secs(5))
        .await
        .expect("the silent connection is still open after 5 s");
    common::wait_until(
        "two header timeouts counted",
        Duration::from_secs(2),
        || ts.counter("http_header_timeouts") == 2,
    )
    .await;
    // Everyone else is still served.
    assert_eq!(ts.health().await.0, 200);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let ts = TestServer::start(|a| a.http_header_timeout = Duration::from_secs(1)).await;
    let mut conn = TcpStream::connect(ts.server.http_addr).await.unwrap();
    conn.write_all(b"GET /config.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    // Kept alive, then idle: closed once the timeout passes.
    let (_, after) = read_until_closed(&mut conn, Duration::from_secs(5))
        .await
        .expect("the idle connection is still open after 5 s");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let ts = TestServer::start(|a| {
        a.max_http_conns_per_ip = 3;
        a.limit_loopback = true;
        a.http_header_timeout = Duration::from_secs(30);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(ts.server.http_addr).await.unwrap());
    }
    // The fourth is told so and closed at once.
    let mut fourth = TcpStream::connect(ts.server.http_addr).await.unwrap();
    let (sent, _) = read_until_closed(&mut fourth, Duration::from_secs(5))
        .await
        .expect("the fourth connection is still open");
    assert!(
        sent.is_empty() || sent.starts_with("HTTP/1.1 429"),
        "{sent}"
    );
    assert_eq!(ts.counter("http_refused_per_ip"), 1);
    // The three are still open and served.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (reply, _) = read_until_closed(&mut first, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // With one gone there is room again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = ts.health().await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn websocket_sessions_count_against_the_address() {
    let ts = TestServer::start(|a| {
        a.max_http_conns_per_ip = 2;
        a.limit_loopback = true;
    })
    .await;
    let url = format!("ws://{}/positions.ws", ts.server.http_addr);
    let (one, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (_two, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(
        tokio_tungstenite::connect_async(&url).await.is_err(),
        "a third connection from the address"
    );
    drop(one);
    // The slot comes back when the session's socket closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio_tungstenite::connect_async(&url).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the closed session kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_is_bounded_with_a_half_sent_request_open() {
    let ts = TestServer::start(|a| {
        a.shutdown_timeout = Duration::from_secs(1);
        a.http_header_timeout = Duration::from_secs(60);
    })
    .await;
    let mut slow = TcpStream::connect(ts.server.http_addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    common::wait_until("the connection accepted", Duration::from_secs(5), || {
        ts.counter("open_http_connections") == 1
    })
    .await;
    let started = Instant::now();
    ts.server.shutdown();
    tokio::time::timeout(Duration::from_secs(5), ts.server.wait())
        .await
        .expect("shutdown finished within 5 s with a half-sent request open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The slow client's connection is closed, not left behind.
    read_until_closed(&mut slow, Duration::from_secs(2))
        .await
        .expect("the half-sent request is still open after shutdown");
}

#[tokio::test]
async fn config_roads_and_hash_may_be_read_from_another_origin() {
    // fleetcast-client.js on a dashboard's own origin fetches these cross-origin.
    let ts = TestServer::start(|_| {}).await;
    for path in ["/config.json", "/roads.json", "/certificate.sha256"] {
        let response = reqwest::Client::new()
            .get(format!("http://{}{path}", ts.server.http_addr))
            .header("origin", "https://dashboard.example")
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response
                .headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap()),
            Some("*"),
            "{path}"
        );
    }
}
