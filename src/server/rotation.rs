//! Certificates that change while the server runs: the self-signed one is renewed before it
//! expires, a CA-issued one is reloaded when its files change or on SIGHUP (for WebTransport
//! and for HTTPS on the HTTP port alike).
//!
//! Open sessions keep the certificate they were made with; only new connections see the new
//! one. For the self-signed certificate the next hash is published (`/certificate.sha256` lists
//! the current and the next) well before the switch, so a page that fetched the hashes at any
//! point trusts whichever certificate it meets (see [`certs::Rotation`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{QuicFront, Shared};
use crate::certs::{self, Rotation, ServerIdentity};

/// Renews or reloads the endpoint's certificate until `token` is cancelled.
pub(crate) async fn run(
    shared: Arc<Shared>,
    endpoint: Arc<QuicFront>,
    not_after: SystemTime,
    token: CancellationToken,
) {
    let result = match (&shared.args.cert, &shared.args.key) {
        (Some(cert), Some(key)) => {
            reload_files(&shared, &endpoint, cert.clone(), key.clone(), &token).await
        }
        _ => renew_self_signed(&shared, &endpoint, not_after, &token).await,
    };
    if let Err(e) = result {
        warn!("certificate rotation stopped: {e:#}");
    }
}

/// Makes the endpoint serve `identity` to new connections.
fn install(shared: &Shared, endpoint: &QuicFront, identity: &ServerIdentity) -> Result<()> {
    let https = match &shared.https {
        Some(_) => Some(super::tls_acceptor(&identity.identity)?),
        None => None,
    };
    endpoint.install(&identity.identity, &shared.args)?;
    if let (Some(slot), Some(acceptor)) = (&shared.https, https) {
        *slot.write().expect("https lock poisoned") = acceptor;
    }
    Ok(())
}

async fn renew_self_signed(
    shared: &Shared,
    endpoint: &QuicFront,
    mut not_after: SystemTime,
    token: &CancellationToken,
) -> Result<()> {
    let rotation = Rotation {
        validity: shared.args.cert_validity,
    };
    let check =
        (rotation.validity / 100).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let dir = &shared.args.cert_dir;
    let names = shared.args.cert_names();
    let mut next: Option<(ServerIdentity, String, String)> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(check) => {}
        }
        let now = SystemTime::now();
        let remaining = not_after.duration_since(now).unwrap_or_default();
        if next.is_none() && remaining <= rotation.publish_next_at() {
            let made = certs::next_self_signed(dir, &names, now, rotation).await?;
            let hash = made.0.hash_hex.clone().unwrap_or_default();
            shared.set_cert_hashes(|h| h.push(hash.clone()));
            info!("next certificate ready, sha-256 {hash}; published beside the current one");
            next = Some(made);
        }
        if remaining <= rotation.switch_at() {
            let Some((identity, cert_pem, key_pem)) = next.take() else {
                continue; // made on the next pass
            };
            install(shared, endpoint, &identity)?;
            if let Err(e) = certs::store(dir, &cert_pem, &key_pem) {
                warn!("new certificate in use but not stored for the next start: {e:#}");
            }
            let hash = identity.hash_hex.clone().unwrap_or_default();
            shared.set_cert_hashes(|h| *h = vec![hash.clone()]);
            not_after = identity.not_after;
            shared
                .stats
                .cert_rotations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            info!("new connections now get the certificate with sha-256 {hash}");
        }
    }
}

async fn reload_files(
    shared: &Shared,
    endpoint: &QuicFront,
    cert: PathBuf,
    key: PathBuf,
    token: &CancellationToken,
) -> Result<()> {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = (modified(&cert), modified(&key));
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        #[cfg(unix)]
        let signalled = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = hangup.recv() => true,
            _ = tokio::time::sleep(shared.args.cert_reload_check.max(Duration::from_millis(50))) => false,
        };
        #[cfg(not(unix))]
        let signalled = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(shared.args.cert_reload_check.max(Duration::from_millis(50))) => false,
        };
        let now = (modified(&cert), modified(&key));
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        match certs::from_files(&cert, &key).await {
            Ok(identity) => {
                install(shared, endpoint, &identity)?;
                shared
                    .stats
                    .cert_rotations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(
                    "reloaded {} and {} for new connections",
                    cert.display(),
                    key.display()
                );
            }
            // A half-copied file, say: keep serving the old pair, try again on the next change.
            Err(e) => {
                shared
                    .stats
                    .cert_reload_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!("certificate files not reloaded, keeping the old pair: {e:#}");
            }
        }
    }
}
