//! `fleetcast serve`: the WebTransport streamer and its HTTP side.
//!
//! Layout:
//! - [`config`]: every option of `fleetcast serve`.
//! - `net`: the UDP socket with large buffers and the QUIC transport limits.
//! - `feed`: the tick loop (on its own thread): reads the fleet state (written by the
//!   simulator and the publishers), encodes each tick once, fans it out.
//! - `ingest`: position publishers: `POST /v1/positions`, `/v1/publish.ws`, `/v1/cars`.
//! - `engine`: the WebTransport server (`--engine proto`, the default): shards on quinn-proto,
//!   each an event loop owning its socket and connections, with its own HTTP/3 layer.
//! - `session`: the wtransport server (`--engine quinn`): one task per session.
//! - `admission`: session slots, per-address limits and handshake pacing for both transports.
//! - `http`: certificate hash, health, road network, page config and the web demo over HTTP.
//! - `ws`: the WebSocket fallback on the HTTP port: the same frames and datagram payloads.
//!
//! One shutdown path: [`Server::shutdown`] (Ctrl-C / SIGTERM in the binary) cancels a token; the
//! accept loop stops first, sessions say goodbye and close with [`CloseCode::GoingAway`], and the
//! endpoint closes once they are gone or the shutdown timeout passes. The HTTP side stops
//! accepting at the same moment and drops whatever connection is still open when the shutdown
//! timeout passes, so no client can hold the process up.

mod admission;
mod cluster;
pub mod config;
mod engine;
mod feed;
mod http;
mod ingest;
mod metrics;
mod net;
mod rate;
mod rotation;
mod session;
mod stats;
mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use wtransport::endpoint::endpoint_side;
use wtransport::Endpoint;

pub use config::ServeArgs;
pub use stats::Stats;

use crate::certs;
use crate::fleet::{Area, FleetState};
use crate::proto::wire::{CarSample, CloseCode, Hello, StreamMessage, PROTOCOL_VERSION};
use crate::sim::{Road, Simulator};
use config::Feed;

/// The session path; every other path gets 404.
pub const SESSION_PATH: &str = "/positions";

/// Roster events a session may fall behind before it gets the full roster and state instead.
const ROSTER_EVENT_BACKLOG: usize = 64;

/// The newest tick, as a new session needs it.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub tick: u64,
    pub cars: Arc<Vec<CarSample>>,
    /// The `Roster` and `State` frames for a new session, encoded once per tick.
    pub frames: bytes::Bytes,
}

/// One tick encoded for the WebSocket sessions (see `ws`), shared by all of them.
#[derive(Debug, Default)]
pub(crate) struct EncodedTick {
    /// Tick number (0 before the first tick).
    pub tick: u64,
    /// Complete WebSocket binary messages: the datagram channel byte, then one datagram payload.
    pub messages: Arc<Vec<bytes::Bytes>>,
}

/// A session registered for datagrams.
#[derive(Clone)]
pub(crate) struct Member {
    pub conn: quinn::Connection,
    /// WebTransport datagram header (quarter stream id) of this session.
    pub header: Arc<[u8]>,
    /// Datagrams queued on this session so far.
    pub queued: Arc<AtomicU64>,
}

