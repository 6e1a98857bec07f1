//! A lossy, reordering UDP relay between one client and the server, on loopback.
//!
//! The kernel here has no netem; this relay drops a share of the server's packets and delays
//! some, so QUIC sees real loss and reordering on real sockets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

/// Relay behaviour for packets from the server to the client.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Share of packets dropped, 0..1.
    pub drop: f64,
    /// Share of (surviving) packets delayed by `delay`, 0..1.
    pub delay_share: f64,
    /// How long delayed packets are held.
    pub delay: Duration,
    /// Packets passed untouched at the start (the handshake).
    pub grace_packets: u64,
}

/// A running relay.
pub struct Relay {
    /// Where clients should connect.
    pub addr: SocketAddr,
    /// Server-to-client packets dropped so far.
    pub dropped: Arc<AtomicU64>,
    /// Server-to-client packets delayed so far.
    pub delayed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Starts a relay on `[::1]:0` forwarding to `server`.
    pub async fn start(server: SocketAddr, imp: Impairment, seed: u64) -> Relay {
        let front = Arc::new(UdpSocket::bind("[::1]:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("[::1]:0").await.unwrap());
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let delayed = Arc::new(AtomicU64::new(0));
        let (d1, d2) = (dropped.clone(), delayed.clone());
        let task = tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut client: Option<SocketAddr> = None;
            let mut from_server = 0u64;
            let mut a = vec![0u8; 65536];
            let mut b = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        let _ = back.send(&a[..n]).await;
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { return };
                        let Some(to) = client else { continue };
                        from_server += 1;
                        if from_server > imp.grace_packets {
                            if rng.random_bool(imp.drop) {
                                d1.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if rng.random_bool(imp.delay_share) {
                                d2.fetch_add(1, Ordering::Relaxed);
                                let packet = b[..n].to_vec();
                                let front = front.clone();
                                let delay = imp.delay;
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = front.send_to(&packet, to).await;
                                });
                                continue;
                            }
                        }
                        let _ = front.send_to(&b[..n], to).await;
                    }
                }
            }
        });
        Relay {
            addr,
            dropped,
            delayed,
            task,
        }
    }
}
