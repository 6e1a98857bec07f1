//! Roster churn on every tick while sessions join on every tick, on both transports (issue 7,
//! defects 1 and 2). WebTransport goes through the lossy, reordering relay.
//!
//! - Defect 1: a session that subscribed between a tick's roster events and its snapshot took
//!   the old snapshot and never got the events, so a departed car stayed on its screen for
//!   good and a new one never appeared. Every session must end up with exactly the cars of the
//!   newest tick. The window is microseconds wide, so the test widens it with the server's
//!   test hook ([`Server::danger_pause_publishing`]); the fix holds the publish lock across it.
//! - Defect 2: a new car's first datagram overtakes its `CarsAdded`. No sample of a car that is
//!   in the fleet may be dropped: the views hold such samples until the roster event arrives.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::relay::{Impairment, Relay};
use fleetcast::client::{self, Event};
use fleetcast::proto::view::{FleetView, SampleCounts};
use fleetcast::proto::wire::{FrameDecoder, StreamMessage, TickPart};
use fleetcast::server::Server;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wtransport::endpoint::endpoint_side;
use wtransport::Endpoint;

/// Time between ticks; a car leaves and another joins on every one.
const TICK: Duration = Duration::from_millis(100);
/// How long sessions keep joining (one per tick per transport).
const JOINING: Duration = Duration::from_secs(3);
/// How long each session may take, after the joining ends, to hold exactly the newest tick's cars.
const CONVERGE: Duration = Duration::from_secs(10);

/// What one session saw.
#[derive(Debug)]
struct Outcome {
    transport: &'static str,
    /// The roster equalled the ids of the newest tick received, after the joining ended.
    converged: bool,
    samples: SampleCounts,
    /// New cars whose first sample had arrived (and was held) before their `CarsAdded`.
    added_with_sample: u64,
    /// Roster ids missing from the newest tick, and newest-tick ids missing from the roster,
    /// when it did not converge.
    extra: Vec<u32>,
    missing: Vec<u32>,
}

/// A session's view plus the ids of the newest tick it received.
#[derive(Default)]
struct Follower {
    view: FleetView,
    newest_tick: u64,
    newest_ids: BTreeSet<u32>,
    added_with_sample: u64,
}

impl Follower {
    fn message(&mut self, msg: StreamMessage) {
        let new: Vec<u32> = match &msg {
            StreamMessage::CarsAdded(cars) => cars
                .iter()
                .map(|c| c.id)
                .filter(|id| !self.view.cars().contains_key(id))
                .collect(),
            _ => Vec::new(),
        };
        self.view.apply_message(msg);
        self.added_with_sample += new
            .iter()
            .filter(|id| self.view.cars()[id].sample.is_some())
            .count() as u64;
    }

    fn part(&mut self, part: &TickPart) {
        assert_eq!(part.parts, 1, "100 cars fit one datagram");
        self.view.apply_part(part);
        if part.tick > self.newest_tick {
            self.newest_tick = part.tick;
            self.newest_ids = part.cars.0.iter().map(|c| c.id).collect();
        }
    }

    /// The roster holds exactly the cars of the newest tick received after the initial state.
    fn converged(&self) -> bool {
        self.view.initial_cars().is_some()
            && self.view.cars().len() == self.newest_ids.len()
            && self
                .newest_ids
                .iter()
                .all(|id| self.view.cars().contains_key(id))
    }

    fn outcome(&self, transport: &'static str, converged: bool) -> Outcome {
        let roster: BTreeSet<u32> = self.view.cars().keys().copied().collect();
        Outcome {
            transport,
            converged,
            samples: self.view.samples(),
            added_with_sample: self.added_with_sample,
            extra: roster.difference(&self.newest_ids).copied().collect(),
            missing: self.newest_ids.difference(&roster).copied().collect(),
        }
    }
}

/// Follows one WebTransport session until it converged after `joined`, or CONVERGE passed.
async fn follow_webtransport(
    endpoint: Arc<Endpoint<endpoint_side::Client>>,
    url: String,
    joined: CancellationToken,
) -> Outcome {
    // Rarely (about 1 run in 40 here) a handshake through the lossy relay ends with the server
    // closing the connection with H3_EXCESSIVE_LOAD (263) before the session opens; that is not
    // what this test is about, so such a session joins again, as a client would.
    let mut attempts = 0;
    let mut session = loop {
        attempts += 1;
        match client::open(&endpoint, &url, None).await {
            Ok(session) => break session,
            Err(e) if attempts < 3 => eprintln!("session did not open, joining again: {e:#}"),
            Err(e) => panic!("session did not open in 3 attempts: {e:#}"),
        }
    };
    let mut f = Follower::default();
    let mut deadline = None;
    loop {
        if joined.is_cancelled() {
            let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + CONVERGE);
            if f.converged() {
                return f.outcome("webtransport", true);
            }
            if tokio::time::Instant::now() >= d {
                return f.outcome("webtransport", false);
            }
        }
        let event = tokio::select! {
            event = session.next() => event,
            _ = joined.cancelled(), if deadline.is_none() => continue,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        match event.expect("session stays open") {
            Event::Message(msg) => f.message(msg),
            Event::Datagram(bytes) => f.part(&TickPart::decode(&bytes).expect("decodes")),
        }
    }
}

