//! The server's WebTransport timeouts against clients that stop halfway: a QUIC client that
//! never sends its CONNECT request (`--handshake-timeout`), clients that fall silent
//! (`--idle-timeout`), a session that never reads its stream and clients that cannot take the
//! answer to their request (`--write-timeout`). Each timed-out connection must really be
//! closed: the client sees the close and the server's gauges drop.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::relay::{Impairment, Relay};
use common::TestServer;
use fleetcast::client;
use fleetcast::proto::wire::CloseCode;

/// A plain QUIC client speaking ALPN `h3` that trusts the server's certificate hash, with an
/// idle timeout of 30 s and, if given, keep-alives: it completes the QUIC handshake and then
/// does only what the test tells it to.
fn raw_quic_endpoint(ts: &TestServer, keep_alive: Option<Duration>) -> quinn::Endpoint {
    raw_quic_endpoint_with(ts, keep_alive, |_| {})
}

/// [`raw_quic_endpoint`] with `tweak` applied to its transport settings.
fn raw_quic_endpoint_with(
    ts: &TestServer,
    keep_alive: Option<Duration>,
    tweak: impl FnOnce(&mut quinn::TransportConfig),
) -> quinn::Endpoint {
    let hash = client::parse_hash(ts.server.cert_hash.as_deref().unwrap()).unwrap();
    let verifier = wtransport::tls::client::ServerHashVerification::new([hash]);
    // ALPN h3, TLS 1.3 only, as wtransport's own client.
    let tls = wtransport::tls::client::build_default_tls_config(
        Arc::new(rustls::RootCertStore::empty()),
        Some(Arc::new(verifier)),
    );
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    transport.keep_alive_interval(keep_alive);
    tweak(&mut transport);
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("[::1]:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// Completes a QUIC handshake with the server.
async fn raw_connect(endpoint: &quinn::Endpoint, ts: &TestServer) -> quinn::Connection {
    endpoint
        .connect(ts.server.wt_addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake")
}

/// Waits for the connection to close; returns how and after how long.
async fn closed_within(
    conn: &quinn::Connection,
    limit: Duration,
) -> (quinn::ConnectionError, Duration) {
    let started = Instant::now();
    let reason = tokio::time::timeout(limit, conn.closed())
        .await
        .unwrap_or_else(|_| panic!("connection still open after {limit:?}"));
    (reason, started.elapsed())
}

/// Waits for the server to close `conn` at its 1 s `--handshake-timeout`: not sooner, not by
/// the client's own idle timeout, and counted as a failed handshake.
async fn closed_by_the_one_second_handshake_timeout(conn: &quinn::Connection, ts: &TestServer) {
    let (reason, after) = closed_within(conn, Duration::from_secs(5)).await;
    assert!(
        after >= Duration::from_millis(800),
        "closed after {after:?}: {reason}"
    );
    assert!(
        !matches!(reason, quinn::ConnectionError::TimedOut),
        "the client timed out itself: {reason}"
    );
    assert_eq!(ts.counter("handshake_failed"), 1);
}

#[tokio::test]
async fn a_client_that_never_sends_connect_is_closed_at_the_handshake_timeout() {
    let ts = TestServer::start(|a| {
        a.handshake_timeout = Duration::from_secs(1);
        a.max_handshakes = 1;
    })
    .await;
    // Keep-alives every 200 ms: only the handshake timeout can end this connection.
    let endpoint = raw_quic_endpoint(&ts, Some(Duration::from_millis(200)));
    let conn = raw_connect(&endpoint, &ts).await;
    closed_by_the_one_second_handshake_timeout(&conn, &ts).await;
    // Its handshake slot (the only one) is free again: a real session opens.
    let (_ep, mut session) = ts.open().await;
    let _ = common::initial_state(&mut session).await;
}

#[tokio::test]
async fn a_client_that_sends_settings_but_never_connect_is_closed_at_the_handshake_timeout() {
    let ts = TestServer::start(|a| a.handshake_timeout = Duration::from_secs(1)).await;
    let endpoint = raw_quic_endpoint(&ts, Some(Duration::from_millis(200)));
    let conn = raw_connect(&endpoint, &ts).await;
    // An HTTP/3 control stream with a browser's SETTINGS, as a client starts: the server then
    // waits for the CONNECT request that never comes.
    let mut bytes = vec![0x00]; // control stream type
    wtransport_proto::settings::Settings::builder()
        .enable_webtransport()
        .enable_h3_datagrams()
        .enable_connect_protocol()
        .build()
        .generate_frame()
        .write(&mut bytes)
        .unwrap();
    let mut control = conn.open_uni().await.unwrap();
    control.write_all(&bytes).await.unwrap();
    closed_by_the_one_second_handshake_timeout(&conn, &ts).await;
}

/// Sends what a WebTransport client sends first: an HTTP/3 control stream with its SETTINGS,
/// and a CONNECT request for `path` on a new request stream (kept open, as a session's is).
async fn send_connect(
    conn: &quinn::Connection,
    ts: &TestServer,
    path: &str,
) -> (quinn::SendStream, quinn::RecvStream) {
    use wtransport_proto::session::SessionRequest;
    use wtransport_proto::settings::Settings;
    let mut control = vec![0x00]; // control stream type
    Settings::builder()
        .enable_webtransport()
        .enable_h3_datagrams()
        .enable_connect_protocol()
        .build()
        .generate_frame()
        .write(&mut control)
        .unwrap();
    let mut stream = conn.open_uni().await.unwrap();
    stream.write_all(&control).await.unwrap();
    let url = format!("https://localhost:{}{path}", ts.server.wt_addr.port());
    let mut request = Vec::new();
    SessionRequest::new(url)
        .unwrap()
        .headers()
        .generate_frame()
        .write(&mut request)
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&request).await.unwrap();
    // The control stream must stay open for the connection's life.
    std::mem::forget(stream);
    (send, recv)
}

/// Bytes the server sends on its own streams (HTTP/3 control and QPACK streams) before any
/// request, measured with a raw client that reads them for half a second.
async fn server_preamble_bytes(ts: &TestServer) -> u64 {
    let endpoint = raw_quic_endpoint(ts, None);
    let conn = raw_connect(&endpoint, ts).await;
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reading = {
        let (conn, total) = (conn.clone(), total.clone());
        async move {
            while let Ok(mut stream) = conn.accept_uni().await {
                let total = total.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(Some(n)) = stream.read(&mut buf).await {
                        total.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), reading).await;
    conn.close(0u32.into(), b"measured");
    let total = total.load(std::sync::atomic::Ordering::Relaxed);
    assert!(total > 0, "the server sent no SETTINGS");
    total
}

/// A raw client that sends a CONNECT request for `path` after granting the server only the
/// flow-control credit its HTTP/3 preamble needs, and never reads: the server can never write
/// its answer. (An attacker measures the preamble once, as this does.)
async fn unanswerable_connect(ts: &TestServer, path: &str) -> (quinn::Endpoint, quinn::Connection) {
    let preamble = server_preamble_bytes(ts).await;
    let credit = u32::try_from(preamble).unwrap();
    let endpoint = raw_quic_endpoint_with(ts, Some(Duration::from_millis(200)), |t| {
        t.receive_window(credit.into());
        t.stream_receive_window(credit.into());
    });
    let conn = raw_connect(&endpoint, ts).await;
    // Neither finished nor stopped (dropping the receiving half would send STOP_SENDING,
    // which ends the exchange at once): the answer just never fits.
    let request = send_connect(&conn, ts, path).await;
    std::mem::forget(request);
    (endpoint, conn)
}

#[tokio::test]
async fn a_refusal_the_client_cannot_receive_is_closed_at_the_write_timeout() {
    let ts = TestServer::start(|a| a.write_timeout = Duration::from_secs(1)).await;
    let (_endpoint, conn) = unanswerable_connect(&ts, "/nope").await;
    common::wait_until("the 404 decided", Duration::from_secs(5), || {
        ts.counter("refused_not_found") == 1
    })
    .await;
    let (reason, _) = closed_within(&conn, Duration::from_secs(5)).await;
    assert!(
        !matches!(reason, quinn::ConnectionError::TimedOut),
        "the client timed out itself: {reason}"
    );
    assert_eq!(ts.counter("reply_timeouts"), 1);
}

#[tokio::test]
async fn an_accept_the_client_cannot_receive_is_closed_at_the_write_timeout() {
    let ts = TestServer::start(|a| {
        a.write_timeout = Duration::from_secs(1);
        a.max_sessions = 1;
    })
    .await;
    let (_endpoint, conn) = unanswerable_connect(&ts, "/positions").await;
    common::wait_until("the session slot taken", Duration::from_secs(5), || {
        ts.server.sessions() == 1
    })
    .await;
    let (reason, _) = closed_within(&conn, Duration::from_secs(5)).await;
    assert!(
        !matches!(reason, quinn::ConnectionError::TimedOut),
        "the client timed out itself: {reason}"
    );
    // Its slot (the only one) is free again: a real session opens.
    common::wait_until(
        "the session slot given back",
        Duration::from_secs(2),
        || ts.server.sessions() == 0,
    )
    .await;
    let (_ep, mut session) = ts.open().await;
    let _ = common::initial_state(&mut session).await;
}

#[tokio::test]
async fn a_silent_client_is_closed_at_the_idle_timeout_before_its_session() {
    let ts = TestServer::start(|a| {
        a.idle_timeout = Duration::from_secs(1);
        a.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    // No keep-alives: after the handshake nothing more comes from this client.
    let endpoint = raw_quic_endpoint(&ts, None);
    let conn = raw_connect(&endpoint, &ts).await;
    let (reason, after) = closed_within(&conn, Duration::from_secs(5)).await;
    assert!(
        matches!(reason, quinn::ConnectionError::TimedOut),
        "{reason}"
    );
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
    // The server dropped it too, long before its handshake timeout.
    common::wait_until(
        "the server counts the lost handshake",
        Duration::from_secs(3),
        || ts.counter("handshake_failed") == 1,
    )
    .await;
}

#[tokio::test]
async fn an_open_session_whose_client_vanishes_is_closed_at_the_idle_timeout() {
    let ts = TestServer::start(|a| a.idle_timeout = Duration::from_secs(1)).await;
    let relay = Relay::start(
        ts.server.wt_addr,
        Impairment {
            drop: 0.0,
            delay_share: 0.0,
            delay: Duration::ZERO,
            grace_packets: 0,
        },
        1,
    )
    .await;
    let endpoint = ts.endpoint();
    let url = common::url_for(relay.addr, "/positions");
    let mut session = client::open(&endpoint, &url, None).await.expect("opens");
    let _ = common::initial_state(&mut session).await;
    assert_eq!(ts.server.sessions(), 1);
    assert_eq!(ts.counter("open_webtransport"), 1);
    // The path goes dark: no packet passes either way any more.
    drop(relay);
    let started = Instant::now();
    common::wait_until(
        "the session closed by the server",
        Duration::from_secs(5),
        || ts.server.sessions() == 0 && ts.counter("open_webtransport") == 0,
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    // The client, cut off too, gives up on its own.
    let end = common::ended(&mut session, Duration::from_secs(5)).await;
    assert_eq!(end.code, None, "{end}");
}

#[tokio::test]
async fn a_session_that_never_reads_its_stream_is_closed_at_the_write_timeout() {
    let ts = TestServer::start(|a| {
        a.write_timeout = Duration::from_secs(1);
        // A roster larger than the client's stream window.
        a.sim.cars = 2000;
    })
    .await;
    // A wtransport client whose stream window is small and which never reads its stream.
    let hash = client::parse_hash(ts.server.cert_hash.as_deref().unwrap()).unwrap();
    let mut config = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([hash])
        .build();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(1024u32.into());
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    config
        .quic_config_mut()
        .transport_config(Arc::new(transport));
    let endpoint = wtransport::Endpoint::client(config).unwrap();
    let conn = endpoint.connect(ts.url()).await.expect("session opens");
    common::wait_until("the session open", Duration::from_secs(5), || {
        ts.counter("open_webtransport") == 1
    })
    .await;
    let started = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the session still open 5 s after it stopped reading");
    let after = started.elapsed();
    match reason {
        wtransport::error::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.code().into_inner(),
                u64::from(CloseCode::SlowConsumer.code()),
                "{close:?}"
            );
        }
        other => panic!("closed otherwise: {other}"),
    }
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
    assert_eq!(ts.counter("closed_slow"), 1);
    common::wait_until(
        "the server's gauges back to 0",
        Duration::from_secs(2),
        || ts.server.sessions() == 0 && ts.counter("open_webtransport") == 0,
    )
    .await;
}

#[tokio::test]
async fn a_session_survives_a_pause_in_ticks_longer_than_the_idle_timeout() {
    // A cluster whose NATS is away sends no ticks for a while: the sessions must stay open.
    let ts = TestServer::start(|a| a.idle_timeout = Duration::from_secs(1)).await;
    // Like a browser, the client sends no keep-alives of its own.
    let (_endpoint, mut session) = ts.open().await;
    let mut view = common::initial_state(&mut session).await;
    let paused = ts.server.danger_pause_ticks().await;
    let newest = ts.healthz().await["tick"].as_u64().unwrap();
    // Three idle timeouts without a tick: only the server's PINGs keep the session open.
    let quiet = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match session.next().await {
                Ok(_) => {}
                Err(end) => return end,
            }
        }
    })
    .await;
    if let Ok(end) = quiet {
        panic!("the session ended during the pause: {end}");
    }
    drop(paused);
    assert!(
        common::follow(
            &mut session,
            &mut view,
            Duration::from_secs(5),
            |_, part| { part.is_some_and(|p| p.tick > newest) }
        )
        .await,
        "no tick after the pause"
    );
}