/// State shared by the accept loop, the tick loop, the sessions and the HTTP side.
pub(crate) struct Shared {
    pub args: ServeArgs,
    /// The served area and its quantisation.
    pub area: Area,
    /// Every car's newest fix: written by the sources, read by the tick loop.
    pub fleet: Mutex<FleetState>,
    /// Publisher tokens, each with its own rate limit (empty: ingest is off).
    pub publishers: Vec<ingest::Publisher>,
    pub latest: watch::Receiver<Arc<Snapshot>>,
    pub roster_events: broadcast::Sender<Arc<StreamMessage>>,
    /// Orders publishing (roster events, then the snapshot) against subscribing (taking a
    /// receiver for events and the snapshot), so no session can miss a roster change.
    pub publish_order: Mutex<()>,
    pub members: Mutex<HashMap<u64, Member>>,
    pub stats: Stats,
    pub sessions: AtomicUsize,
    /// Per-address session counts and handshake rates.
    pub admission: admission::Admission,
    pub next_session: AtomicU64,
    pub allowed_origins: Vec<String>,
    /// SHA-256 of the self-signed certificates clients should trust, lowercase hex: the one in
    /// use, then the next one once it is published (empty for a CA-issued certificate).
    pub cert_hashes: std::sync::RwLock<Vec<String>>,
    /// HTTPS on the HTTP port, with the CA-issued certificate (`--cert`/`--key`); `None`:
    /// plain HTTP. Replaced when the certificate files are reloaded.
    pub https: Option<std::sync::RwLock<tokio_rustls::TlsAcceptor>>,
    pub roads: Vec<Road>,
    /// UDP port of the WebTransport endpoint, for `/config.json`.
    pub wt_port: u16,
    /// The newest tick for WebSocket sessions; only the newest is kept.
    pub ticks: watch::Sender<Arc<EncodedTick>>,
    /// Tests only (0 otherwise): microseconds [`Shared::publish`] pauses between a tick's roster
    /// events and its snapshot. See [`Server::danger_pause_publishing`].
    pub danger_publish_pause_us: AtomicU64,
    /// Whether the tick loop is alive and on time (`/healthz`).
    pub tick_health: feed::TickHealth,
    /// Held by the tick loop during each tick; tests hold it to stop ticks.
    pub tick_gate: tokio::sync::Mutex<()>,
    /// Set by a test to make the tick loop panic at its next tick.
    pub tick_panic: std::sync::atomic::AtomicBool,
    /// The newest tick for the engine's shards (`--engine proto`).
    pub engine_ticks: watch::Sender<Option<Arc<engine::EngineTick>>>,
    /// This node's link to the other nodes (`--nats`); `None`: a single node.
    pub cluster: Option<Arc<cluster::Cluster>>,
}

/// The QUIC side of the server: whichever engine serves WebTransport.
pub(crate) enum QuicFront {
    Quinn(Arc<ServerEndpoint>),
    Proto(engine::Engine),
}

impl QuicFront {
    /// Serves `identity` to new connections from now on; open ones keep theirs.
    pub(crate) fn install(&self, identity: &wtransport::Identity, args: &ServeArgs) -> Result<()> {
        match self {
            QuicFront::Quinn(endpoint) => {
                let config = net::reload_config(identity.clone_identity(), args)?;
                endpoint.reload_config(config, false)?;
            }
            QuicFront::Proto(engine) => engine.install(identity, args)?,
        }
        Ok(())
    }
}

impl Shared {
    /// Changes the published certificate hashes.
    pub(crate) fn set_cert_hashes(&self, change: impl FnOnce(&mut Vec<String>)) {
        change(&mut self.cert_hashes.write().expect("hashes lock poisoned"));
    }

