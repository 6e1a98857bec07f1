//! Many nodes joined by NATS (`fleetcast serve --nats URL`).
//!
//! Every node runs the same command; none is special. What travels over NATS (subjects and
//! buckets start with `--nats-prefix`, `fleetcast` by default):
//!
//! - **The ticker lease**: key `ticker` of the key-value bucket `PREFIX-lease` (memory storage,
//!   history 1, max age `--lease`). A node wins it with `create` (only succeeds when the key
//!   is absent) and keeps it with compare-and-swap `update` every third of the lease. A node
//!   that cannot renew stops ticking before the lease can expire at the server; once the key
//!   expires (or a stopping ticker deletes it), another node's `create` succeeds.
//! - **Fleet requests** on `PREFIX.fleet` (JSON [`wire::FleetOp`], queue group `ticker`): any
//!   node that receives ingest validates the fixes and asks the ticker, which owns the fleet
//!   state, to apply them; the publisher gets the ticker's per-fix answer. No ticker or no
//!   NATS: 503.
//! - **Ticks** on `PREFIX.tick` (postcard [`wire::ClusterTick`]): the ticker merges the fleet,
//!   packs each tick once and publishes the finished datagram payloads; every node (the
//!   ticker too) forwards exactly those bytes to its sessions ([`run_edge`]).
//! - **The fleet checkpoint**: key `state` of the bucket `PREFIX-fleet` (file storage,
//!   history 1), written before each tick is published. A new ticker continues from it (same
//!   wire ids, same roster version); an edge that missed roster events, or just joined,
//!   rebuilds its roster from it.
//!
//! NATS unreachable: the ticker cannot renew and stops; edges keep their sessions, which get
//! no datagrams until NATS returns (tick numbers then jump: the gap counts as missed).
//! `/healthz` says `degraded`, ingest answers 503, and the client reconnects by itself.

pub(crate) mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::ClusterArgs;
use super::feed::{self, TickOut};
use super::{now_us, Shared, Snapshot, Stats};
use crate::fleet::{FleetCheckpoint, FleetState};
use wire::{Checkpoint, ClusterTick, Edge, FleetOp, FleetReply, Verdict};

/// Key of the ticker lease.
const LEASE_KEY: &str = "ticker";
/// Key of the fleet checkpoint.
const STATE_KEY: &str = "state";
/// How long a node waits for the ticker to answer a fleet request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the ticker waits for the checkpoint write before publishing a tick anyway.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_millis(500);
/// Ticks a node's NATS subscription may hold before NATS drops them (slow consumer).
const TICK_BACKLOG: usize = 64;
/// A lease counts as held until this long before it could expire at the NATS server.
const LEASE_MARGIN: Duration = Duration::from_millis(250);
/// Longest a node that waits for the lease sleeps between attempts to take it. It wakes at the
/// moment the lease expires when that is sooner (from the lease's write time), so a dead
/// ticker is replaced right at expiry; this bounds the wait after a clean handover (a stopping
/// ticker deletes its lease) and any clock difference with the NATS server.
const LEASE_POLL: Duration = Duration::from_millis(500);

/// Why a fleet request could not be answered: the publisher gets 503 with this.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unavailable(pub String);

impl Unavailable {
    /// The ticker answered a request with a reply of another kind (a node of another version?).
    pub(crate) fn unexpected(reply: &FleetReply) -> Self {
        Unavailable(format!("unexpected answer from the ticker: {reply:?}"))
    }
}

/// The lease this node holds.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Lease revision when it was won: names this ticker in its ticks.
    epoch: u64,
    /// The lease counts as held until then.
    valid_until: Instant,
}

/// This node's link to the cluster.
pub(crate) struct Cluster {
    /// This node's name.
    pub node: String,
    /// [`wire::config_fingerprint`] of this node.
    pub config: u64,
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    lease_ttl: Duration,
    replicas: usize,
    lease: Mutex<Option<Lease>>,
    lease_bucket: tokio::sync::Mutex<Option<kv::Store>>,
    fleet_bucket: tokio::sync::Mutex<Option<kv::Store>>,
    /// The node that ticked the newest forwarded tick.
    pub ticker_node: Mutex<Option<String>>,
    /// Whether the newest forwarded tick came from a ticker with our configuration.
    pub foreign_config: AtomicBool,
    /// What the NATS client reported.
    pub events: Arc<NatsEvents>,
}

