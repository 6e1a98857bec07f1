//! The tick loop: read the fleet state, encode the tick once, hand the same bytes to every session.
//!
//! The loop never knows where cars come from: the simulator ([`SimSource`]) and the publishers
//! (`ingest`) both write into the [`FleetState`]; each tick reads it once.
//!
//! Sending never waits: quinn queues each datagram in the session's bounded datagram buffer and
//! drops the oldest when it is full, so a slow or dead session costs one failed enqueue and can
//! delay neither the tick nor anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use super::cluster::Cluster;
use super::{now_us, EncodedTick, Member, Shared, Snapshot, Stats};
use crate::fleet::{Fix, FleetState, Source};
use crate::proto::pack::pack_tick;
use crate::proto::wire::{CarInfo, CarList, CarSample, State, StreamMessage};
use crate::sim::{Road, Simulator};

/// Sessions served between cooperative yields of the fan-out loop.
const YIELD_EVERY: usize = 512;

/// The simulator as a position source: writes every simulated car's motion as a fix taken now.
pub(crate) struct SimSource {
    sim: Simulator,
    churn_ticks: u64,
}

impl SimSource {
    pub(crate) fn new(sim: Simulator, churn_ticks: u64) -> Self {
        Self { sim, churn_ticks }
    }

    /// The simulator's road network.
    pub(crate) fn roads(&self) -> Vec<Road> {
        self.sim.roads()
    }

    /// Writes the simulator's cars into the fleet state (at start, before the first tick).
    pub(crate) fn write(&self, fleet: &mut FleetState, now_us: u64) {
        let quant = fleet.area().quant;
        for (label, m) in self.sim.labelled_motions() {
            let (lat, lon) = quant.to_lat_lon(m.east_m, m.north_m);
            let fix = Fix {
                id: label.to_string(),
                lat,
                lon,
                heading_deg: Some(m.heading_deg),
                speed_mps: Some(m.speed_mps),
                time_us: Some(now_us),
                label: None,
            };
            if let Err(e) = fleet.apply(fix, Source::Simulator, now_us) {
                // Only a full fleet can refuse a simulated car (roads stay inside the area).
                warn!("simulated car {label} not applied: {e}");
            }
        }
    }

    /// Advances the simulation by one tick and writes it into the fleet state.
    fn step(&mut self, tick: u64, dt: Duration, fleet: &mut FleetState, now_us: u64) {
        self.sim.step(dt.as_secs_f64());
        if self.churn_ticks > 0 && tick.is_multiple_of(self.churn_ticks) {
            if let Some((gone, _joined)) = self.sim.churn() {
                fleet.remove(&gone);
            }
        }
        self.write(fleet, now_us);
    }
}

/// Whether the tick loop is alive and on time, for `/healthz`.
///
/// The loop runs on a thread of its own: if it panics or stalls, sessions stay open but nothing
/// moves any more, so the health check must notice and fail (an orchestrator then restarts the
/// process).
#[derive(Debug)]
pub(crate) struct TickHealth {
    started: Instant,
    /// Milliseconds from `started` to the end of the newest tick (0: none yet).
    last_tick_ms: AtomicU64,
    stopped: AtomicBool,
}

impl Default for TickHealth {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        }
    }
}

impl TickHealth {
    /// Longest time without a tick before the server counts as behind: three tick intervals
    /// and a second.
    pub(crate) fn allowed_gap(period: Duration) -> Duration {
        period * 3 + Duration::from_secs(1)
    }

    /// Records a finished tick.
    fn beat(&self) {
        let ms = self.started.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Records that the loop has ended (returned, panicked or never started).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Whether the loop has ended.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Time since the newest tick (or since start, before the first).
    pub(crate) fn since_last_tick(&self) -> Duration {
        let last = Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// `Err(reason)` if the loop has stopped or fallen behind ticks of `period`.
    pub(crate) fn check(&self, period: Duration) -> Result<(), String> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err("the tick loop has stopped".into());
        }
        let since = self.since_last_tick();
        let allowed = Self::allowed_gap(period);
        if since > allowed {
            return Err(format!(
                "no tick for {} ms (tick interval {} ms, allowed {} ms)",
                since.as_millis(),
                period.as_millis(),
                allowed.as_millis()
            ));
        }
        Ok(())
    }
}

