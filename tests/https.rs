//! With a CA-issued certificate (`--cert`/`--key`) the HTTP port speaks HTTPS with the same
//! certificate, so the page is a secure context anywhere and browsers open WebTransport to it
//! without a certificate hash.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const WAIT: Duration = Duration::from_secs(10);

/// A CA, and a certificate it issued for `names` with its key (PEM); the CA as a root store
/// and as PEM.
fn ca_issued(names: &[&str]) -> (String, String, rustls::RootCertStore, String) {
    let now = SystemTime::now();
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "fleetcast test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    leaf.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
    leaf.not_after = time::OffsetDateTime::from(now + Duration::from_secs(3 * 86_400));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    (cert.pem(), key.serialize_pem(), roots, ca_cert.pem())
}

/// A server with a CA-issued certificate for `names` (files in the returned directory, the
/// CA's as `ca.pem`), and the CA as a root store.
async fn https_server(
    names: &[&str],
    tweak: impl FnOnce(&mut fleetcast::server::ServeArgs),
) -> (TestServer, rustls::RootCertStore, tempfile::TempDir) {
    let (cert, key, roots, ca) = ca_issued(names);
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    let ts = TestServer::start(|a| {
        a.cert = Some(cert_path);
        a.key = Some(key_path);
        tweak(a);
    })
    .await;
    (ts, roots, dir)
}

/// Sends one HTTP/1.1 request over TLS (SNI `localhost`) and returns the whole response.
async fn https_get(ts: &TestServer, roots: &rustls::RootCertStore, request: &str) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(ts.server.http_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    tls.write_all(request.as_bytes()).await.unwrap();
    // The head of the answer is enough (an upgraded connection stays open after it).
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
            .await
            .expect("answered")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn a_ca_certificate_serves_https_on_the_http_port() {
    let (ts, roots, _files) = https_server(&["localhost", "fleet.test"], |_| {}).await;
    assert!(ts.server.https());

    let health = https_get(
        &ts,
        &roots,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let hash = https_get(
        &ts,
        &roots,
        "GET /certificate.sha256 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        hash.starts_with("HTTP/1.1 404"),
        "a CA certificate needs no hash: {hash}"
    );

    // The page's own origin on a name the certificate covers may open the WebSocket fallback.
    let upgrade = |origin: &str| {
        format!(
            "GET /positions.ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\n\r\n"
        )
    };
    let port = ts.server.http_addr.port();
    let own = https_get(&ts, &roots, &upgrade(&format!("https://fleet.test:{port}"))).await;
    assert!(own.starts_with("HTTP/1.1 101"), "{own}");
    let other = https_get(&ts, &roots, &upgrade("https://evil.example")).await;
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut tcp = TcpStream::connect(ts.server.http_addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test]
async fn a_client_that_never_finishes_the_tls_handshake_is_cut_off() {
    let (ts, _, _files) = https_server(&["localhost"], |a| {
        a.http_header_timeout = Duration::from_millis(500);
    })
    .await;
    let mut tcp = TcpStream::connect(ts.server.http_addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello, no more
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the server closed the stalled handshake: {closed:?}"
    );
    assert_eq!(ts.counter("http_header_timeouts"), 1);
}

#[tokio::test]
async fn fleetcast_publish_sends_fixes_over_https() {
    const TOKEN: &str = "https-publisher-token-0123";
    let (ts, _, files) = https_server(&["localhost"], |a| {
        a.feed = vec![fleetcast::server::config::Feed::Ingest];
        a.ingest.publish_token = vec![fleetcast::server::config::PublishToken::new(TOKEN)];
    })
    .await;
    let fixes = files.path().join("fixes.ndjson");
    std::fs::write(
        &fixes,
        "{\"id\": \"t1\", \"lat\": 52.36, \"lon\": 4.87}\n{\"id\": \"t2\", \"lat\": 52.361, \"lon\": 4.871}\n",
    )
    .unwrap();
    let url = format!("https://localhost:{}", ts.server.http_addr.port());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["publish", "--json", "--url", &url])
        .arg(&fixes)
        .env("FLEETCAST_PUBLISH_TOKEN", TOKEN)
        // The test CA, as an operator's private CA would be trusted: rustls-native-certs reads it.
        .env("SSL_CERT_FILE", files.path().join("ca.pem"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["accepted"], 2, "{summary}");
    assert_eq!(ts.counter("ingest_fixes_accepted"), 2);
}
