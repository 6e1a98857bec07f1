//! The fan-out engine's own behaviour (`--engine proto`): shards, and clients whose address
//! changes under them.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use fleetcast::client;
use fleetcast::server::config::Engine;
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// A NAT between one client and the server that can give the client a new public port at any
/// moment, as a home router does when its mapping expires (NAT rebinding).
struct Nat {
    addr: SocketAddr,
    back: watch::Sender<Arc<UdpSocket>>,
    server: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Nat {
    async fn start(server: SocketAddr) -> Nat {
        let front = Arc::new(UdpSocket::bind("[::1]:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let first = Arc::new(Self::outside(server).await);
        let (back, mut backs) = watch::channel(first);
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut a = vec![0u8; 65536];
            let mut b = vec![0u8; 65536];
            let mut out = backs.borrow_and_update().clone();
            loop {
                tokio::select! {
                    changed = backs.changed() => {
                        if changed.is_err() { return; }
                        out = backs.borrow_and_update().clone();
                    }
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        let _ = out.send(&a[..n]).await;
                    }
                    r = out.recv(&mut b) => {
                        let Ok(n) = r else { continue };
                        if let Some(to) = client {
                            let _ = front.send_to(&b[..n], to).await;
                        }
                    }
                }
            }
        });
        Nat {
            addr,
            back,
            server,
            task,
        }
    }

    /// A socket on a new port, facing the server.
    async fn outside(server: SocketAddr) -> UdpSocket {
        let socket = UdpSocket::bind("[::1]:0").await.unwrap();
        socket.connect(server).await.unwrap();
        socket
    }

    /// From now on the client's packets reach the server from a new port.
    async fn rebind(&self) {
        self.back
            .send_replace(Arc::new(Self::outside(self.server).await));
    }
}

#[tokio::test]
async fn a_client_whose_address_changes_keeps_its_session_even_on_another_shard() {
    let ts = TestServer::start(|a| {
        a.engine = Engine::Proto;
        a.shards = Some(4);
    })
    .await;
    let nat = Nat::start(ts.server.wt_addr).await;
    // A client that has acknowledged everything stays silent, and the server keeps sending to
    // the old port until the client's next packet shows the new one. The test relied on a
    // delayed acknowledgement still pending at the rebind; on a busy machine it often was not,
    // and the session waited for its idle timeout. A keep-alive makes the client speak within
    // 200 ms of silence, as any client whose NAT moves eventually does.
    let hash = ts.server.cert_hash.as_deref().expect("self-signed");
    let mut options =
        client::ClientOptions::new(client::Trust::Hashes(vec![
            client::parse_hash(hash).unwrap()
        ]));
    options.keep_alive = Some(Duration::from_millis(200));
    let endpoint = client::endpoint(&options).expect("client endpoint");
    let mut session = client::open(&endpoint, &common::url_for(nat.addr, "/positions"), None)
        .await
        .expect("session opens through the NAT");
    let mut view = common::initial_state(&mut session).await;
    // With four shards, each new port lands on the connection's own shard one time in four:
    // 24 rebinds reach another shard at least once but for a chance of 1 in 10^3.
    for round in 0..24 {
        nat.rebind().await;
        let before = view.counts().received;
        assert!(
            common::follow(&mut session, &mut view, Duration::from_secs(10), |v, _| {
                v.counts().received >= before + 2
            })
            .await,
            "no ticks after rebinding {round}: {:?}",
            view.counts()
        );
    }
    assert_eq!(
        ts.counter("sessions_accepted"),
        1,
        "the same session throughout"
    );
    assert_eq!(ts.counter("open_webtransport"), 1);
    assert!(
        ts.counter("packets_forwarded") > 0,
        "no packet reached another shard's socket"
    );
}
