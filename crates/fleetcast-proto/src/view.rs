//! The client's view of the fleet: applies the reliable stream and datagram parts, newest wins.
//!
//! Rules (PROTOCOL.md, "Applying updates"):
//! - a car's sample is replaced only by a sample from a strictly newer tick; duplicates,
//!   reordered and stale parts change nothing;
//! - only cars on the roster are drawn: datagram entries for unknown ids are ignored, so a car
//!   removed on the stream is never resurrected by a late datagram;
//! - tick accounting starts after the tick of the first `State`: each later tick is counted once
//!   as complete (all parts), partial (some parts) or missed (none), when it falls out of the
//!   reorder window or when the session ends.

use std::collections::{BTreeMap, HashMap};

use super::wire::{CarInfo, CarSample, Hello, State, StreamMessage, TickPart};

/// Ticks a part may arrive late and still count towards its tick.
pub const REORDER_WINDOW: u64 = 3;

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
    /// Cars skipped because the view already held the same or a newer tick.
    pub stale: usize,
    /// Cars skipped because their id is not on the roster.
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

    /// Applies one message from the reliable stream.
    pub fn apply_message(&mut self, msg: StreamMessage) {
        match msg {
            StreamMessage::Hello(hello) => self.hello = Some(hello),
            StreamMessage::Roster(roster) => {
                let keep: HashMap<u32, String> =
                    roster.into_iter().map(|c| (c.id, c.label)).collect();
                self.cars.retain(|id, _| keep.contains_key(id));
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
                    self.cars.remove(&id);
                }
            }
            StreamMessage::State(state) => self.apply_state(state),
            StreamMessage::Goodbye { .. } => {}
        }
    }

    fn add_car(&mut self, info: CarInfo) {
        self.cars
            .entry(info.id)
            .and_modify(|e| e.label.clone_from(&info.label))
            .or_insert(CarEntry {
                label: info.label,
                sample: None,
                tick: 0,
                time_us: 0,
            });
    }

    fn apply_state(&mut self, state: State) {
        if self.initial_cars.is_none() {
            self.initial_cars = Some(state.cars.0.len());
        }
        self.apply_cars(state.tick, state.time_us, &state.cars.0);
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
        let mut outcome = PartOutcome::default();
        for car in cars {
            match self.cars.get_mut(&car.id) {
                None => outcome.unknown += 1,
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

    #[test]
    fn apply_ignores_unknown_and_removed_cars() {
        let mut v = view_with(&[1, 2], 10);
        v.apply_message(StreamMessage::CarsRemoved(vec![2]));
        let o = v.apply_part(&part(11, 0, 1, vec![car(1, 1), car(2, 1), car(3, 1)]));
        assert_eq!((o.applied, o.unknown), (1, 2));
        assert!(!v.cars().contains_key(&2));
        v.apply_message(StreamMessage::CarsAdded(vec![CarInfo {
            id: 3,
            label: "new".into(),
        }]));
        assert_eq!(v.apply_part(&part(12, 0, 1, vec![car(3, 5)])).applied, 1);
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
