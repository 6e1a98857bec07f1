//! The client's view of the fleet: applies the reliable stream and datagram parts, newest wins.
//!
//! Rules (PROTOCOL.md section 7, "Applying updates"):
//! - a car's sample is replaced only by a sample from a strictly newer tick; duplicates,
//!   reordered and stale parts change nothing;
//! - only cars on the roster are drawn. A sample whose id is not on the roster yet (its
//!   `CarsAdded` is still on its way: datagrams overtake the reliable stream) is held pending,
//!   the newest per id, for [`PENDING_TICKS`] ticks and at most [`MAX_PENDING`] ids, and applied
//!   when the roster event arrives. Samples of cars that left (removed, or missing from a newer
//!   `State`) are dropped, so a removed car is never resurrected by a late datagram;
//! - tick accounting starts after the tick of the first `State`: each later tick is counted once
//!   as complete (all parts), partial (some parts) or missed (none), when it falls out of the
//!   reorder window or when the session ends.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use super::wire::{CarInfo, CarSample, Hello, State, StreamMessage, TickPart};

/// Ticks a part may arrive late and still count towards its tick.
pub const REORDER_WINDOW: u64 = 3;

/// Ticks a sample of an id that is not on the roster is held for its roster event: it is
/// dropped once a tick more than this much newer has been seen.
pub const PENDING_TICKS: u64 = 8;

/// Most ids whose samples are held pending at once; samples of further unknown ids are dropped.
pub const MAX_PENDING: usize = 4096;

/// What the view holds for one car.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarEntry {
    /// Label from the roster.
    pub label: String,
    /// Newest sample, if any has arrived.
    pub sample: Option<CarSample>,
    /// Tick of `sample` (0 when none).
    pub tick: u64,
    /// Server time of that tick, microseconds since the Unix epoch.
    pub time_us: u64,
}

/// What applying a datagram part did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartOutcome {
    /// Cars whose sample was replaced.
    pub applied: usize,
    /// Cars skipped because the view already held the same or a newer tick (on the roster or
    /// pending).
    pub stale: usize,
    /// Cars whose id is not on the roster yet, held until their roster event arrives.
    pub pending: usize,
    /// Cars dropped because their id is not on the roster and the sample cannot be held: the car
    /// left, the sample is older than [`PENDING_TICKS`], or [`MAX_PENDING`] ids are pending.
    pub unknown: usize,
    /// The exact part (tick, index) had been received before.
    pub duplicate: bool,
}

/// Tick counters, as reported by `fleetcast watch --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TickCounts {
    /// Distinct ticks after the initial state with at least one part received.
    pub received: u64,
    /// Finalised ticks with every part received.
    pub complete: u64,
    /// Finalised ticks with some but not all parts received.
    pub partial: u64,
    /// Finalised ticks with no part received.
    pub missed: u64,
    /// Parts received twice.
    pub duplicate_parts: u64,
    /// Parts for ticks already finalised or older than the initial state.
    pub late_parts: u64,
}

/// What became of samples whose id was not on the roster when they arrived (since the view
/// was made). A sample of a car that is still in the fleet was lost only if it `expired` or
/// hit the `overflow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SampleCounts {
    /// Samples held pending (a newer sample of the same id replaces the held one).
    pub held: u64,
    /// Held samples applied when their car's `CarsAdded` or `Roster` arrived.
    pub adopted: u64,
    /// Samples dropped because no roster event named their car within [`PENDING_TICKS`] ticks
    /// (held, or already that old when they arrived).
    pub expired: u64,
    /// Samples dropped because their car had left: removed by `CarsRemoved` or a `Roster`, or
    /// absent from a `State` at least as new as the sample.
    pub removed: u64,
    /// Samples dropped because [`MAX_PENDING`] other ids were already pending.
    pub overflow: u64,
}

/// A sample waiting for its car's roster event.
#[derive(Debug, Clone, Copy)]
struct Pending {
    sample: CarSample,
    tick: u64,
    time_us: u64,
}

#[derive(Debug, Clone)]
struct PartSet {
    parts: u16,
    seen: Vec<u64>,
    count: u16,
}

impl PartSet {
    fn new(parts: u16) -> Self {
        Self {
            parts,
            seen: vec![0; usize::from(parts).div_ceil(64)],
            count: 0,
        }
    }

