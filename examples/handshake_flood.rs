//! A handshake flood, for `bench/flood.sh`: N QUIC connections at R a second from one local
//! address, each completing the QUIC handshake and then saying nothing (no SETTINGS, no
//! CONNECT), as a broken or hostile host does. Each holds a server handshake slot until the
//! server's `--handshake-timeout`. Prints one JSON object with what happened to them.
//!
//!   cargo run --release --example handshake_flood -- SERVER_ADDR CERT_HASH COUNT RATE BIND_IP
//!
//! Loopback only: the bench script passes 127.0.0.x addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fleetcast::client;
use wtransport::ClientConfig;

#[derive(Default)]
struct Counts {
    completed: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, hash, count, rate, bind] = &args[..] else {
        anyhow::bail!("usage: handshake_flood SERVER_ADDR CERT_HASH COUNT RATE BIND_IP");
    };
    let server: SocketAddr = server.parse().context("server address")?;
    let count: u64 = count.parse()?;
    let rate: f64 = rate.parse()?;
    let bind: IpAddr = bind.parse()?;
    let config = ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([client::parse_hash(hash)?])
        .build();
    let quic = config.quic_config().clone();
    let endpoint = quinn::Endpoint::client(SocketAddr::new(bind, 0))?;
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let connecting = endpoint.connect_with(quic.clone(), server, "localhost")?;
        let counts = counts.clone();
        tasks.spawn(async move {
            match connecting.await {
                Ok(conn) => {
                    counts.completed.fetch_add(1, Ordering::Relaxed);
                    // Say nothing; the server closes it at its handshake timeout.
                    let _ = tokio::time::timeout(Duration::from_secs(60), conn.closed()).await;
                }
                Err(quinn::ConnectionError::ConnectionClosed(_)) => {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let sent_s = started.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    println!(
        "{}",
        serde_json::json!({
            "attempts": count,
            "rate_per_s": rate,
            "sending_s": sent_s,
            "handshakes_completed": counts.completed.load(Ordering::Relaxed),
            "refused": counts.refused.load(Ordering::Relaxed),
            "failed": counts.failed.load(Ordering::Relaxed),
        })
    );
    Ok(())
}