    /// The Hello every session starts with, on either transport.
    pub(crate) fn hello(&self) -> StreamMessage {
        StreamMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            tick_interval_ms: self.args.tick_ms,
            server_time_us: now_us(),
            quant: self.area.quant,
            server: concat!("fleetcast/", env!("CARGO_PKG_VERSION")).to_string(),
            bounds: Some(self.area.bounds()),
        })
    }

    /// What a new session receives first, on either transport: the Hello, then the
    /// snapshot's Roster and State frames.
    pub(crate) fn initial_frames(&self, snapshot: &Snapshot) -> Vec<u8> {
        let mut frames = Vec::with_capacity(64 + snapshot.frames.len());
        // Invariant: a Hello holds numbers and a short string, never a car list: it encodes.
        self.hello()
            .encode_frame(&mut frames)
            .expect("hello encodes");
        frames.extend_from_slice(&snapshot.frames);
        frames
    }

    /// A receiver for roster events and the snapshot they follow: every event the receiver
    /// yields happened after that snapshot, and every change after it reaches the receiver.
    pub(crate) fn subscribe(&self) -> (broadcast::Receiver<Arc<StreamMessage>>, Arc<Snapshot>) {
        let _order = self.publish_order.lock().expect("publish lock poisoned");
        (self.roster_events.subscribe(), self.latest.borrow().clone())
    }

    /// Sends a tick's roster events, then makes its snapshot the newest, as one step for
    /// [`Shared::subscribe`].
    pub(crate) fn publish(
        &self,
        events: Vec<StreamMessage>,
        snapshot: Snapshot,
        latest: &watch::Sender<Arc<Snapshot>>,
    ) {
        let _order = self.publish_order.lock().expect("publish lock poisoned");
        let changed = !events.is_empty();
        for event in events {
            // Nobody listening is fine: there are no sessions.
            let _ = self.roster_events.send(Arc::new(event));
        }
        let pause = self.danger_publish_pause_us.load(Ordering::Relaxed);
        if changed && pause > 0 {
            // Only under the test hook: widens the window between events and snapshot.
            std::thread::sleep(Duration::from_micros(pause));
        }
        latest.send_replace(Arc::new(snapshot));
    }
}

/// A running server.
pub struct Server {
    /// Local address of the WebTransport (UDP) endpoint.
    pub wt_addr: SocketAddr,
    /// Local address of the HTTP (TCP) listener.
    pub http_addr: SocketAddr,
    /// SHA-256 of the certificate, lowercase hex, when self-signed.
    pub cert_hash: Option<String>,
    shared: Arc<Shared>,
    token: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts every part of the server and returns once the sockets are bound.
    pub async fn start(args: ServeArgs) -> Result<Server> {
        let args = args.resolve_subscribe_secret()?;
        let (area, publishers) = args.check().map_err(anyhow::Error::msg)?;
        let publishers = publishers.into_iter().map(ingest::Publisher::new).collect();
        info!("served area: {area}");
        let now = SystemTime::now();
        let identity = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => certs::from_files(cert, key).await?,
            (None, None) => {
                let rotation = certs::Rotation {
                    validity: args.cert_validity,
                };
                certs::self_signed(&args.cert_dir, &args.cert_names(), now, rotation).await?
            }
            _ => anyhow::bail!("--cert and --key go together"),
        };
        info!(
            "certificate: {} (expires {})",
            identity.source,
            humantime_utc(identity.not_after)
        );

        // A CA-issued certificate serves the HTTP port too, so the page is a secure context
        // anywhere (browsers open WebTransport only from one) and needs no certificate hash.
        let https = match args.cert {
            Some(_) => Some(std::sync::RwLock::new(tls_acceptor(&identity.identity)?)),
            None => None,
        };
        // Bound first: the shared state carries the port.
        enum Listening {
            Quinn(Arc<ServerEndpoint>),
            Proto(engine::Bound),
        }
        let listening = match args.engine {
            config::Engine::Quinn => {
                let socket = crate::udp::bind_udp(args.wt_listen, args.udp_buffer)?;
                let server_config =
                    net::server_config(socket, identity.identity.clone_identity(), &args)?;
                Listening::Quinn(Arc::new(
                    Endpoint::server(server_config).context("starting QUIC endpoint")?,
                ))
            }
            config::Engine::Proto => {
                let shards = args
                    .shards
                    .map(usize::from)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                Listening::Proto(engine::Bound::bind(
                    args.wt_listen,
                    args.udp_buffer,
                    shards,
                )?)
            }
        };
        let wt_addr = match &listening {
            Listening::Quinn(endpoint) => endpoint.local_addr()?,
            Listening::Proto(bound) => bound.local_addr,
        };

        let http_listener = tokio::net::TcpListener::bind(args.http_listen)
            .await
            .with_context(|| format!("binding HTTP on {}", args.http_listen))?;
        let http_addr = http_listener.local_addr()?;