    /// Marks a part; false if it was already marked.
    fn mark(&mut self, part: u16) -> bool {
        let (word, bit) = (usize::from(part) / 64, part % 64);
        let fresh = self.seen[word] & (1 << bit) == 0;
        if fresh {
            self.seen[word] |= 1 << bit;
            self.count += 1;
        }
        fresh
    }
}

/// Counts complete, partial and missed ticks with a small reorder window.
#[derive(Debug, Clone, Default)]
pub struct TickTracker {
    /// Ticks up to and including this one are finalised (or precede the initial state).
    finalised_through: Option<u64>,
    /// Parts that arrived before the initial state; sorted out when it comes.
    early: BTreeMap<u64, PartSet>,
    pending: BTreeMap<u64, PartSet>,
    highest: u64,
    counts: TickCounts,
}

impl TickTracker {
    /// Sets the tick of the initial state; ticks after it are counted.
    pub fn start_after(&mut self, tick: u64) {
        if self.finalised_through.is_some() {
            return;
        }
        self.finalised_through = Some(tick);
        self.highest = tick;
        for (t, set) in std::mem::take(&mut self.early) {
            if t > tick {
                self.counts.received += 1;
                self.highest = self.highest.max(t);
                self.pending.insert(t, set);
            } else {
                self.counts.late_parts += u64::from(set.count);
            }
        }
        self.finalise_window();
    }

    /// Records a part's arrival; returns false if it was a duplicate.
    pub fn record(&mut self, tick: u64, part: u16, parts: u16) -> bool {
        let Some(done) = self.finalised_through else {
            let set = self
                .early
                .entry(tick)
                .or_insert_with(|| PartSet::new(parts));
            return Self::mark(&mut self.counts, set, part, parts);
        };
        if tick <= done {
            self.counts.late_parts += 1;
            return true;
        }
        let set = self.pending.entry(tick).or_insert_with(|| {
            self.counts.received += 1;
            PartSet::new(parts)
        });
        let fresh = Self::mark(&mut self.counts, set, part, parts);
        if tick > self.highest {
            self.highest = tick;
            self.finalise_window();
        }
        fresh
    }

    fn mark(counts: &mut TickCounts, set: &mut PartSet, part: u16, parts: u16) -> bool {
        // A part count that disagrees with the first part seen is treated like a lost part:
        // the tick cannot be complete, but the cars in it are still valid samples.
        if parts != set.parts || part >= set.parts {
            return true;
        }
        let fresh = set.mark(part);
        if !fresh {
            counts.duplicate_parts += 1;
        }
        fresh
    }

    fn finalise_window(&mut self) {
        let upto = self.highest.saturating_sub(REORDER_WINDOW);
        self.finalise_through(upto);
    }

    /// Finalises every tick up to `upto`.
    fn finalise_through(&mut self, upto: u64) {
        let Some(done) = self.finalised_through else {
            return;
        };
        if upto <= done {
            return;
        }
        let mut seen = 0u64;
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > upto {
                break;
            }
            let set = entry.remove();
            seen += 1;
            if set.count == set.parts {
                self.counts.complete += 1;
            } else {
                self.counts.partial += 1;
            }
        }
        self.counts.missed += (upto - done) - seen;
        self.finalised_through = Some(upto);
    }

    /// Finalises everything seen so far (the session ended).
    pub fn finish(&mut self) {
        self.finalise_through(self.highest);
    }

    /// Current counters.
    pub fn counts(&self) -> TickCounts {
        self.counts
    }
}

/// The fleet as one client sees it.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    hello: Option<Hello>,
    cars: HashMap<u32, CarEntry>,
    ticks: TickTracker,
    initial_cars: Option<usize>,
    /// Newest sample of each id not on the roster, waiting for its roster event.
    pending: HashMap<u32, Pending>,
    /// Ids removed from the roster, with the newest tick seen when they were; forgotten
    /// [`PENDING_TICKS`] ticks later (ids are never reused, so this only classifies late
    /// samples of departed cars).
    removed: HashMap<u32, u64>,
    /// Newest tick seen in a `State` or a part.
    newest: Option<u64>,
    /// Tick of the newest `State`: every car of that tick was in it.
    state_tick: Option<u64>,
    samples: SampleCounts,
}