/// Follows one WebSocket session until it converged after `joined`, or CONVERGE passed.
async fn follow_websocket(server_http: std::net::SocketAddr, joined: CancellationToken) -> Outcome {
    let url = format!("ws://{server_http}/positions.ws");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket opens");
    let mut f = Follower::default();
    let mut frames = FrameDecoder::new();
    let mut deadline = None;
    loop {
        if joined.is_cancelled() {
            let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + CONVERGE);
            if f.converged() {
                return f.outcome("websocket", true);
            }
            if tokio::time::Instant::now() >= d {
                return f.outcome("websocket", false);
            }
        }
        let msg = tokio::select! {
            msg = ws.next() => msg,
            _ = joined.cancelled(), if deadline.is_none() => continue,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let Message::Binary(bytes) = msg.expect("socket open").expect("no error") else {
            continue;
        };
        match bytes.split_first().expect("channel byte") {
            (0, body) => {
                frames.push(body);
                while let Some(m) = frames.next_message().expect("frames decode") {
                    f.message(m);
                }
            }
            (1, body) => f.part(&TickPart::decode(body).expect("decodes")),
            (other, _) => panic!("unknown channel {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_every_tick_with_joins_every_tick_every_roster_matches_the_newest_tick() {
    let ts = common::start(100, |a| {
        a.sim.churn_ticks = 1;
        a.tick_ms = TICK.as_millis() as u32;
    })
    .await;
    let server: &Server = &ts.server;
    // Widen the window between a tick's roster events and its snapshot to a third of a tick.
    server.danger_pause_publishing(Duration::from_millis(30));
    let relay = Relay::start(
        server.wt_addr,
        Impairment {
            drop: 0.05,
            delay_share: 0.1,
            delay: Duration::from_millis(150),
            grace_packets: 0,
        },
        11,
    )
    .await;
    let endpoint = Arc::new(ts.endpoint());
    let url = common::url_for(relay.addr, "/positions");

    let joined = CancellationToken::new();
    let mut sessions = JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    let joining_ends = tokio::time::Instant::now() + JOINING;
    while tokio::time::Instant::now() < joining_ends {
        ticker.tick().await;
        sessions.spawn(follow_webtransport(
            endpoint.clone(),
            url.clone(),
            joined.clone(),
        ));
        sessions.spawn(follow_websocket(server.http_addr, joined.clone()));
    }
    joined.cancel();

    let mut outcomes = Vec::new();
    while let Some(outcome) = sessions.join_next().await {
        outcomes.push(outcome.expect("session task"));
    }
    let stuck: Vec<&Outcome> = outcomes.iter().filter(|o| !o.converged).collect();
    let total = |transport: &str, pick: fn(&SampleCounts) -> u64| -> u64 {
        outcomes
            .iter()
            .filter(|o| o.transport == transport)
            .map(|o| pick(&o.samples))
            .sum()
    };
    for transport in ["webtransport", "websocket"] {
        let of_transport = || outcomes.iter().filter(|o| o.transport == transport);
        eprintln!(
            "{transport}: {} sessions, {} new cars whose datagram came first; samples held {} \
             adopted {} expired {} removed {} overflow {}",
            of_transport().count(),
            of_transport().map(|o| o.added_with_sample).sum::<u64>(),
            total(transport, |s| s.held),
            total(transport, |s| s.adopted),
            total(transport, |s| s.expired),
            total(transport, |s| s.removed),
            total(transport, |s| s.overflow),
        );
    }
    assert!(outcomes.len() >= 40, "{} sessions joined", outcomes.len());
    let report: Vec<String> = stuck
        .iter()
        .map(|o| {
            format!(
                "{} session: stale cars {:?}, cars never added {:?}",
                o.transport, o.extra, o.missing
            )
        })
        .collect();
    assert!(
        stuck.is_empty(),
        "{} of {} sessions never held exactly the newest tick's cars:\n{}",
        stuck.len(),
        outcomes.len(),
        report.join("\n")
    );
    for o in &outcomes {
        assert_eq!(
            (o.samples.expired, o.samples.overflow),
            (0, 0),
            "a sample of a car in the fleet was dropped: {o:?}"
        );
    }
    // Datagrams did overtake the stream, and the held samples were used.
    let overtaken: u64 = outcomes.iter().map(|o| o.added_with_sample).sum();
    assert!(
        overtaken > 0,
        "no new car's datagram came before its CarsAdded"
    );
    assert!(relay.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0);
}