        let cluster = if args.cluster.enabled() {
            let config =
                cluster::wire::config_fingerprint(&area, args.tick_ms, args.datagram_budget);
            Some(cluster::Cluster::connect(&args.cluster, config).await?)
        } else {
            None
        };
        let mut fleet = FleetState::new(area, args.ingest.max_cars as usize);
        let sim = args.feed.contains(&Feed::Sim).then(|| {
            let sim = Simulator::new(&args.sim.config(area.side_m()));
            feed::SimSource::new(sim, args.sim.churn_ticks)
        });
        let roads = sim.as_ref().map(|s| s.roads()).unwrap_or_default();
        let start_us = now_us();
        if let Some(sim) = &sim {
            sim.write(&mut fleet, start_us);
        }
        // The first snapshot holds the whole roster: its joins are not events.
        fleet.take_changes();
        // In a cluster, sessions get the cluster's fleet, never this node's own.
        // Tick numbers count wall-clock tick intervals: the first state is of the interval
        // the server starts in, and the first tick is the next one.
        let start_tick = feed::tick_at(start_us, u64::from(args.tick_ms) * 1000);
        let first = match cluster {
            None => feed::snapshot(
                start_tick,
                start_us,
                &fleet.roster(),
                Arc::new(fleet.samples(start_us)),
            ),
            // In a cluster, sessions get the cluster's fleet, never this node's own.
            Some(_) => feed::snapshot(start_tick, start_us, &[], Arc::new(Vec::new())),
        };
        let (latest_tx, latest_rx) = watch::channel(Arc::new(first));
        let (roster_events, _) = broadcast::channel(ROSTER_EVENT_BACKLOG);