impl FleetView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// The hello, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Cars currently on the roster.
    pub fn cars(&self) -> &HashMap<u32, CarEntry> {
        &self.cars
    }

    /// Number of cars in the first `State` message, once received.
    pub fn initial_cars(&self) -> Option<usize> {
        self.initial_cars
    }

    /// Tick counters so far.
    pub fn counts(&self) -> TickCounts {
        self.ticks.counts()
    }

    /// What became of samples of ids that were not on the roster.
    pub fn samples(&self) -> SampleCounts {
        self.samples
    }

    /// Ids whose samples are held pending right now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Applies one message from the reliable stream.
    pub fn apply_message(&mut self, msg: StreamMessage) {
        match msg {
            StreamMessage::Hello(hello) => self.hello = Some(hello),
            StreamMessage::Roster(roster) => {
                let keep: HashMap<u32, String> =
                    roster.into_iter().map(|c| (c.id, c.label)).collect();
                let gone: Vec<u32> = self
                    .cars
                    .keys()
                    .filter(|id| !keep.contains_key(id))
                    .copied()
                    .collect();
                for id in gone {
                    self.remove_car(id);
                }
                for (id, label) in keep {
                    self.add_car(CarInfo { id, label });
                }
            }
            StreamMessage::CarsAdded(cars) => {
                for car in cars {
                    self.add_car(car);
                }
            }
            StreamMessage::CarsRemoved(ids) => {
                for id in ids {
                    self.remove_car(id);
                }
            }
            StreamMessage::State(state) => self.apply_state(state),
            StreamMessage::Goodbye { .. } => {}
        }
    }

    /// Puts a car on the roster (or relabels it), with its pending sample if one is held.
    fn add_car(&mut self, info: CarInfo) {
        self.removed.remove(&info.id);
        match self.cars.entry(info.id) {
            Entry::Occupied(mut e) => e.get_mut().label = info.label,
            Entry::Vacant(e) => {
                let held = self.pending.remove(&info.id);
                if held.is_some() {
                    self.samples.adopted += 1;
                }
                e.insert(CarEntry {
                    label: info.label,
                    sample: held.map(|p| p.sample),
                    tick: held.map_or(0, |p| p.tick),
                    time_us: held.map_or(0, |p| p.time_us),
                });
            }
        }
    }

    /// Takes a car off the roster and remembers that it left.
    fn remove_car(&mut self, id: u32) {
        self.cars.remove(&id);
        if self.pending.remove(&id).is_some() {
            self.samples.removed += 1;
        }
        self.removed.insert(id, self.newest.unwrap_or(0));
    }

    fn apply_state(&mut self, state: State) {
        if self.initial_cars.is_none() {
            self.initial_cars = Some(state.cars.0.len());
        }
        self.apply_cars(state.tick, state.time_us, &state.cars.0);
        // The state holds every car of its tick: a held sample of that tick or older belongs to
        // a car that had left by then.
        self.state_tick = Some(self.state_tick.map_or(state.tick, |t| t.max(state.tick)));
        let before = self.pending.len();
        self.pending.retain(|_, p| p.tick > state.tick);
        self.samples.removed += (before - self.pending.len()) as u64;
        self.ticks.start_after(state.tick);
    }

    /// Applies a decoded datagram part.
    pub fn apply_part(&mut self, part: &TickPart) -> PartOutcome {
        let fresh = self.ticks.record(part.tick, part.part, part.parts);
        let mut outcome = self.apply_cars(part.tick, part.time_us, &part.cars.0);
        outcome.duplicate = !fresh;
        outcome
    }

    fn apply_cars(&mut self, tick: u64, time_us: u64, cars: &[CarSample]) -> PartOutcome {
        self.advance(tick);
        let mut outcome = PartOutcome::default();
        for car in cars {
            match self.cars.get_mut(&car.id) {
                None => self.hold(car, tick, time_us, &mut outcome),
                Some(entry) if entry.sample.is_some() && entry.tick >= tick => outcome.stale += 1,
                Some(entry) => {
                    entry.sample = Some(*car);
                    entry.tick = tick;
                    entry.time_us = time_us;
                    outcome.applied += 1;
                }
            }
        }
        outcome
    }

    /// A sample of an id that is not on the roster: hold it for its roster event, or drop it.
    fn hold(&mut self, car: &CarSample, tick: u64, time_us: u64, outcome: &mut PartOutcome) {
        let newest = self.newest.unwrap_or(tick);
        let samples = &mut self.samples;
        if self.removed.contains_key(&car.id) || self.state_tick.is_some_and(|s| tick <= s) {
            samples.removed += 1;
            outcome.unknown += 1;
            return;
        }
        if tick.saturating_add(PENDING_TICKS) < newest {
            samples.expired += 1;
            outcome.unknown += 1;
            return;
        }
        let held = Pending {
            sample: *car,
            tick,
            time_us,
        };
        let room = self.pending.len() < MAX_PENDING;
        match self.pending.entry(car.id) {
            Entry::Occupied(e) if e.get().tick >= tick => outcome.stale += 1,
            Entry::Occupied(mut e) => {
                e.insert(held);
                samples.held += 1;
                outcome.pending += 1;
            }
            Entry::Vacant(_) if !room => {
                samples.overflow += 1;
                outcome.unknown += 1;
            }
            Entry::Vacant(e) => {
                e.insert(held);
                samples.held += 1;
                outcome.pending += 1;
            }
        }
    }

    /// Notes the newest tick seen; drops held samples and removals that are now too old.
    fn advance(&mut self, tick: u64) {
        if self.newest.is_some_and(|n| n >= tick) {
            return;
        }
        self.newest = Some(tick);
        let keep = |t: u64| t.saturating_add(PENDING_TICKS) >= tick;
        let before = self.pending.len();
        self.pending.retain(|_, p| keep(p.tick));
        self.samples.expired += (before - self.pending.len()) as u64;
        self.removed.retain(|_, &mut at| keep(at));
    }

    /// Finalises tick accounting at the end of a session.
    pub fn finish(&mut self) {
        self.ticks.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::CarList;

    fn car(id: u32, x: u16) -> CarSample {
        CarSample {
            id,
            x,
            ..Default::default()
        }
    }

    fn part(tick: u64, p: u16, n: u16, cars: Vec<CarSample>) -> TickPart {
        TickPart {
            tick,
            time_us: tick.saturating_mul(1_000_000),
            part: p,
            parts: n,
            cars: CarList(cars),
        }
    }

    fn view_with(ids: &[u32], state_tick: u64) -> FleetView {
        let mut v = FleetView::new();
        v.apply_message(StreamMessage::Roster(
            ids.iter()
                .map(|&id| CarInfo {
                    id,
                    label: format!("car {id}"),
                })
                .collect(),
        ));
        v.apply_message(StreamMessage::State(State {
            tick: state_tick,
            time_us: 0,
            cars: CarList(ids.iter().map(|&id| car(id, 0)).collect()),
        }));
        v
    }

    #[test]
    fn apply_newer_part_replaces_older_never_the_reverse() {
        let mut v = view_with(&[1, 2], 10);
        assert_eq!(v.apply_part(&part(12, 0, 1, vec![car(1, 12)])).applied, 1);
        let o = v.apply_part(&part(11, 0, 1, vec![car(1, 11), car(2, 11)]));
        assert_eq!((o.applied, o.stale), (1, 1));
        assert_eq!(v.cars()[&1].sample.unwrap().x, 12);
        assert_eq!(v.cars()[&2].sample.unwrap().x, 11);
        let o = v.apply_part(&part(12, 0, 1, vec![car(1, 99)]));
        assert!(o.duplicate);
        assert_eq!(v.cars()[&1].sample.unwrap().x, 12);
    }

    fn info(id: u32) -> CarInfo {
        CarInfo {
            id,
            label: format!("car {id}"),
        }
    }

    #[test]
    fn apply_drops_removed_cars_and_holds_unknown_ones_until_added() {
        let mut v = view_with(&[1, 2], 10);
        v.apply_message(StreamMessage::CarsRemoved(vec![2]));
        let o = v.apply_part(&part(11, 0, 1, vec![car(1, 1), car(2, 1), car(3, 1)]));
        assert_eq!((o.applied, o.pending, o.unknown), (1, 1, 1));
        assert!(!v.cars().contains_key(&2), "a removed car stays removed");
        assert!(!v.cars().contains_key(&3), "held, not on the roster yet");
        assert_eq!(v.pending(), 1);
        v.apply_message(StreamMessage::CarsAdded(vec![info(3)]));
        let three = &v.cars()[&3];
        assert_eq!((three.sample.unwrap().x, three.tick), (1, 11));
        assert_eq!(v.pending(), 0);
        assert_eq!(v.apply_part(&part(12, 0, 1, vec![car(3, 5)])).applied, 1);
        let s = v.samples();
        assert_eq!(
            (s.held, s.adopted, s.removed, s.expired, s.overflow),
            (1, 1, 1, 0, 0)
        );
    }

    #[test]
    fn pending_keeps_only_the_newest_sample_of_an_id() {
        let mut v = view_with(&[1], 10);
        assert_eq!(v.apply_part(&part(12, 0, 1, vec![car(7, 12)])).pending, 1);
        assert_eq!(v.apply_part(&part(11, 0, 1, vec![car(7, 11)])).stale, 1);
        assert_eq!(v.apply_part(&part(13, 0, 1, vec![car(7, 13)])).pending, 1);
        v.apply_message(StreamMessage::CarsAdded(vec![info(7)]));
        assert_eq!(v.cars()[&7].sample.unwrap().x, 13);
        assert_eq!(v.cars()[&7].tick, 13);
        let s = v.samples();
        assert_eq!((s.held, s.adopted, s.expired), (2, 1, 0));
    }

    #[test]
    fn pending_sample_expires_after_pending_ticks() {
        let mut v = view_with(&[1], 10);
        v.apply_part(&part(11, 0, 1, vec![car(7, 11)]));
        v.apply_part(&part(11 + PENDING_TICKS, 0, 1, vec![car(1, 0)]));
        assert_eq!(v.pending(), 1, "still within {PENDING_TICKS} ticks");
        v.apply_part(&part(12 + PENDING_TICKS, 0, 1, vec![car(1, 0)]));
        assert_eq!(v.pending(), 0);
        assert_eq!(v.samples().expired, 1);
        // Its roster event comes too late: the car is added without a sample.
        v.apply_message(StreamMessage::CarsAdded(vec![info(7)]));
        assert_eq!(v.cars()[&7].sample, None);
        // A sample that is already that old when it arrives is not held at all.
        let o = v.apply_part(&part(11, 0, 1, vec![car(8, 11)]));
        assert_eq!((o.pending, o.unknown), (0, 1));
        assert_eq!(v.samples().expired, 2);
    }

    #[test]
    fn pending_set_is_capped_at_max_pending_ids() {
        let mut v = view_with(&[], 10);
        let cars: Vec<CarSample> = (0..MAX_PENDING as u32 + 5).map(|id| car(id, 1)).collect();
        let o = v.apply_part(&part(11, 0, 1, cars));
        assert_eq!((o.pending, o.unknown), (MAX_PENDING, 5));
        assert_eq!(v.samples().overflow, 5);
        assert_eq!(v.pending(), MAX_PENDING);
        // A held id still takes newer samples while the set is full.
        assert_eq!(v.apply_part(&part(12, 0, 1, vec![car(0, 2)])).pending, 1);
    }

    #[test]
    fn parts_before_the_roster_are_held_and_sorted_out_by_roster_and_state() {
        let mut v = FleetView::new();
        // Datagrams overtook the whole initial state: car 2 left before tick 6.
        v.apply_part(&part(5, 0, 1, vec![car(1, 5), car(2, 5)]));
        v.apply_part(&part(7, 0, 1, vec![car(1, 7), car(3, 7)]));
        assert_eq!(v.pending(), 3);
        v.apply_message(StreamMessage::Roster(vec![info(1)]));
        assert_eq!(v.cars()[&1].sample.unwrap().x, 7, "held sample adopted");
        v.apply_message(StreamMessage::State(State {
            tick: 6,
            time_us: 0,
            cars: CarList(vec![car(1, 6)]),
        }));
        assert_eq!(v.cars()[&1].sample.unwrap().x, 7, "the state is older");
        // Car 2's tick-5 sample predates the state it is missing from: it left.
        assert_eq!(v.pending(), 1, "car 3 joined after the state");
        let s = v.samples();
        assert_eq!((s.held, s.adopted, s.removed, s.expired), (4, 1, 1, 0));
        // A late sample no newer than the state, of a car not in it, is dropped at once.
        let o = v.apply_part(&part(6, 0, 1, vec![car(2, 6)]));
        assert_eq!(o.unknown, 1);
        v.apply_message(StreamMessage::CarsAdded(vec![info(3)]));
        assert_eq!(v.cars()[&3].tick, 7);
    }

    #[test]
    fn relabel_keeps_the_sample() {
        let mut v = view_with(&[1], 10);
        v.apply_message(StreamMessage::CarsAdded(vec![CarInfo {
            id: 1,
            label: "renamed".into(),
        }]));
        let one = &v.cars()[&1];
        assert_eq!((one.label.as_str(), one.tick), ("renamed", 10));
        assert!(one.sample.is_some());
    }

    #[test]
    fn roster_replacement_removes_the_cars_it_lacks() {
        let mut v = view_with(&[1, 2], 10);
        v.apply_message(StreamMessage::Roster(vec![info(1), info(3)]));
        assert!(!v.cars().contains_key(&2));
        assert_eq!(v.cars()[&3].sample, None);
        let o = v.apply_part(&part(11, 0, 1, vec![car(2, 1), car(3, 1)]));
        assert_eq!((o.applied, o.unknown), (1, 1));
        assert_eq!(v.samples().removed, 1);
    }

    #[test]
    fn ticks_count_complete_partial_missed() {
        let mut v = view_with(&[1], 10);
        v.apply_part(&part(11, 0, 2, vec![]));
        v.apply_part(&part(11, 1, 2, vec![]));
        v.apply_part(&part(12, 0, 2, vec![])); // partial
                                               // 13 missed
        v.apply_part(&part(14, 1, 2, vec![]));
        v.apply_part(&part(14, 0, 2, vec![]));
        v.finish();
        let c = v.counts();
        assert_eq!(
            (c.received, c.complete, c.partial, c.missed),
            (3, 2, 1, 1),
            "{c:?}"
        );
    }

    #[test]
    fn ticks_counted_as_in_the_protocol_example() {
        // PROTOCOL.md section 7, rule 5.
        let mut v = view_with(&[1], 10);
        for t in [11, 13, 12, 16, 14] {
            v.apply_part(&part(t, 0, 1, vec![]));
        }
        v.finish();
        let c = v.counts();
        assert_eq!(
            (c.received, c.complete, c.missed, c.late_parts),
            (5, 5, 1, 0)
        );
        let mut v = view_with(&[1], 10);
        for t in [11, 13, 15, 12] {
            v.apply_part(&part(t, 0, 1, vec![]));
        }
        assert_eq!(v.counts().late_parts, 1);
    }

    #[test]
    fn ticks_reordered_within_window_still_complete() {
        let mut v = view_with(&[1], 0);
        v.apply_part(&part(2, 0, 1, vec![]));
        v.apply_part(&part(1, 0, 1, vec![]));
        v.apply_part(&part(3, 0, 1, vec![]));
        v.finish();
        let c = v.counts();
        assert_eq!((c.complete, c.missed, c.late_parts), (3, 0, 0));
    }

    #[test]
    fn ticks_late_part_after_window_is_late_not_counted() {
        let mut v = view_with(&[1], 0);
        v.apply_part(&part(10, 0, 1, vec![]));
        v.apply_part(&part(1, 0, 1, vec![]));
        v.finish();
        let c = v.counts();
        assert_eq!(
            (c.received, c.complete, c.missed, c.late_parts),
            (1, 1, 9, 1)
        );
    }

    #[test]
    fn ticks_huge_jump_is_counted_without_looping() {
        let mut v = view_with(&[1], 0);
        v.apply_part(&part(u64::MAX / 2, 0, 1, vec![]));
        v.finish();
        assert_eq!(v.counts().missed, u64::MAX / 2 - 1);
    }

    #[test]
    fn parts_before_state_are_sorted_out_when_it_arrives() {
        let mut v = FleetView::new();
        v.apply_message(StreamMessage::Roster(vec![CarInfo {
            id: 1,
            label: "a".into(),
        }]));
        v.apply_part(&part(5, 0, 1, vec![car(1, 5)]));
        v.apply_part(&part(6, 0, 1, vec![car(1, 6)]));
        v.apply_message(StreamMessage::State(State {
            tick: 5,
            time_us: 0,
            cars: CarList(vec![car(1, 50)]),
        }));
        // The state (tick 5) is older than the tick-6 sample already held.
        assert_eq!(v.cars()[&1].sample.unwrap().x, 6);
        v.finish();
        let c = v.counts();
        assert_eq!((c.received, c.complete, c.late_parts), (1, 1, 1));
        assert_eq!(v.initial_cars(), Some(1));
    }

    #[test]
    fn inconsistent_part_counts_do_not_panic() {
        let mut v = view_with(&[1], 0);
        v.apply_part(&part(1, 0, 2, vec![]));
        v.apply_part(&part(1, 4, 9, vec![]));
        v.apply_part(&part(1, 1, 2, vec![]));
        v.finish();
        assert_eq!(v.counts().complete, 1);
    }
}