/// Counts of what the NATS client reported.
#[derive(Debug, Default)]
pub(crate) struct NatsEvents {
    /// Times the connection to NATS was lost.
    pub disconnects: AtomicU64,
    /// Times NATS dropped messages for this node because it read them too slowly.
    pub slow_consumer: AtomicU64,
    /// Milliseconds since the Unix epoch when the connection was lost; 0 while connected.
    disconnected_since_ms: AtomicU64,
}

impl Cluster {
    /// Connects to NATS (in the background if it is not up yet: the node starts anyway and
    /// joins when it can).
    pub(crate) async fn connect(args: &ClusterArgs, config: u64) -> Result<Arc<Cluster>> {
        let node = args.node_name();
        let mut addrs = Vec::new();
        for url in &args.nats {
            let addr: async_nats::ServerAddr = url
                .parse()
                .with_context(|| format!("--nats {url:?} is not a NATS URL"))?;
            addrs.push(addr);
        }
        let mut options = match &args.nats_creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
                .await
                .with_context(|| format!("reading --nats-creds {}", path.display()))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(token) = &args.nats_token {
            options = options.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&args.nats_user, &args.nats_password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        let events = Arc::new(NatsEvents::default());
        let events_seen = events.clone();
        let options = options
            .name(format!("fleetcast {node}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .subscription_capacity(TICK_BACKLOG)
            // Reconnect quickly: a node without NATS forwards no ticks.
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100 * attempt as u64).min(1000))
            })
            .event_callback(move |event| {
                let seen = events_seen.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            Stats::inc(&seen.disconnects);
                            let now = (now_us() / 1000).max(1);
                            seen.disconnected_since_ms.store(now, Ordering::Relaxed);
                            warn!("NATS connection lost; reconnecting");
                        }
                        async_nats::Event::Connected => {
                            seen.disconnected_since_ms.store(0, Ordering::Relaxed);
                            info!("NATS connected");
                        }
                        async_nats::Event::SlowConsumer(_) => Stats::inc(&seen.slow_consumer),
                        other => debug!("NATS: {other}"),
                    }
                }
            });
        let client = options.connect(addrs).await.context("connecting to NATS")?;
        let js = jetstream::new(client.clone());
        info!(node, prefix = %args.nats_prefix, "joining the cluster over NATS");
        Ok(Arc::new(Cluster {
            node,
            config,
            client,
            js,
            prefix: args.nats_prefix.clone(),
            lease_ttl: args.lease,
            replicas: usize::from(args.nats_replicas),
            lease: Mutex::new(None),
            lease_bucket: tokio::sync::Mutex::new(None),
            fleet_bucket: tokio::sync::Mutex::new(None),
            ticker_node: Mutex::new(None),
            foreign_config: AtomicBool::new(false),
            events,
        }))
    }

    fn subject(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// Whether NATS is connected now.
    pub(crate) fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Milliseconds since the connection to NATS was lost (0 while connected, and before the
    /// first connection: see [`Cluster::connected`]).
    pub(crate) fn disconnected_for_ms(&self) -> u64 {
        match self.events.disconnected_since_ms.load(Ordering::Relaxed) {
            0 => 0,
            since => (now_us() / 1000).saturating_sub(since),
        }
    }

    /// Whether this node holds the ticker lease now, and can publish: a ticker that loses
    /// NATS stops at once (its ticks could not reach anyone, and would arrive late).
    pub(crate) fn is_ticker(&self) -> bool {
        self.connected()
            && self
                .lease
                .lock()
                .expect("lease lock poisoned")
                .is_some_and(|l| Instant::now() < l.valid_until)
    }

    /// The epoch of the lease this node holds.
    pub(crate) fn epoch(&self) -> Option<u64> {
        self.lease
            .lock()
            .expect("lease lock poisoned")
            .map(|l| l.epoch)
    }

    fn set_lease(&self, lease: Option<Lease>) {
        *self.lease.lock().expect("lease lock poisoned") = lease;
    }

    /// The lease bucket, created if missing (NATS may have restarted without it).
    async fn lease_bucket(&self) -> Result<kv::Store> {
        let config = kv::Config {
            bucket: format!("{}-lease", self.prefix),
            description: "fleetcast ticker lease".into(),
            history: 1,
            max_age: self.lease_ttl,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: self.replicas,
            ..Default::default()
        };
        bucket(&self.js, &self.lease_bucket, config).await
    }

    /// The fleet checkpoint bucket, created if missing.
    async fn fleet_bucket(&self) -> Result<kv::Store> {
        let config = kv::Config {
            bucket: format!("{}-fleet", self.prefix),
            description: "fleetcast fleet state, written by the ticker every tick".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        };
        bucket(&self.js, &self.fleet_bucket, config).await
    }

    /// Forgets cached buckets after an error, so the next use looks them up (or creates them)
    /// again.
    async fn forget_buckets(&self) {
        *self.lease_bucket.lock().await = None;
        *self.fleet_bucket.lock().await = None;
    }

    /// The newest fleet checkpoint, if any.
    pub(crate) async fn load_checkpoint(&self) -> Result<Option<Checkpoint>> {
        let bucket = self.fleet_bucket().await?;
        let got = tokio::time::timeout(REQUEST_TIMEOUT, bucket.get(STATE_KEY))
            .await
            .context("reading the fleet checkpoint timed out")?;
        match got {
            Ok(Some(bytes)) => Ok(Some(
                Checkpoint::decode(&bytes).map_err(anyhow::Error::msg)?,
            )),
            Ok(None) => Ok(None),
            Err(e) => {
                self.forget_buckets().await;
                Err(e).context("reading the fleet checkpoint")
            }
        }
    }

    /// Writes the checkpoint, then publishes the tick (the ticker only). Failures are counted
    /// and logged; the next tick tries again.
    pub(crate) async fn publish_tick(
        &self,
        shared: &Shared,
        tick: ClusterTick,
        fleet: FleetCheckpoint,
    ) {
        let stats = &shared.stats;
        let checkpoint = Checkpoint {
            format: wire::FORMAT,
            config: self.config,
            tick: tick.tick,
            time_us: tick.time_us,
            fleet,
        };
        // First the checkpoint: an edge that resyncs on this tick then finds a checkpoint at
        // least as new as the tick.
        let written = async {
            let bucket = self.fleet_bucket().await?;
            tokio::time::timeout(
                CHECKPOINT_TIMEOUT,
                bucket.put(STATE_KEY, checkpoint.encode().into()),
            )
            .await
            .context("timed out")?
            .context("writing")?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = written {
            Stats::inc(&stats.cluster_checkpoint_failed);
            warn!("fleet checkpoint of tick {} not written: {e:#}", tick.tick);
            self.forget_buckets().await;
        }
        if !self.is_ticker() {
            // The lease ran out while writing: another node may tick this number.
            return;
        }
        let body = tick.encode();
        match self.client.publish(self.subject("tick"), body.into()).await {
            Ok(()) => Stats::inc(&stats.cluster_ticks_published),
            Err(e) => {
                Stats::inc(&stats.cluster_publish_failed);
                warn!("tick {} not published: {e}", tick.tick);
            }
        }
    }

    /// Runs a fleet request at the ticker.
    pub(crate) async fn request(&self, op: &FleetOp) -> Result<FleetReply, Unavailable> {
        if !self.connected() {
            return Err(Unavailable(
                "NATS is unreachable: this node cannot reach the ticker; retry".into(),
            ));
        }
        // Invariant: a FleetOp holds strings and numbers only.
        let body = serde_json::to_vec(op).expect("fleet op encodes");
        let response = self
            .client
            .request(self.subject("fleet"), body.into())
            .await
            .map_err(|e| {
                use async_nats::client::RequestErrorKind;
                Unavailable(match e.kind() {
                    RequestErrorKind::NoResponders => {
                        "no node holds the ticker lease right now (the cluster is electing one); retry"
                            .to_string()
                    }
                    RequestErrorKind::TimedOut => {
                        "the ticker did not answer within 2 s; retry".to_string()
                    }
                    _ => format!("NATS request failed: {e}; retry"),
                })
            })?;
        serde_json::from_slice(&response.payload).map_err(|e| {
            Unavailable(format!(
                "the ticker's answer did not parse ({e}): are all nodes the same version?"
            ))
        })
    }
}

/// A key-value bucket, looked up once and cached; created when missing.
async fn bucket(
    js: &jetstream::Context,
    cache: &tokio::sync::Mutex<Option<kv::Store>>,
    config: kv::Config,
) -> Result<kv::Store> {
    let mut cached = cache.lock().await;
    if let Some(store) = &*cached {
        return Ok(store.clone());
    }
    let name = config.bucket.clone();
    let get = || tokio::time::timeout(REQUEST_TIMEOUT, js.get_key_value(&name));
    let store = match get().await {
        Ok(Ok(store)) => store,
        _ => {
            // Missing: create it (or find that another node just did), then look again.
            let created =
                tokio::time::timeout(REQUEST_TIMEOUT, js.create_stream(kv_stream(config))).await;
            match get().await {
                Ok(Ok(store)) => store,
                _ => {
                    let why = match created {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(_)) => "created, but it cannot be read".into(),
                        Err(_) => "timed out".into(),
                    };
                    anyhow::bail!("cannot create the bucket {name}: {why}");
                }
            }
        }
    };
    *cached = Some(store.clone());
    Ok(store)
}

/// The stream behind a key-value bucket, as `create_key_value` would make it. Made by hand
/// because async-nats's `create_key_value` first reads account fields that NATS 2.9 (Debian
/// bookworm's) does not send.
fn kv_stream(config: kv::Config) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{}", config.bucket),
        description: Some(config.description),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: config.history.max(1),
        max_bytes: -1,
        max_age: config.max_age,
        max_message_size: -1,
        storage: config.storage,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: config.num_replicas.max(1),
        discard: jetstream::stream::DiscardPolicy::New,
        // At most the bucket's max age (NATS refuses a longer one).
        duplicate_window: if config.max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            config.max_age.min(Duration::from_secs(120))
        },
        ..Default::default()
    }
}