/// Marks the tick loop stopped when dropped, including while a panic unwinds it.
struct Stopped<'a>(&'a TickHealth);
impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A snapshot with its initial-state frames encoded once for every session that opens.
pub(crate) fn snapshot(
    tick: u64,
    time_us: u64,
    roster: &[CarInfo],
    cars: Arc<Vec<CarSample>>,
) -> Snapshot {
    let mut frames = Vec::with_capacity(64 + roster.len() * 16 + cars.len() * 8);
    let messages = [
        StreamMessage::Roster(roster.to_vec()),
        StreamMessage::State(State {
            tick,
            time_us,
            cars: CarList::sorted(cars.to_vec()),
        }),
    ];
    for msg in messages {
        // Invariant: CarList::sorted yields ascending unique ids, which always encode.
        msg.encode_frame(&mut frames).expect("snapshot encodes");
    }
    Snapshot {
        tick,
        cars,
        frames: Bytes::from(frames),
    }
}

/// One tick, ready for every session on this node.
pub(crate) struct TickOut {
    pub tick: u64,
    pub time_us: u64,
    /// Roster events since the previous tick, in order.
    pub events: Vec<StreamMessage>,
    /// The roster after them.
    pub roster: Arc<Vec<CarInfo>>,
    /// Every car, by ascending id.
    pub cars: Arc<Vec<CarSample>>,
    /// The tick's datagram payloads under `--datagram-budget`, when already packed (always:
    /// by the tick loop on a single node, by the ticker in a cluster). Sessions that can take
    /// that budget get exactly these bytes behind their header.
    pub packed: Option<Arc<Vec<Vec<u8>>>>,
}

/// Where the tick loop's ticks go.
enum Sink {
    /// Straight to this node's sessions.
    Local(watch::Sender<Arc<Snapshot>>),
    /// To NATS, while this node holds the ticker lease; every node (this one included)
    /// forwards them from there (`cluster::run_edge`).
    Cluster(Arc<Cluster>),
}

/// Runs the tick loop (and, in a cluster, the edge that forwards the cluster's ticks) until
/// `token` is cancelled.
pub(crate) async fn run(
    shared: Arc<Shared>,
    sim: Option<SimSource>,
    latest: watch::Sender<Arc<Snapshot>>,
    token: CancellationToken,
) {
    let _stopped = Stopped(&shared.tick_health);
    match shared.cluster.clone() {
        None => produce(&shared, sim, Sink::Local(latest), &token).await,
        Some(cluster) => {
            let edge =
                super::cluster::run_edge(cluster.clone(), shared.clone(), latest, token.clone());
            let ticker = produce(&shared, sim, Sink::Cluster(cluster), &token);
            tokio::join!(edge, ticker);
        }
    }
    debug!("tick loop stopped");
}

/// The tick number of the wall-clock tick boundary at or before `time_us`: ticks count
/// `period_us` intervals since the Unix epoch, so every node, and every restart, numbers
/// the same instant alike.
pub(crate) fn tick_at(time_us: u64, period_us: u64) -> u64 {
    time_us / period_us
}

