//! A client ends its session the way browsers do, and the server answers with close code 0.
//!
//! Browsers end a WebTransport session with a CLOSE_WEBTRANSPORT_SESSION capsule on the CONNECT
//! stream, or by finishing (FIN) that stream; wtransport's client can do neither (its close is a
//! bare QUIC CONNECTION_CLOSE). So these tests speak HTTP/3 themselves on a plain quinn
//! connection: SETTINGS, the CONNECT request, then one of the two endings, and read the QUIC
//! close code the server sends back (PROTOCOL.md section 8: 0, "the client ended the session").
//! Last, fleetcast's own client ends a session with code 5 when the Hello is not version 1.

mod common;

use std::borrow::Cow;
use std::time::Duration;

use common::TestServer;
use fleetcast::client;
use wtransport::proto::frame::{Frame, FrameKind};
use wtransport::proto::headers::Headers;
use wtransport::proto::session::SessionRequest;
use wtransport::proto::settings::Settings;
use wtransport::quinn;
use wtransport::{ClientConfig, VarInt};

const WAIT: Duration = Duration::from_secs(10);

/// A WebTransport session opened by hand over quinn.
struct RawSession {
    conn: quinn::Connection,
    /// Client side of the CONNECT stream.
    connect: quinn::SendStream,
    _response: quinn::RecvStream,
    _control: quinn::SendStream,
}

/// The client's half of a raw HTTP/3 connection with a CONNECT request sent.
struct Sent {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    connect: quinn::SendStream,
    response: quinn::RecvStream,
    control: quinn::SendStream,
}

