//! What fleetcast nodes say to each other over NATS, and how an edge node follows the ticker.
//!
//! Pure: no sockets, no clock. The async shell (`super`) moves these values over NATS.
//!
//! - [`ClusterTick`]: one tick as the ticker published it: the finished datagram payloads (the
//!   exact bytes every session on every node receives) and the roster events since the previous
//!   tick, with the roster versions they lead from and to.
//! - [`Checkpoint`]: the ticker's whole fleet state, kept in a JetStream key-value bucket and
//!   written before each tick is published: a new ticker continues from it (same wire ids), and
//!   an edge whose roster fell out of step rebuilds its roster from it.
//! - [`FleetOp`] / [`FleetReply`]: ingest requests any node forwards to the ticker, which owns
//!   the fleet state, and its answers.
//! - [`Edge`]: an edge node's view of the tick sequence and the roster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fleet::{Area, Car, Fix, FleetCheckpoint, FleetState, Source};
use crate::proto::wire::{CarInfo, CarSample, StreamMessage, TickPart, PROTOCOL_VERSION};

/// Version of the messages in this module; a node ignores ticks of another format.
pub(crate) const FORMAT: u8 = 1;

/// One tick as the ticker publishes it on `PREFIX.tick` (postcard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClusterTick {
    /// [`FORMAT`].
    pub format: u8,
    /// [`config_fingerprint`] of the ticker: nodes that disagree on the area, tick interval
    /// or datagram budget must not forward each other's ticks.
    pub config: u64,
    /// Revision of the ticker lease when this ticker won it: which ticker this is.
    pub epoch: u64,
    /// The ticker's node name (for logs and `/healthz`).
    pub node: String,
    /// Tick number: wall-clock tick boundaries since the Unix epoch.
    pub tick: u64,
    /// Server time of the tick, µs since the Unix epoch.
    pub time_us: u64,
    /// Roster version before this tick's events.
    pub roster_from: u64,
    /// Roster version after them.
    pub roster_to: u64,
    /// Roster events (`CarsAdded`, `CarsRemoved`) since the previous tick, in order.
    pub events: Vec<StreamMessage>,
    /// The tick's datagram payloads under the cluster's datagram budget (PROTOCOL.md section
    /// 6), without any transport header.
    pub payloads: Vec<Vec<u8>>,
}

impl ClusterTick {
    /// The message body.
    pub(crate) fn encode(&self) -> Vec<u8> {
        // Invariant: every field encodes (events come from the fleet state, which keeps ids
        // unique and labels short).
        postcard::to_allocvec(self).expect("cluster tick encodes")
    }

    /// A message body; `None` for another format or a malformed body.
    pub(crate) fn decode(body: &[u8]) -> Option<Self> {
        let tick: ClusterTick = postcard::from_bytes(body).ok()?;
        (tick.format == FORMAT).then_some(tick)
    }

    /// Every car of the tick, from its payloads, by ascending id. `Err` if a payload does not
    /// decode (a node never forwards such a tick).
    pub(crate) fn cars(&self) -> Result<Vec<CarSample>, String> {
        let mut cars = Vec::new();
        for (i, payload) in self.payloads.iter().enumerate() {
            let part = TickPart::decode(payload).map_err(|e| format!("payload {i}: {e}"))?;
            if part.tick != self.tick {
                return Err(format!(
                    "payload {i} is of tick {}, not {}",
                    part.tick, self.tick
                ));
            }
            cars.extend(part.cars.0);
        }
        cars.sort_unstable_by_key(|c| c.id);
        Ok(cars)
    }
}

/// The ticker's fleet state, as stored in the `PREFIX-fleet` bucket under `state` (postcard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    /// [`FORMAT`].
    pub format: u8,
    /// [`config_fingerprint`] of the ticker that wrote it.
    pub config: u64,
    /// The tick it was written for.
    pub tick: u64,
    /// Time of that tick, µs since the Unix epoch.
    pub time_us: u64,
    pub fleet: FleetCheckpoint,
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        // Invariant: plain numbers and strings always encode.
        postcard::to_allocvec(self).expect("checkpoint encodes")
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, String> {
        let c: Checkpoint = postcard::from_bytes(body).map_err(|e| e.to_string())?;
        if c.format != FORMAT {
            return Err(format!(
                "checkpoint format {} (this node reads {FORMAT})",
                c.format
            ));
        }
        Ok(c)
    }

    /// The roster it holds, by ascending wire id.
    pub(crate) fn roster(&self) -> Vec<CarInfo> {
        self.fleet
            .cars
            .iter()
            .map(|c| CarInfo {
                id: c.wire_id,
                label: c.label.clone(),
            })
            .collect()
    }
}