/// Runs fleet operations: through the ticker in a cluster, on this node's own fleet otherwise.
pub(crate) async fn fleet_op(shared: &Shared, op: FleetOp) -> Result<FleetReply, Unavailable> {
    match &shared.cluster {
        Some(cluster) => cluster.request(&op).await,
        None => {
            let mut fleet = shared.fleet.lock().expect("fleet lock poisoned");
            Ok(op.run(&mut fleet, now_us()))
        }
    }
}

/// Wins, keeps and gives back the ticker lease until `token` is cancelled. While this node
/// holds it, it answers fleet requests and its tick loop ticks.
pub(crate) async fn run_election(
    cluster: Arc<Cluster>,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let ttl = cluster.lease_ttl;
    let node = cluster.node.clone();
    // (revision to renew from, the requests task's token)
    let mut held: Option<(u64, CancellationToken)> = None;
    let mut logged_error = false;
    loop {
        let wait = match &held {
            Some((revision, _)) => {
                let sent = Instant::now();
                let renewed = async {
                    let bucket = cluster.lease_bucket().await?;
                    tokio::time::timeout(
                        ttl / 3,
                        bucket.update(LEASE_KEY, node.clone().into(), *revision),
                    )
                    .await
                    .context("timed out")?
                    .context("renewing")
                }
                .await;
                match renewed {
                    Ok(revision) => {
                        let epoch = cluster.epoch().unwrap_or(revision);
                        cluster.set_lease(Some(Lease {
                            epoch,
                            valid_until: sent + ttl.saturating_sub(LEASE_MARGIN),
                        }));
                        held = held.map(|(_, t)| (revision, t));
                    }
                    Err(e) => {
                        warn!("lost the ticker lease: {e:#}");
                        cluster.set_lease(None);
                        if let Some((_, requests)) = held.take() {
                            requests.cancel();
                        }
                        cluster.forget_buckets().await;
                    }
                }
                ttl / 3
            }
            None => match try_take(&cluster, &shared).await {
                Ok(Taken::Won { revision, sent }) => {
                    let epoch = revision;
                    cluster.set_lease(Some(Lease {
                        epoch,
                        valid_until: sent + ttl.saturating_sub(LEASE_MARGIN),
                    }));
                    let requests = token.child_token();
                    tokio::spawn(serve_requests(
                        cluster.clone(),
                        shared.clone(),
                        requests.clone(),
                    ));
                    held = Some((revision, requests));
                    Stats::inc(&shared.stats.cluster_elected);
                    info!(epoch, "this node is the ticker now");
                    logged_error = false;
                    ttl / 3
                }
                Ok(Taken::Held { expires_in }) => {
                    logged_error = false;
                    (expires_in + Duration::from_millis(20))
                        .clamp(Duration::from_millis(20), LEASE_POLL)
                }
                Err(e) => {
                    if !logged_error {
                        warn!("cannot take part in the ticker election: {e:#}");
                        logged_error = true;
                    }
                    cluster.forget_buckets().await;
                    Duration::from_millis(500)
                }
            },
        };
        tokio::select! {
            _ = token.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Shutting down: hand the lease over at once instead of letting it expire.
    if let Some((revision, requests)) = held {
        requests.cancel();
        cluster.set_lease(None);
        if let Ok(bucket) = cluster.lease_bucket().await {
            let released = tokio::time::timeout(
                Duration::from_secs(1),
                bucket.delete_expect_revision(LEASE_KEY, Some(revision)),
            )
            .await;
            if matches!(released, Ok(Ok(()))) {
                info!("ticker lease released");
            }
        }
    }
}

enum Taken {
    Won {
        revision: u64,
        sent: Instant,
    },
    /// Another node holds it; it expires in about this long unless renewed.
    Held {
        expires_in: Duration,
    },
}

/// One attempt to win the lease. On success the fleet state continues from the checkpoint
/// before the lease counts as held, so the first tick carries on from the last.
async fn try_take(cluster: &Cluster, shared: &Shared) -> Result<Taken> {
    let bucket = cluster.lease_bucket().await?;
    let sent = Instant::now();
    let created = tokio::time::timeout(
        cluster.lease_ttl / 3,
        bucket.create(LEASE_KEY, cluster.node.clone().into()),
    )
    .await
    .context("timed out")?;
    match created {
        Ok(revision) => {
            if let Err(e) = continue_fleet(cluster, shared).await {
                // Without the checkpoint this node could give cars new wire ids: give the
                // lease back and try again.
                let _ = bucket
                    .delete_expect_revision(LEASE_KEY, Some(revision))
                    .await;
                return Err(e.context("won the lease but cannot read the fleet checkpoint"));
            }
            Ok(Taken::Won { revision, sent })
        }
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let entry = bucket.entry(LEASE_KEY).await.ok().flatten();
            let expires_in = entry
                .map(|e| {
                    let age = time::OffsetDateTime::now_utc() - e.created;
                    let age = Duration::try_from(age).unwrap_or_default();
                    cluster.lease_ttl.saturating_sub(age)
                })
                .unwrap_or(LEASE_POLL);
            Ok(Taken::Held { expires_in })
        }
        Err(e) => Err(e).context("creating the lease"),
    }
}

/// Replaces this node's fleet state with the newest checkpoint (if it has our configuration).
async fn continue_fleet(cluster: &Cluster, shared: &Shared) -> Result<()> {
    let Some(checkpoint) = cluster.load_checkpoint().await? else {
        info!("no fleet checkpoint yet: this node's fleet starts the cluster's");
        return Ok(());
    };
    if checkpoint.config != cluster.config {
        warn!(
            "the fleet checkpoint was written by a node with another area, tick interval or \
             datagram budget: starting from this node's own fleet"
        );
        return Ok(());
    }
    let cars = checkpoint.fleet.cars.len();
    let restored = FleetState::restore(
        shared.area,
        shared.args.ingest.max_cars as usize,
        checkpoint.fleet,
    );
    *shared.fleet.lock().expect("fleet lock poisoned") = restored;
    info!(
        cars,
        tick = checkpoint.tick,
        "fleet continued from the checkpoint"
    );
    Ok(())
}

/// Answers fleet requests while this node is the ticker.
async fn serve_requests(cluster: Arc<Cluster>, shared: Arc<Shared>, token: CancellationToken) {
    let subject = cluster.subject("fleet");
    let mut requests = match cluster
        .client
        .queue_subscribe(subject.clone(), "ticker".into())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot answer fleet requests: {e}");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = token.cancelled() => break,
            m = requests.next() => match m { Some(m) => m, None => break },
        };
        let reply = match serde_json::from_slice::<FleetOp>(&message.payload) {
            Ok(op) => {
                let mut fleet = shared.fleet.lock().expect("fleet lock poisoned");
                op.run(&mut fleet, now_us())
            }
            Err(e) => FleetReply::Malformed {
                error: e.to_string(),
            },
        };
        if let Some(to) = message.reply {
            // Invariant: replies hold strings and numbers only.
            let body = serde_json::to_vec(&reply).expect("reply encodes");
            if let Err(e) = cluster.client.publish(to, body.into()).await {
                debug!("fleet reply not sent: {e}");
            }
        }
    }
    let _ = requests.unsubscribe().await;
}