/// Produces a tick at every wall-clock tick boundary: reads the fleet state once, packs the
/// datagrams once, and hands them to the sink. In a cluster, only the node holding the ticker
/// lease produces.
async fn produce(
    shared: &Shared,
    mut sim: Option<SimSource>,
    sink: Sink,
    token: &CancellationToken,
) {
    let period = Duration::from_millis(u64::from(shared.args.tick_ms));
    let period_us = period.as_micros() as u64;
    let budget = shared.args.datagram_budget as usize;
    let car_timeout_us = shared.args.ingest.car_timeout.as_micros() as u64;
    let mut last_tick: u64 = 0;
    let mut roster_version = None;
    let mut roster = Arc::new(Vec::new());
    if let Sink::Local(latest) = &sink {
        // The first state was taken when the server started; starting can take a few tick
        // intervals on a busy machine. Take it again now, in the interval the first tick
        // follows, so that a session's first state is never several tick numbers before its
        // first tick (it would count them as missed).
        let time_us = now_us();
        let tick = tick_at(time_us, period_us);
        let (roster, cars) = {
            let fleet = shared.fleet.lock().expect("fleet lock poisoned");
            (fleet.roster(), Arc::new(fleet.samples(time_us)))
        };
        if latest.borrow().tick < tick {
            shared.publish(Vec::new(), snapshot(tick, time_us, &roster, cars), latest);
        }
        last_tick = tick;
    }
    loop {
        // Sleep to the next boundary; after a stall, carry on from now rather than bursting
        // the missed ticks.
        let now = now_us();
        let next = tick_at(now, period_us) + 1;
        let wait = Duration::from_micros((next * period_us).saturating_sub(now));
        tokio::select! {
            _ = token.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        // Held for the whole tick: a test holding it stops ticks (see `danger_pause_ticks`).
        let _gate = tokio::select! {
            _ = token.cancelled() => break,
            gate = shared.tick_gate.lock() => gate,
        };
        if shared.tick_panic.load(Ordering::Relaxed) {
            panic!("tick loop panicked on purpose (danger_panic_tick_loop)");
        }
        // Never backwards, never one number twice, even if the wall clock steps back.
        let tick = tick_at(now_us(), period_us).max(next).max(last_tick + 1);
        last_tick = tick;
        if let Sink::Cluster(cluster) = &sink {
            if !cluster.is_ticker() {
                continue;
            }
        }
        let time_us = now_us();
        let (from, to, events, cars, checkpoint) = {
            let mut fleet = shared.fleet.lock().expect("fleet lock poisoned");
            if let Some(sim) = &mut sim {
                sim.step(tick, period, &mut fleet, time_us);
            }
            let expired = fleet.expire(time_us, car_timeout_us);
            if expired > 0 {
                Stats::add(&shared.stats.ingest_cars_expired, expired as u64);
            }
            if roster_version != Some(fleet.roster_version()) {
                roster_version = Some(fleet.roster_version());
                roster = Arc::new(fleet.roster());
            }
            let from = fleet.version_before_changes();
            let events = fleet.take_changes();
            let checkpoint = matches!(sink, Sink::Cluster(_)).then(|| fleet.checkpoint());
            (
                from,
                fleet.roster_version(),
                events,
                Arc::new(fleet.samples(time_us)),
                checkpoint,
            )
        };
        let packed = match pack_tick(tick, time_us, &cars, budget) {
            Ok(parts) => Some(Arc::new(parts)),
            Err(e) => {
                warn!(tick, budget, "cannot encode tick: {e}");
                None
            }
        };
        match &sink {
            Sink::Local(latest) => {
                let out = TickOut {
                    tick,
                    time_us,
                    events,
                    roster: roster.clone(),
                    cars,
                    packed,
                };
                deliver(shared, latest, out).await;
            }
            Sink::Cluster(cluster) => {
                let Some(packed) = packed else { continue };
                let Some(fleet) = checkpoint else { continue };
                let tick = super::cluster::wire::ClusterTick {
                    format: super::cluster::wire::FORMAT,
                    config: cluster.config,
                    epoch: cluster.epoch().unwrap_or(0),
                    node: cluster.node.clone(),
                    tick,
                    time_us,
                    roster_from: from,
                    roster_to: to,
                    events,
                    payloads: packed.to_vec(),
                };
                cluster.publish_tick(shared, tick, fleet).await;
            }
        }
    }
}

/// Hands one tick to every session on this node: the snapshot and roster events for the
/// reliable streams, the datagrams for WebSocket, the engine's shards and the quinn sessions.
pub(crate) async fn deliver(shared: &Shared, latest: &watch::Sender<Arc<Snapshot>>, out: TickOut) {
    let TickOut {
        tick,
        time_us,
        events,
        roster,
        cars,
        packed,
    } = out;
    shared.publish(
        events,
        snapshot(tick, time_us, &roster, cars.clone()),
        latest,
    );
    // After the snapshot, so a WebSocket session that read the snapshot of this tick never
    // waits for it on the tick channel and never counts it as missed.
    let budget = shared.args.datagram_budget as usize;
    let mut encoder = TickEncoder::new(tick, time_us, &cars);
    if let Some(packed) = &packed {
        encoder.seed(budget, packed.clone());
    }
    publish_websocket_tick(shared, &mut encoder);
    // The engine's shards (`--engine proto`) frame and send it on their own threads.
    shared.engine_ticks.send_if_modified(|newest| {
        let listening = shared.engine_ticks.receiver_count() > 0;
        if listening {
            *newest = Some(Arc::new(super::engine::EngineTick {
                tick,
                time_us,
                cars: cars.clone(),
                packed: packed.clone(),
            }));
        }
        listening
    });
    let started = std::time::Instant::now();
    let sent = fan_out(shared, &mut encoder).await;
    if shared.engine_ticks.receiver_count() == 0 {
        shared.stats.fanout_seconds.observe(started.elapsed());
    }
    Stats::inc(&shared.stats.ticks);
    shared.tick_health.beat();
    trace!(tick, sent, elapsed = ?started.elapsed(), "tick fanned out");
}

/// One tick's datagrams for one session header and payload budget.
type Encoded = Arc<Vec<Bytes>>;

/// A session's datagram header and payload budget: sessions that share both share an encoding.
type EncodingKey = (Arc<[u8]>, usize);

/// Encodes one tick at most once per payload budget, and frames each encoding at most once per
/// header (WebTransport quarter stream id, WebSocket channel byte). Nearly every session of a
/// tick gets the very same `Bytes`.
pub(crate) struct TickEncoder<'a> {
    tick: u64,
    time_us: u64,
    cars: &'a [CarSample],
    packed: HashMap<usize, Option<Arc<Vec<Vec<u8>>>>>,
    framed: HashMap<EncodingKey, Option<Encoded>>,
}