/// A fingerprint of everything nodes must agree on to forward each other's ticks: the protocol
/// version, the served area and its quantisation, the tick interval and the datagram budget.
pub(crate) fn config_fingerprint(area: &Area, tick_ms: u32, datagram_budget: u32) -> u64 {
    let q = &area.quant;
    let text = format!(
        "fleetcast-cluster/{FORMAT}/{PROTOCOL_VERSION}/{:?}/{:?}/{:?}/{:?}/{:?}/{:?}/{:?}/{tick_ms}/{datagram_budget}",
        area.south, area.west, area.north, area.east, q.origin_lat_deg, q.origin_lon_deg, q.unit_m
    );
    let digest = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A request to the ticker, which owns the fleet state (JSON on `PREFIX.fleet`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum FleetOp {
    /// Apply publishers' fixes, already validated by the node that received them, each with
    /// its index in the publisher's batch.
    Apply { fixes: Vec<(usize, Fix)> },
    /// Up to `limit` cars with wire ids above `after` (all from the start when `None`), by
    /// ascending wire id: a big fleet is listed a page at a time, each page one NATS reply.
    List { after: Option<u32>, limit: usize },
    /// Remove a publisher's car.
    Delete { id: String },
}

/// The ticker's answer to a [`FleetOp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub(crate) enum FleetReply {
    /// How many fixes were applied, and why the others were not (index in the batch, reason).
    Applied {
        accepted: usize,
        rejected: Vec<(usize, String)>,
    },
    /// A page of cars; `more` when cars with higher wire ids remain.
    Cars {
        cars: Vec<Car>,
        more: bool,
    },
    Deleted {
        wire_id: u32,
    },
    NotFound,
    /// The car belongs to the simulator.
    NotYours,
    /// The request did not parse (a node of another version?).
    Malformed {
        error: String,
    },
}

impl FleetOp {
    /// Carries the request out on `fleet` at `now_us`: the one implementation, used by a single
    /// node directly and by the ticker for the whole cluster.
    pub(crate) fn run(self, fleet: &mut FleetState, now_us: u64) -> FleetReply {
        match self {
            FleetOp::Apply { fixes } => {
                let mut accepted = 0;
                let mut rejected = Vec::new();
                for (index, fix) in fixes {
                    match fleet.apply(fix, Source::Publisher, now_us) {
                        Ok(()) => accepted += 1,
                        Err(e) => rejected.push((index, e.to_string())),
                    }
                }
                FleetReply::Applied { accepted, rejected }
            }
            FleetOp::List { after, limit } => {
                let mut cars: Vec<Car> = fleet
                    .cars()
                    .filter(|c| after.is_none_or(|a| c.wire_id > a))
                    .take(limit.max(1) + 1)
                    .cloned()
                    .collect();
                let more = cars.len() > limit.max(1);
                cars.truncate(limit.max(1));
                FleetReply::Cars { cars, more }
            }
            FleetOp::Delete { id } => match fleet.car(&id).map(|c| c.source) {
                None => FleetReply::NotFound,
                Some(Source::Simulator) => FleetReply::NotYours,
                Some(Source::Publisher) => match fleet.remove(&id) {
                    Some(wire_id) => FleetReply::Deleted { wire_id },
                    None => FleetReply::NotFound,
                },
            },
        }
    }
}

/// What an edge does with a tick it received.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Forward it to the sessions with these roster events first; `missed` tick numbers were
    /// skipped since the previous forwarded tick (lost on NATS, or no ticker for a while).
    Forward {
        events: Vec<StreamMessage>,
        missed: u64,
    },
    /// The roster is out of step (events were lost, or this node just joined): rebuild it
    /// from the checkpoint ([`Edge::resync`]), then forward.
    Resync { missed: u64 },
    /// Not newer than the newest forwarded tick: dropped, so tick numbers never go backwards
    /// and no number is forwarded with two contents.
    Stale,
    /// Another configuration or format: never forwarded.
    Foreign,
}

/// An edge node's view of the cluster's ticks: the newest forwarded tick and the roster.
#[derive(Debug, Default)]
pub(crate) struct Edge {
    last_tick: Option<u64>,
    roster: BTreeMap<u32, String>,
    roster_version: Option<u64>,
}

impl Edge {
    /// The newest tick forwarded.
    #[cfg(test)]
    pub(crate) fn last_tick(&self) -> Option<u64> {
        self.last_tick
    }

    /// The roster as this edge holds it, by ascending wire id.
    pub(crate) fn roster(&self) -> Vec<CarInfo> {
        self.roster
            .iter()
            .map(|(&id, label)| CarInfo {
                id,
                label: label.clone(),
            })
            .collect()
    }

