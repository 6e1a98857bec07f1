//! Certificates that change under a running server: the self-signed one is renewed with an
//! overlap, CA-issued files are reloaded, and open sessions never notice.

mod common;

use std::time::{Duration, SystemTime};

use common::{follow, initial_state, TestServer};
use fleetcast::client::{self, ClientOptions, Trust};
use fleetcast::proto::view::FleetView;

const WAIT: Duration = Duration::from_secs(20);

/// Opens a session trusting only `hash`; `Ok` if it opened and got its initial state.
async fn open_trusting(ts: &TestServer, hash: &str) -> anyhow::Result<()> {
    let trust = Trust::Hashes(vec![client::parse_hash(hash)?]);
    let endpoint = client::endpoint(&ClientOptions::new(trust))?;
    let mut session = client::open(&endpoint, &ts.url(), None).await?;
    initial_state(&mut session).await;
    Ok(())
}

/// Waits until `/certificate.sha256` (over real HTTP) lists exactly `n` hashes; returns them.
async fn published(ts: &TestServer, n: usize) -> Vec<String> {
    let url = format!("http://{}/certificate.sha256", ts.server.http_addr);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let hashes: Vec<String> = text.lines().map(str::to_string).collect();
        if hashes.len() == n {
            return hashes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} hashes: {hashes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Follows `session` until a tick newer than any it had arrives.
async fn still_gets_ticks(session: &mut client::Session, view: &mut FleetView) {
    let before = view.counts().received;
    assert!(
        follow(session, view, WAIT, |v, _| v.counts().received > before + 1).await,
        "the open session stopped getting ticks"
    );
}

#[tokio::test]
async fn self_signed_certificate_is_renewed_with_an_overlap_and_open_sessions_stay() {
    // 8 s validity: the next hash is published with 4 s left, new connections switch with 2 s.
    let ts = TestServer::start(|a| a.cert_validity = Duration::from_secs(8)).await;
    let first = published(&ts, 1).await;
    assert_eq!(Some(&first[0]), ts.server.cert_hash.as_ref());
    let (_ep, mut open) = ts.open().await;
    let mut view = initial_state(&mut open).await;

    // Before the switch both hashes are listed, current first, and the current one serves.
    let both = published(&ts, 2).await;
    assert_eq!(both[0], first[0]);
    let next = both[1].clone();
    assert_ne!(next, first[0]);
    open_trusting(&ts, &first[0])
        .await
        .expect("the current certificate still serves");

    // After the switch only the new hash is listed and new connections get the new certificate.
    let after = published(&ts, 1).await;
    assert_eq!(after, std::slice::from_ref(&next));
    open_trusting(&ts, &next)
        .await
        .expect("the new certificate serves");
    let old = open_trusting(&ts, &first[0]).await;
    assert!(
        old.is_err(),
        "a client trusting only the old hash is refused"
    );
    assert!(ts.counter("cert_rotations") >= 1);

    // The session opened under the old certificate never noticed.
    still_gets_ticks(&mut open, &mut view).await;

    // The new pair is stored for the next start.
    let stored = std::fs::read(ts.dir.path().join("fleetcast-cert.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&stored).unwrap();
    assert_eq!(fleetcast::certs::sha256_hex(&pem.contents), next);
}

/// A short-lived certificate and key, PEM, for `--cert`/`--key` (clients trust it by hash).
fn pair() -> (String, String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "::1".into()]).unwrap();
    let now = SystemTime::now();
    params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = time::OffsetDateTime::from(now + Duration::from_secs(3 * 86_400));
    let cert = params.self_signed(&key).unwrap();
    let hash = fleetcast::certs::sha256_hex(cert.der());
    (cert.pem(), key.serialize_pem(), hash)
}

#[tokio::test]
async fn changed_cert_and_key_files_are_reloaded_for_new_connections() {
    let files = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (files.path().join("c.pem"), files.path().join("k.pem"));
    let (cert_a, key_a, hash_a) = pair();
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let ts = TestServer::start(|a| {
        a.cert = Some(cert_path.clone());
        a.key = Some(key_path.clone());
        a.cert_reload_check = Duration::from_millis(100);
    })
    .await;
    let trust_a = Trust::Hashes(vec![client::parse_hash(&hash_a).unwrap()]);
    let endpoint = client::endpoint(&ClientOptions::new(trust_a)).unwrap();
    let mut open = client::open(&endpoint, &ts.url(), None).await.unwrap();
    let mut view = initial_state(&mut open).await;

    // A half-written pair (new key, old certificate) is not taken: A keeps serving.
    let (cert_b, key_b, hash_b) = pair();
    std::fs::write(&key_path, &key_b).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while ts.counter("cert_reload_failed") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change was never looked at"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open_trusting(&ts, &hash_a).await.expect("A still serves");
    assert_eq!(ts.counter("cert_rotations"), 0);

    // The whole new pair is taken.
    std::fs::write(&cert_path, &cert_b).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while ts.counter("cert_rotations") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open_trusting(&ts, &hash_b)
        .await
        .expect("B serves new connections");
    assert!(
        open_trusting(&ts, &hash_a).await.is_err(),
        "A no longer does"
    );
    still_gets_ticks(&mut open, &mut view).await;
}