impl<'a> TickEncoder<'a> {
    pub(crate) fn new(tick: u64, time_us: u64, cars: &'a [CarSample]) -> Self {
        Self {
            tick,
            time_us,
            cars,
            packed: HashMap::new(),
            framed: HashMap::new(),
        }
    }

    /// The tick's datagrams under `budget`, each prefixed with `header`; `None` if the tick
    /// cannot be packed into that budget (logged once).
    pub(crate) fn framed(&mut self, header: &Arc<[u8]>, budget: usize) -> Option<Encoded> {
        let key = (header.clone(), budget);
        if let Some(done) = self.framed.get(&key) {
            return done.clone();
        }
        let (tick, time_us, cars) = (self.tick, self.time_us, self.cars);
        let parts = self
            .packed
            .entry(budget)
            .or_insert_with(|| match pack_tick(tick, time_us, cars, budget) {
                Ok(parts) => Some(Arc::new(parts)),
                Err(e) => {
                    warn!(tick, budget, "cannot encode tick: {e}");
                    None
                }
            })
            .clone();
        let framed = parts.map(|parts| {
            Arc::new(
                parts
                    .iter()
                    .map(|p| {
                        let mut b = BytesMut::with_capacity(header.len() + p.len());
                        b.put_slice(header);
                        b.put_slice(p);
                        b.freeze()
                    })
                    .collect(),
            )
        });
        self.framed.insert(key, framed.clone());
        framed
    }

    /// Uses `parts`, already packed under `budget`, instead of packing again.
    pub(crate) fn seed(&mut self, budget: usize, parts: Arc<Vec<Vec<u8>>>) {
        self.packed.insert(budget, Some(parts));
    }

    /// Distinct payload budgets encoded so far.
    pub(crate) fn budgets(&self) -> usize {
        self.packed.len()
    }
}

/// Publishes the tick for the WebSocket sessions, framed with the WebSocket channel byte.
///
/// A `watch` channel holds only the newest value: a WebSocket task that is still sending an
/// older tick skips straight to this one, and the tick loop never waits for any of them.
fn publish_websocket_tick(shared: &Shared, encoder: &mut TickEncoder) {
    let budget = shared.args.datagram_budget as usize;
    let header: Arc<[u8]> = Arc::new([super::ws::CHANNEL_DATAGRAM]);
    if let Some(messages) = encoder.framed(&header, budget) {
        // Without the channel byte, this is the tick's encoded size on every transport.
        let payload: usize = messages.iter().map(|m| m.len() - 1).sum();
        let stats = &shared.stats;
        stats
            .snapshot_bytes
            .store(payload as u64, Ordering::Relaxed);
        stats
            .snapshot_datagrams
            .store(messages.len() as u64, Ordering::Relaxed);
        shared.ticks.send_replace(Arc::new(EncodedTick {
            tick: encoder.tick,
            messages,
        }));
    }
}