        let mut allowed_origins = config::allowed_origins(&args.allow_origin, http_addr.port());
        if https.is_some() {
            // The server's own page on each name its certificate covers.
            allowed_origins.extend(identity.dns_names.iter().map(|name| {
                config::normalise_origin(&format!("https://{name}:{}", http_addr.port()))
            }));
        }
        let shared = Arc::new(Shared {
            area,
            fleet: Mutex::new(fleet),
            publishers,
            latest: latest_rx,
            roster_events,
            publish_order: Mutex::new(()),
            members: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            sessions: AtomicUsize::new(0),
            admission: admission::Admission::default(),
            next_session: AtomicU64::new(1),
            allowed_origins,
            cert_hashes: std::sync::RwLock::new(identity.hash_hex.iter().cloned().collect()),
            https,
            roads,
            wt_port: wt_addr.port(),
            ticks: watch::Sender::new(Arc::new(EncodedTick::default())),
            danger_publish_pause_us: AtomicU64::new(0),
            tick_health: feed::TickHealth::default(),
            tick_gate: tokio::sync::Mutex::new(()),
            tick_panic: std::sync::atomic::AtomicBool::new(false),
            engine_ticks: watch::Sender::new(None),
            cluster,
            args,
        });

        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        // The tick loop gets a thread and runtime of its own, so no amount of session work
        // (handshakes, WebSocket writes, ACK processing) can delay a tick.
        let tick_thread = std::thread::Builder::new()
            .name("fleetcast-tick".into())
            .spawn({
                let (shared, token) = (shared.clone(), token.clone());
                move || match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(feed::run(shared, sim, latest_tx, token)),
                    Err(e) => {
                        shared.tick_health.stop();
                        tracing::error!("cannot start the tick loop's runtime: {e}");
                    }
                }
            })
            .context("starting the tick thread")?;
        let election = shared
            .cluster
            .clone()
            .map(|c| tokio::spawn(cluster::run_election(c, shared.clone(), token.clone())));
        let http = tokio::spawn(http::serve(
            http_listener,
            shared.clone(),
            token.clone(),
            tracker.clone(),
        ));

        let (front, shards) = match listening {
            Listening::Quinn(endpoint) => (QuicFront::Quinn(endpoint), Vec::new()),
            Listening::Proto(bound) => {
                let (engine, threads) = engine::Engine::start(
                    bound,
                    shared.clone(),
                    &identity.identity,
                    token.clone(),
                )?;
                (QuicFront::Proto(engine), threads)
            }
        };
        let front = Arc::new(front);
        let rotation = tokio::spawn(rotation::run(
            shared.clone(),
            front.clone(),
            identity.not_after,
            token.clone(),
        ));
        let accept_token = token.clone();
        let done = tokio::spawn({
            let shared = shared.clone();
            async move {
                match &*front {
                    QuicFront::Quinn(endpoint) => {
                        session::accept_loop(endpoint, &shared, &tracker, &accept_token).await;
                        // The accept loop has returned, so closing the endpoint cannot race
                        // accept().
                        tracker.close();
                        let grace = shared.args.shutdown_timeout;
                        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                            warn!(
                                "{} sessions still open after {:?}; closing them",
                                shared.sessions.load(Ordering::Relaxed),
                                grace
                            );
                        }
                        endpoint.close(CloseCode::GoingAway.code().into(), b"server shutting down");
                        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle())
                            .await;
                    }
                    QuicFront::Proto(_) => {
                        // Each shard says goodbye to its sessions and returns once they are
                        // closed or --shutdown-timeout has passed.
                        accept_token.cancelled().await;
                        tracker.close();
                        let _ = tokio::task::spawn_blocking(move || {
                            for shard in shards {
                                let _ = shard.join();
                            }
                        })
                        .await;
                    }
                }
                let _ = http.await;
                let _ = rotation.await;
                if let Some(election) = election {
                    let _ = election.await;
                }
                // The token is cancelled, so the tick loop is returning.
                let _ = tokio::task::spawn_blocking(move || tick_thread.join()).await;
                info!("shutdown complete");
            }
        });

        Ok(Server {
            wt_addr,
            http_addr,
            cert_hash: identity.hash_hex,
            shared,
            token,
            done,
        })
    }

    /// Starts the graceful shutdown; [`Server::wait`] returns when it is complete.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// Waits until the server has shut down.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Live counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Whether sessions need a subscriber token (--subscribe-secret).
    pub fn tokens_required(&self) -> bool {
        self.shared.args.subscribe_secret.is_some()
    }

    /// The certificate hashes `/certificate.sha256` lists now (current first, then the next).
    pub fn cert_hashes(&self) -> Vec<String> {
        self.shared
            .cert_hashes
            .read()
            .expect("hashes lock poisoned")
            .clone()
    }

    /// Whether the HTTP port speaks HTTPS (with `--cert`/`--key`).
    pub fn https(&self) -> bool {
        self.shared.https.is_some()
    }

    /// Sessions open right now.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.load(Ordering::Relaxed)
    }

    /// **Tests only.** From now on, every tick with roster changes pauses `pause` between
    /// sending its roster events and publishing its snapshot, on the tick thread. That is the
    /// window in which a session that subscribes could take the old snapshot and miss the
    /// events; a test widens it to show that no session can (the publish lock spans it, so
    /// new sessions wait instead). It delays ticks and new sessions: never in production.
    #[doc(hidden)]
    pub fn danger_pause_publishing(&self, pause: Duration) {
        let us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
        self.shared
            .danger_publish_pause_us
            .store(us, Ordering::Relaxed);
    }

    /// For tests: stops ticks until the guard is dropped. Once it returns, no tick is in
    /// progress, so the counters hold still.
    #[doc(hidden)]
    pub async fn danger_pause_ticks(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.shared.tick_gate.lock().await
    }

    /// For tests: makes the tick loop panic at its next tick, as a bug in it would.
    #[doc(hidden)]
    pub fn danger_panic_tick_loop(&self) {
        self.shared.tick_panic.store(true, Ordering::Relaxed);
    }
}

/// The HTTPS acceptor for a certificate.
pub(crate) fn tls_acceptor(identity: &wtransport::Identity) -> Result<tokio_rustls::TlsAcceptor> {
    let config = certs::https_config(identity).context("HTTPS configuration")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn humantime_utc(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// Endpoint type of the server side.
pub(crate) type ServerEndpoint = Endpoint<endpoint_side::Server>;