    /// Decides what to do with `tick` (from a ticker with fingerprint `tick.config`, checked
    /// against this node's `config`).
    pub(crate) fn on_tick(&mut self, tick: &ClusterTick, config: u64) -> Verdict {
        if tick.format != FORMAT || tick.config != config {
            return Verdict::Foreign;
        }
        if self.last_tick.is_some_and(|last| tick.tick <= last) {
            return Verdict::Stale;
        }
        let missed = self
            .last_tick
            .map_or(0, |last| tick.tick.saturating_sub(last + 1));
        self.last_tick = Some(tick.tick);
        if self.roster_version == Some(tick.roster_to) {
            // Already there (a resync read a checkpoint written for this tick).
            return Verdict::Forward {
                events: Vec::new(),
                missed,
            };
        }
        if self.roster_version != Some(tick.roster_from) {
            return Verdict::Resync { missed };
        }
        for event in &tick.events {
            self.apply(event);
        }
        self.roster_version = Some(tick.roster_to);
        Verdict::Forward {
            events: tick.events.clone(),
            missed,
        }
    }

    /// Replaces the roster with `roster` at `version`; returns the events that take a session
    /// holding the old roster to the new one (removals first, then joins and relabels).
    pub(crate) fn resync(&mut self, roster: &[CarInfo], version: u64) -> Vec<StreamMessage> {
        let new: BTreeMap<u32, String> = roster.iter().map(|c| (c.id, c.label.clone())).collect();
        let removed: Vec<u32> = self
            .roster
            .keys()
            .filter(|id| !new.contains_key(id))
            .copied()
            .collect();
        let added: Vec<CarInfo> = new
            .iter()
            .filter(|(id, label)| self.roster.get(id) != Some(label))
            .map(|(&id, label)| CarInfo {
                id,
                label: label.clone(),
            })
            .collect();
        self.roster = new;
        self.roster_version = Some(version);
        let mut events = Vec::new();
        if !removed.is_empty() {
            events.push(StreamMessage::CarsRemoved(removed));
        }
        if !added.is_empty() {
            events.push(StreamMessage::CarsAdded(added));
        }
        events
    }