/// Sends the tick to every registered session; returns the number of datagrams queued.
async fn fan_out(shared: &Shared, encoder: &mut TickEncoder<'_>) -> u64 {
    let members: Vec<Member> = shared
        .members
        .lock()
        .expect("members lock poisoned")
        .values()
        .cloned()
        .collect();
    let budget = shared.args.datagram_budget as usize;
    let stats = &shared.stats;
    let (mut sent, mut bytes) = (0u64, 0u64);
    for (i, member) in members.iter().enumerate() {
        if i > 0 && i % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
        let Some(max) = member.conn.max_datagram_size() else {
            continue; // peer does not take datagrams, or the connection is gone
        };
        let room = max.saturating_sub(member.header.len());
        let this_budget = budget.min(room);
        let budgets = encoder.budgets();
        let datagrams = encoder.framed(&member.header, this_budget);
        if encoder.budgets() > budgets && this_budget < budget {
            Stats::inc(&stats.reencoded_ticks);
        }
        let Some(datagrams) = datagrams else { continue };
        for d in datagrams.iter() {
            match member.conn.send_datagram(d.clone()) {
                Ok(()) => {
                    sent += 1;
                    bytes += d.len() as u64;
                    member.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(quinn::SendDatagramError::TooLarge) => Stats::inc(&stats.datagrams_too_large),
                // Lost or unsupported: the session task notices and cleans up.
                Err(_) => break,
            }
        }
    }
    stats.datagrams_sent.fetch_add(sent, Ordering::Relaxed);
    stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::TickPart;

    fn cars(n: u32) -> Vec<CarSample> {
        (0..n)
            .map(|id| CarSample {
                id,
                x: id as u16,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn tick_health_fails_when_stopped_or_behind() {
        let health = TickHealth::default();
        let period = Duration::from_millis(100);
        assert_eq!(health.check(period), Ok(()));
        assert_eq!(TickHealth::allowed_gap(period), Duration::from_millis(1300));
        // Pretend the newest tick ended long ago.
        let behind = TickHealth {
            started: Instant::now() - Duration::from_secs(10),
            ..TickHealth::default()
        };
        let e = behind.check(period).unwrap_err();
        assert!(e.starts_with("no tick for"), "{e}");
        behind.beat();
        assert_eq!(behind.check(period), Ok(()));
        health.stop();
        assert_eq!(
            health.check(period),
            Err("the tick loop has stopped".into())
        );
    }

    #[test]
    fn tick_encoder_shares_bytes_and_packs_once_per_budget() {
        let cars = cars(300);
        let mut enc = TickEncoder::new(9, 1_000, &cars);
        let wt: Arc<[u8]> = Arc::new([0u8]);
        let ws: Arc<[u8]> = Arc::new([1u8]);
        let a = enc.framed(&wt, 1100).unwrap();
        let b = enc.framed(&wt, 1100).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "same header and budget: the same bytes"
        );
        let c = enc.framed(&ws, 1100).unwrap();
        assert_eq!(enc.budgets(), 1, "a second header reuses the packing");
        assert_eq!(a.len(), c.len());
        for (x, y) in a.iter().zip(c.iter()) {
            assert_eq!(x[1..], y[1..], "only the header differs");
        }
        let small = enc.framed(&wt, 300).unwrap();
        assert_eq!(enc.budgets(), 2);
        assert!(small.len() > a.len());
        for d in small.iter() {
            assert!(d.len() <= 301);
            assert_eq!(TickPart::decode(&d[1..]).unwrap().tick, 9);
        }
        assert!(
            enc.framed(&wt, 10).is_none(),
            "a budget below one car is refused"
        );
    }
}
