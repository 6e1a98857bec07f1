//! Test helpers: a real server on ephemeral loopback ports and real clients for it.
#![allow(dead_code)]

pub mod nats;
pub mod process;
pub mod relay;

use std::net::SocketAddr;
use std::time::Duration;

use fleetcast::client::{self, ClientOptions, Event, Session, Trust};
use fleetcast::proto::view::FleetView;
use fleetcast::proto::wire::{StreamMessage, TickPart};
use fleetcast::server::{ServeArgs, Server};
use wtransport::endpoint::endpoint_side;
use wtransport::Endpoint;

/// A server started for one test, with its certificate directory.
pub struct TestServer {
    pub server: Server,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with 100 cars and fast ticks; `tweak` adjusts the options.
    pub async fn start(tweak: impl FnOnce(&mut ServeArgs)) -> TestServer {
        // RUST_LOG=fleetcast=debug shows the server's log with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = ServeArgs::ephemeral(dir.path().to_path_buf());
        args.tick_ms = 100;
        tweak(&mut args);
        let server = Server::start(args).await.expect("server starts");
        TestServer { server, dir }
    }

    /// Session URL on `[::1]` (where the server listens).
    pub fn url(&self) -> String {
        url_for(self.server.wt_addr, "/positions")
    }

    /// A client endpoint that trusts this server's certificate.
    pub fn endpoint(&self) -> Endpoint<endpoint_side::Client> {
        let hash = self.server.cert_hash.as_deref().expect("self-signed");
        let trust = Trust::Hashes(vec![client::parse_hash(hash).unwrap()]);
        client::endpoint(&ClientOptions::new(trust)).expect("client endpoint")
    }

    /// Opens a session at the session URL.
    pub async fn open(&self) -> (Endpoint<endpoint_side::Client>, Session) {
        let endpoint = self.endpoint();
        let session = client::open(&endpoint, &self.url(), None)
            .await
            .expect("session opens");
        (endpoint, session)
    }

    /// A counter from the server's stats.
    pub fn counter(&self, name: &str) -> u64 {
        self.server.stats().get(name).expect("known counter")
    }

    /// Fetches `/healthz` over real HTTP.
    pub async fn healthz(&self) -> serde_json::Value {
        self.health().await.1
    }

    /// Fetches `/healthz` over real HTTP: its status and its JSON.
    pub async fn health(&self) -> (u16, serde_json::Value) {
        let url = format!("http://{}/healthz", self.server.http_addr);
        let response = reqwest::get(&url).await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap())
    }

    /// Polls `/healthz` until it answers `status`, for at most `limit`; returns its JSON.
    pub async fn health_becomes(&self, status: u16, limit: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (now, body) = self.health().await;
            if now == status {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/healthz still {now}, not {status}, after {limit:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until `condition` holds, checking every 20 ms, for at most `limit`; panics naming
/// `what` otherwise.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `https://[::1]:PORT/path` for an address.
pub fn url_for(addr: SocketAddr, path: &str) -> String {
    format!("https://[::1]:{}{path}", addr.port())
}

/// Reads events into `view` until `done` says so or `limit` passes; returns false on timeout.
pub async fn follow(
    session: &mut Session,
    view: &mut FleetView,
    limit: Duration,
    mut done: impl FnMut(&FleetView, Option<&TickPart>) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let event = tokio::time::timeout_at(deadline, session.next()).await;
        match event {
            Err(_) => return false,
            Ok(Err(end)) => panic!("session ended early: {end}"),
            Ok(Ok(Event::Message(msg))) => {
                view.apply_message(msg);
                if done(view, None) {
                    return true;
                }
            }
            Ok(Ok(Event::Datagram(bytes))) => {
                let part = TickPart::decode(&bytes).expect("server datagrams decode");
                view.apply_part(&part);
                if done(view, Some(&part)) {
                    return true;
                }
            }
        }
    }
}

/// Reads until the initial state has arrived.
pub async fn initial_state(session: &mut Session) -> FleetView {
    let mut view = FleetView::new();
    assert!(
        follow(session, &mut view, Duration::from_secs(10), |v, _| v
            .initial_cars()
            .is_some())
        .await,
        "no initial state within 10 s"
    );
    view
}

/// Waits for the session to end and returns how.
pub async fn ended(session: &mut Session, limit: Duration) -> fleetcast::client::Ended {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, session.next()).await {
            Err(_) => panic!("session still open after {limit:?}"),
            Ok(Err(end)) => return end,
            Ok(Ok(_)) => {}
        }
    }
}

/// The HTTP status with which the server refused a session; panics if the session opened or
/// failed for another reason.
pub fn refused_status(result: anyhow::Result<Session>) -> u16 {
    let err = match result {
        Ok(_) => panic!("the session opened"),
        Err(e) => e,
    };
    let refused = err
        .downcast_ref::<client::Refused>()
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"));
    assert!(
        format!("{err:#}").contains("session refused: "),
        "the message names the refusal: {err:#}"
    );
    refused.status.expect("the server sent a status")
}

/// True if a message is a Goodbye.
pub fn is_goodbye(msg: &StreamMessage) -> bool {
    matches!(msg, StreamMessage::Goodbye { .. })
}

/// Starts a server with `cars` cars and fast ticks; `tweak` adjusts the options.
pub async fn start(cars: u32, tweak: impl FnOnce(&mut ServeArgs)) -> TestServer {
    TestServer::start(|args| {
        args.sim.cars = cars;
        tweak(args);
    })
    .await
}