    fn apply(&mut self, event: &StreamMessage) {
        match event {
            StreamMessage::CarsAdded(list) => {
                for c in list {
                    self.roster.insert(c.id, c.label.clone());
                }
            }
            StreamMessage::CarsRemoved(ids) => {
                for id in ids {
                    self.roster.remove(id);
                }
            }
            // Only roster events travel with ticks.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u32, label: &str) -> CarInfo {
        CarInfo {
            id,
            label: label.into(),
        }
    }

    fn tick(n: u64, from: u64, to: u64, events: Vec<StreamMessage>) -> ClusterTick {
        ClusterTick {
            format: FORMAT,
            config: 7,
            epoch: 1,
            node: "a".into(),
            tick: n,
            time_us: n * 1_000_000,
            roster_from: from,
            roster_to: to,
            events,
            payloads: Vec::new(),
        }
    }

    #[test]
    fn cluster_tick_round_trips_and_refuses_other_formats() {
        let mut t = tick(5, 1, 2, vec![StreamMessage::CarsAdded(vec![info(3, "x")])]);
        t.payloads = vec![vec![1, 2, 3]];
        assert_eq!(ClusterTick::decode(&t.encode()), Some(t.clone()));
        t.format = FORMAT + 1;
        assert_eq!(ClusterTick::decode(&t.encode()), None);
        assert_eq!(ClusterTick::decode(b"\xff\xff"), None);
    }

    #[test]
    fn edge_forwards_in_order_counts_gaps_and_drops_stale_and_foreign_ticks() {
        let mut edge = Edge::default();
        edge.resync(&[], 0);
        let v = edge.on_tick(
            &tick(10, 0, 1, vec![StreamMessage::CarsAdded(vec![info(0, "a")])]),
            7,
        );
        assert!(matches!(v, Verdict::Forward { missed: 0, ref events } if events.len() == 1));
        assert_eq!(edge.roster(), vec![info(0, "a")]);
        assert_eq!(edge.on_tick(&tick(10, 1, 1, vec![]), 7), Verdict::Stale);
        assert_eq!(edge.on_tick(&tick(9, 1, 1, vec![]), 7), Verdict::Stale);
        assert_eq!(edge.on_tick(&tick(20, 1, 1, vec![]), 8), Verdict::Foreign);
        assert_eq!(
            edge.on_tick(&tick(13, 1, 1, vec![]), 7),
            Verdict::Forward {
                events: vec![],
                missed: 2
            }
        );
        assert_eq!(edge.last_tick(), Some(13));
    }

    #[test]
    fn edge_resyncs_when_events_were_lost_and_the_diff_restores_the_roster() {
        let mut edge = Edge::default();
        // A new edge knows no roster version: it must resync first.
        assert_eq!(
            edge.on_tick(&tick(1, 4, 4, vec![]), 7),
            Verdict::Resync { missed: 0 }
        );
        let events = edge.resync(&[info(0, "a"), info(1, "b")], 4);
        assert_eq!(
            events,
            vec![StreamMessage::CarsAdded(vec![info(0, "a"), info(1, "b")])]
        );
        // Tick 2 (version 4 -> 6) was lost; tick 3 leads from 6.
        assert_eq!(
            edge.on_tick(&tick(3, 6, 7, vec![]), 7),
            Verdict::Resync { missed: 1 }
        );
        let events = edge.resync(&[info(1, "B"), info(2, "c")], 7);
        assert_eq!(
            events,
            vec![
                StreamMessage::CarsRemoved(vec![0]),
                StreamMessage::CarsAdded(vec![info(1, "B"), info(2, "c")]),
            ]
        );
        // A checkpoint newer than the tick: the tick's events are already in.
        edge.resync(&[info(1, "B"), info(2, "c"), info(3, "d")], 9);
        assert_eq!(
            edge.on_tick(
                &tick(4, 8, 9, vec![StreamMessage::CarsAdded(vec![info(3, "d")])]),
                7
            ),
            Verdict::Forward {
                events: vec![],
                missed: 0
            }
        );
    }

    #[test]
    fn fleet_ops_apply_list_and_delete_like_a_single_node() {
        let area = Area::square(52.35, 4.86, 4000.0).unwrap();
        let mut fleet = FleetState::new(area, 10);
        let (lat, lon) = area.quant.to_lat_lon(10.0, 10.0);
        let fix = |id: &str, t: u64| Fix {
            id: id.into(),
            lat,
            lon,
            heading_deg: None,
            speed_mps: None,
            time_us: Some(t),
            label: None,
        };
        let op = FleetOp::Apply {
            fixes: vec![(0, fix("a", 100)), (2, fix("a", 50))],
        };
        // Through JSON, as it travels.
        let op: FleetOp = serde_json::from_slice(&serde_json::to_vec(&op).unwrap()).unwrap();
        let FleetReply::Applied { accepted, rejected } = op.run(&mut fleet, 200) else {
            panic!("not applied")
        };
        assert_eq!(accepted, 1);
        assert_eq!(rejected.len(), 1);
        assert_eq!(
            rejected[0].0, 2,
            "the rejection keeps the publisher's index"
        );
        assert!(rejected[0].1.contains("older"), "{}", rejected[0].1);
        let FleetReply::Cars { cars, more } = (FleetOp::List {
            after: None,
            limit: 10,
        })
        .run(&mut fleet, 200) else {
            panic!()
        };
        assert_eq!((cars.len(), more), (1, false));
        assert_eq!(
            FleetOp::Delete { id: "a".into() }.run(&mut fleet, 200),
            FleetReply::Deleted { wire_id: 0 }
        );
        assert_eq!(
            FleetOp::Delete { id: "a".into() }.run(&mut fleet, 200),
            FleetReply::NotFound
        );
    }

    #[test]
    fn fingerprint_changes_with_what_nodes_must_share() {
        let a = Area::square(52.35, 4.86, 4000.0).unwrap();
        let b = Area::square(52.35, 4.86, 5000.0).unwrap();
        let base = config_fingerprint(&a, 1000, 1100);
        assert_eq!(base, config_fingerprint(&a, 1000, 1100));
        assert_ne!(base, config_fingerprint(&b, 1000, 1100));
        assert_ne!(base, config_fingerprint(&a, 500, 1100));
        assert_ne!(base, config_fingerprint(&a, 1000, 1000));
    }

    #[test]
    fn listing_pages_through_the_fleet_by_wire_id() {
        let area = Area::square(52.35, 4.86, 4000.0).unwrap();
        let mut fleet = FleetState::new(area, 100);
        let (lat, lon) = area.quant.to_lat_lon(10.0, 10.0);
        for i in 0..7 {
            let fix = Fix {
                id: format!("car-{i}"),
                lat,
                lon,
                heading_deg: None,
                speed_mps: None,
                time_us: Some(100),
                label: None,
            };
            fleet.apply(fix, Source::Publisher, 100).unwrap();
        }
        let mut after = None;
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let FleetReply::Cars { cars, more } =
                (FleetOp::List { after, limit: 3 }).run(&mut fleet, 100)
            else {
                panic!("not a page")
            };
            pages += 1;
            assert!(cars.len() <= 3);
            seen.extend(cars.iter().map(|c| c.wire_id));
            after = cars.last().map(|c| c.wire_id);
            if !more {
                break;
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, (0..7).collect::<Vec<u32>>());
    }
}