/// Opens a QUIC connection, sends SETTINGS (with SETTINGS_H3_DATAGRAM when `h3_datagrams`, as
/// browsers do) on a control stream and the CONNECT request for the session path on a
/// bidirectional stream, without waiting for the server's SETTINGS or its answer.
async fn send_connect(ts: &TestServer, h3_datagrams: bool) -> Sent {
    let hash = ts.server.cert_hash.as_deref().expect("self-signed");
    let config = ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([client::parse_hash(hash).unwrap()])
        .build();
    let endpoint = quinn::Endpoint::client("[::]:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(config.quic_config().clone(), ts.server.wt_addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    let builder = Settings::builder()
        .qpack_max_table_capacity(VarInt::from_u32(0))
        .qpack_blocked_streams(VarInt::from_u32(0))
        .enable_webtransport()
        .webtransport_max_sessions(VarInt::from_u32(1));
    let settings = if h3_datagrams {
        builder.enable_h3_datagrams().build()
    } else {
        builder.build()
    };
    let mut control = conn.open_uni().await.unwrap();
    let mut bytes = vec![0x00];
    settings.generate_frame().write(&mut bytes).unwrap();
    control.write_all(&bytes).await.unwrap();

    let url = format!("https://localhost:{}/positions", ts.server.wt_addr.port());
    let request = SessionRequest::new(url).unwrap();
    let (mut connect, response) = conn.open_bi().await.unwrap();
    let mut bytes = Vec::new();
    request
        .headers()
        .generate_frame()
        .write(&mut bytes)
        .unwrap();
    connect.write_all(&bytes).await.unwrap();
    Sent {
        endpoint,
        conn,
        connect,
        response,
        control,
    }
}

/// Opens a session with the SETTINGS a browser sends and waits until the server runs it (its
/// first datagram arrived).
async fn open_raw(ts: &TestServer) -> (quinn::Endpoint, RawSession) {
    let Sent {
        endpoint,
        conn,
        connect,
        mut response,
        control,
    } = send_connect(ts, true).await;
    let mut buf = Vec::new();
    let headers = loop {
        let mut reader: &[u8] = &buf;
        if let Some(frame) = Frame::read(&mut reader).expect("HTTP/3 frame") {
            assert!(matches!(frame.kind(), FrameKind::Headers), "{frame:?}");
            break Headers::with_frame(&frame).expect("QPACK headers");
        }
        let chunk = tokio::time::timeout(WAIT, response.read_chunk(4096, true))
            .await
            .expect("response within 10 s")
            .expect("response stream open")
            .expect("response before FIN");
        buf.extend_from_slice(&chunk.bytes);
    };
    assert_eq!(headers.get(":status"), Some("200"));

    // A datagram means the server registered the session: it is running.
    let datagram = tokio::time::timeout(WAIT, conn.read_datagram())
        .await
        .expect("a datagram within 10 s")
        .expect("connection open");
    assert_eq!(datagram[0], 0, "quarter stream id of the first session");

    let session = RawSession {
        conn,
        connect,
        _response: response,
        _control: control,
    };
    (endpoint, session)
}

/// The QUIC application close code and reason the server closed the connection with.
async fn server_close(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the server closes within 10 s")
    {
        quinn::ConnectionError::ApplicationClosed(close) => (
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        other => panic!("not an application close: {other}"),
    }
}

/// CLOSE_WEBTRANSPORT_SESSION (capsule type 0x2843): a 32-bit code and a UTF-8 reason, in an
/// HTTP/3 DATA frame.
fn close_capsule(code: u32, reason: &str) -> Vec<u8> {
    let mut capsule = vec![0x68, 0x43]; // 0x2843 as a QUIC varint
    let len = 4 + reason.len();
    assert!(len < 64, "one-byte length");
    capsule.push(len as u8);
    capsule.extend_from_slice(&code.to_be_bytes());
    capsule.extend_from_slice(reason.as_bytes());
    let mut frame = Vec::new();
    Frame::new_data(Cow::Owned(capsule))
        .write(&mut frame)
        .unwrap();
    frame
}

#[tokio::test]
async fn client_fin_on_connect_stream_gets_close_code_zero() {
    let ts = TestServer::start(|_| {}).await;
    let (_endpoint, mut session) = open_raw(&ts).await;
    session.connect.finish().unwrap();
    let (code, reason) = server_close(&session.conn).await;
    assert_eq!(code, 0, "{reason}");
    assert_eq!(reason, "the client ended the session");
}

#[tokio::test]
async fn client_close_capsule_gets_close_code_zero() {
    let ts = TestServer::start(|_| {}).await;
    let (_endpoint, mut session) = open_raw(&ts).await;
    // What a page does that does not speak the Hello's version: closeCode 5.
    let capsule = close_capsule(5, "unsupported protocol version");
    session.connect.write_all(&capsule).await.unwrap();
    session.connect.finish().unwrap();
    let (code, reason) = server_close(&session.conn).await;
    assert_eq!(code, 0, "{reason}");
    assert_eq!(reason, "the client ended the session");
    // The other sessions and the server carry on.
    assert_eq!(ts.healthz().await["status"], "ok");
}

#[tokio::test]
async fn a_client_without_h3_datagrams_in_its_settings_gets_no_session_and_no_datagram() {
    // RFC 9297 §2.1.1: datagrams go only to a peer that announced SETTINGS_H3_DATAGRAM = 1,
    // and a WebTransport session needs them. The server closes such a connection with
    // H3_SETTINGS_ERROR (0x109) instead of opening a session and sending it ticks.
    let ts = TestServer::start(|_| {}).await;
    let sent = send_connect(&ts, false).await;
    let (code, reason) = server_close(&sent.conn).await;
    assert_eq!(code, 0x109, "{reason}");
    assert!(
        tokio::time::timeout(Duration::from_millis(1), sent.conn.read_datagram())
            .await
            .map_or(true, |d| d.is_err()),
        "no datagram"
    );
    assert_eq!(ts.counter("sessions_accepted"), 0);
    drop(sent.endpoint);
}

#[tokio::test]
async fn client_close_capsule_without_fin_ends_the_session_too() {
    // The capsule ends the session; a FIN may follow later or never. A server that waits for
    // the FIN would keep sending datagrams meanwhile.
    let ts = TestServer::start(|_| {}).await;
    let (_endpoint, mut session) = open_raw(&ts).await;
    let capsule = close_capsule(0, "");
    session.connect.write_all(&capsule).await.unwrap();
    let (code, reason) = server_close(&session.conn).await;
    assert_eq!(code, 0, "{reason}");
    assert_eq!(reason, "the client ended the session");
}

#[tokio::test]
async fn native_client_closes_with_code_5_when_the_hello_is_not_version_1() {
    use fleetcast::client::{ClientOptions, Trust};
    use fleetcast::proto::quant::Quantisation;
    use fleetcast::proto::wire::{CloseCode, Hello, StreamMessage};
    use wtransport::error::ConnectionError;
    use wtransport::{Identity, ServerConfig};

    // A server from the future: its Hello says version 2.
    let identity = Identity::self_signed(["localhost", "::1"]).unwrap();
    let hash = identity.certificate_chain().as_slice()[0].hash();
    let config = ServerConfig::builder()
        .with_bind_address("[::1]:0".parse().unwrap())
        .with_identity(identity)
        .build();
    let server = wtransport::Endpoint::server(config).unwrap();
    let port = server.local_addr().unwrap().port();
    let future_server = tokio::spawn(async move {
        let request = server.accept().await.await.expect("CONNECT");
        let conn = request.accept().await.expect("session");
        let mut stream = conn.open_uni().await.unwrap().await.unwrap();
        let mut bytes = Vec::new();
        StreamMessage::Hello(Hello {
            version: 2,
            tick_interval_ms: 1000,
            server_time_us: 1,
            quant: Quantisation::for_area(52.35, 4.86, 4000.0),
            server: "fleetcast/9".into(),
            bounds: None,
        })
        .encode_frame(&mut bytes)
        .unwrap();
        stream.write_all(&bytes).await.unwrap();
        tokio::time::timeout(WAIT, conn.closed()).await
    });

    let endpoint = client::endpoint(&ClientOptions::new(Trust::Hashes(vec![hash]))).unwrap();
    let url = format!("https://[::1]:{port}/positions");
    let mut session = client::open(&endpoint, &url, None).await.expect("opens");
    let end = common::ended(&mut session, WAIT).await;
    assert!(end.by_client, "{end}");
    assert_eq!(
        end.close_code(),
        Some(CloseCode::UnsupportedVersion),
        "{end}"
    );
    assert!(end.reason.contains("protocol version 2"), "{end}");
    match future_server.await.unwrap().expect("the client closes") {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.code().into_inner(), 5);
            assert!(String::from_utf8_lossy(close.reason()).contains("version 2"));
        }
        other => panic!("not an application close: {other}"),
    }
}