/// Forwards the cluster's ticks to this node's sessions until `token` is cancelled.
pub(crate) async fn run_edge(
    cluster: Arc<Cluster>,
    shared: Arc<Shared>,
    latest: watch::Sender<Arc<Snapshot>>,
    token: CancellationToken,
) {
    let subject = cluster.subject("tick");
    let mut ticks = loop {
        match cluster.client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                warn!("cannot subscribe to {subject}: {e}");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    };
    let stats = &shared.stats;
    let mut edge = Edge::default();
    let mut roster = Arc::new(Vec::new());
    // Start from the newest checkpoint, so sessions that open before the first tick get the
    // fleet as it was.
    if let Ok(Some(c)) = cluster.load_checkpoint().await {
        if c.config == cluster.config {
            let events = edge.resync(&c.roster(), c.fleet.roster_version);
            roster = Arc::new(edge.roster());
            let fleet = FleetState::restore(shared.area, usize::MAX, c.fleet);
            let cars = Arc::new(fleet.samples(c.time_us));
            shared.publish(
                events,
                feed::snapshot(c.tick, c.time_us, &roster, cars),
                &latest,
            );
        }
    }
    loop {
        let first = tokio::select! {
            _ = token.cancelled() => break,
            m = ticks.next() => match m { Some(m) => m, None => break },
        };
        // Whatever else is already waiting: only the newest tick goes out (newest wins), but
        // every tick's roster events do.
        let mut messages = vec![first];
        while let Some(Some(m)) = ticks.next().now_or_never() {
            messages.push(m);
        }
        let _gate = tokio::select! {
            _ = token.cancelled() => break,
            gate = shared.tick_gate.lock() => gate,
        };
        let mut newest: Option<ClusterTick> = None;
        let mut events = Vec::new();
        let mut missed = 0;
        for message in messages {
            let Some(tick) = ClusterTick::decode(&message.payload) else {
                Stats::inc(&stats.cluster_ticks_malformed);
                continue;
            };
            match edge.on_tick(&tick, cluster.config) {
                Verdict::Foreign => {
                    Stats::inc(&stats.cluster_ticks_foreign);
                    if !cluster.foreign_config.swap(true, Ordering::Relaxed) {
                        warn!(
                            ticker = %tick.node,
                            "ignoring ticks from a node with another area, tick interval, \
                             datagram budget or version"
                        );
                    }
                    continue;
                }
                Verdict::Stale => {
                    Stats::inc(&stats.cluster_ticks_stale);
                    continue;
                }
                Verdict::Forward {
                    events: more,
                    missed: gap,
                } => {
                    events.extend(more);
                    missed += gap;
                }
                Verdict::Resync { missed: gap } => {
                    Stats::inc(&stats.cluster_resyncs);
                    missed += gap;
                    match cluster.load_checkpoint().await {
                        Ok(Some(c)) if c.config == cluster.config => {
                            events.extend(edge.resync(&c.roster(), c.fleet.roster_version));
                        }
                        Ok(_) => {}
                        Err(e) => debug!("roster resync failed: {e:#}"),
                    }
                }
            }
            cluster.foreign_config.store(false, Ordering::Relaxed);
            Stats::inc(&stats.cluster_ticks_received);
            if newest.replace(tick).is_some() {
                // Superseded before it went out: missed by the sessions.
                missed += 1;
            }
        }
        Stats::add(&stats.cluster_ticks_missed, missed);
        let Some(tick) = newest else { continue };
        let cars = match tick.cars() {
            Ok(cars) => Arc::new(cars),
            Err(e) => {
                Stats::inc(&stats.cluster_ticks_malformed);
                warn!(tick = tick.tick, "tick not forwarded: {e}");
                continue;
            }
        };
        if !events.is_empty() || roster.is_empty() {
            roster = Arc::new(edge.roster());
        }
        *cluster.ticker_node.lock().expect("ticker lock poisoned") = Some(tick.node.clone());
        let out = TickOut {
            tick: tick.tick,
            time_us: tick.time_us,
            events,
            roster: roster.clone(),
            cars,
            packed: Some(Arc::new(tick.payloads)),
        };
        feed::deliver(&shared, &latest, out).await;
    }
}
