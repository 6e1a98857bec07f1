//! The fleet state: the newest fix of every car, whoever reported it (simulator or publisher).
//!
//! This is the one seam between position sources and the tick loop. Sources write fixes in
//! ([`FleetState::apply`]); the tick loop reads quantised samples and roster changes out
//! ([`FleetState::samples`], [`FleetState::take_changes`]) and never knows who wrote them.
//!
//! Pure: no clock, no sockets. Every time is passed in as microseconds since the Unix epoch.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::proto::quant::{age_step, heading_step, Quantisation, METRES_PER_DEGREE};
use crate::proto::wire::{Bounds, CarInfo, CarSample, StreamMessage};

/// Longest operator id and label, bytes.
pub const MAX_ID_LEN: usize = 64;

/// How far in the future a fix's time may lie (clock skew between publisher and server), µs.
pub const MAX_FUTURE_US: u64 = 5_000_000;

/// The served area: a latitude/longitude box and the quantisation that covers it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Area {
    /// Southern edge, degrees.
    pub south: f64,
    /// Western edge, degrees.
    pub west: f64,
    /// Northern edge, degrees.
    pub north: f64,
    /// Eastern edge, degrees.
    pub east: f64,
    /// How positions inside the box become wire integers (origin = south-west corner).
    pub quant: Quantisation,
}

impl Area {
    /// A square of `side_m` metres whose south-west corner is at `origin_lat`, `origin_lon`.
    pub fn square(origin_lat: f64, origin_lon: f64, side_m: f64) -> Result<Area, String> {
        if !(side_m.is_finite() && side_m >= 1.0) {
            return Err(format!("area side {side_m} m must be at least 1 m"));
        }
        check_lat_lon(origin_lat, origin_lon).map_err(|e| format!("area origin: {e}"))?;
        let scale = lon_scale(origin_lat)?;
        Area::checked(
            origin_lat,
            origin_lon,
            origin_lat + side_m / METRES_PER_DEGREE,
            origin_lon + side_m / scale,
            side_m,
        )
    }

    /// The box `south,west,north,east` (degrees); positions are quantised over the square
    /// that holds it.
    pub fn bbox(south: f64, west: f64, north: f64, east: f64) -> Result<Area, String> {
        check_lat_lon(south, west).map_err(|e| format!("bounding box: {e}"))?;
        check_lat_lon(north, east).map_err(|e| format!("bounding box: {e}"))?;
        if south >= north || west >= east {
            return Err(format!(
                "bounding box {south},{west},{north},{east} must be south,west,north,east with \
                 south < north and west < east (boxes across the antimeridian are not supported)"
            ));
        }
        let height_m = (north - south) * METRES_PER_DEGREE;
        let width_m = (east - west) * lon_scale(south)?;
        Area::checked(south, west, north, east, height_m.max(width_m))
    }

    fn checked(south: f64, west: f64, north: f64, east: f64, side_m: f64) -> Result<Area, String> {
        if north > 90.0 || east > 180.0 {
            return Err(format!(
                "the area reaches {north:.5}, {east:.5}, beyond the globe's edge"
            ));
        }
        Ok(Area {
            south,
            west,
            north,
            east,
            quant: Quantisation::for_area(south, west, side_m),
        })
    }

    /// The box's edges as the `Hello` carries them.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            south: self.south,
            west: self.west,
            north: self.north,
            east: self.east,
        }
    }

    /// Side of the quantised square, metres (what a map should frame).
    pub fn side_m(&self) -> f64 {
        let height_m = (self.north - self.south) * METRES_PER_DEGREE;
        let width_m = (self.east - self.west) * METRES_PER_DEGREE * self.south.to_radians().cos();
        height_m.max(width_m)
    }

    /// Whether a position lies inside the box (edges included).
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        (self.south..=self.north).contains(&lat) && (self.west..=self.east).contains(&lon)
    }

    /// Metres east and north of the origin: the exact inverse of [`Quantisation::to_lat_lon`].
    pub fn to_metres(&self, lat: f64, lon: f64) -> (f64, f64) {
        let q = &self.quant;
        let east =
            (lon - q.origin_lon_deg) * METRES_PER_DEGREE * q.origin_lat_deg.to_radians().cos();
        let north = (lat - q.origin_lat_deg) * METRES_PER_DEGREE;
        (east, north)
    }
}

fn lon_scale(lat: f64) -> Result<f64, String> {
    let scale = METRES_PER_DEGREE * lat.to_radians().cos();
    if scale < 1_000.0 {
        return Err(format!("latitude {lat} is too close to a pole"));
    }
    Ok(scale)
}

fn check_lat_lon(lat: f64, lon: f64) -> Result<(), String> {
    if !(-90.0..=90.0).contains(&lat) {
        return Err(format!("lat {lat} is outside -90..90"));
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(format!("lon {lon} is outside -180..180"));
    }
    Ok(())
}

/// One position report as a publisher sends it (JSON field names are the wire names).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixInput {
    /// The operator's id of the car, 1-64 bytes.
    pub id: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Direction of travel, degrees clockwise from north, 0-360.
    #[serde(default)]
    pub heading_deg: Option<f64>,
    /// Ground speed, m/s, at least 0.
    #[serde(default)]
    pub speed_mps: Option<f64>,
    /// When the fix was taken, RFC 3339 (`2026-11-29T14:00:00.123Z`); missing means "now".
    #[serde(default)]
    pub time: Option<String>,
    /// Human-readable label; defaults to the id.
    #[serde(default)]
    pub label: Option<String>,
}

/// A fix that passed every check that does not depend on the fleet state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fix {
    /// Operator id.
    pub id: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Heading, degrees `[0, 360)`, if the publisher gave one.
    pub heading_deg: Option<f64>,
    /// Speed, m/s, if the publisher gave one.
    pub speed_mps: Option<f64>,
    /// Fix time, µs since the Unix epoch; `None` means the time it is applied.
    pub time_us: Option<u64>,
    /// Label, if given.
    pub label: Option<String>,
}

/// Why a fix was rejected. The message is what the publisher reads.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FixError {
    /// The JSON value does not have the fix's shape (a wrong type, a missing or unknown field).
    #[error("{0}")]
    Shape(String),
    /// A field's value is out of its range.
    #[error("{0}")]
    Invalid(String),
    /// The position lies outside the served area.
    #[error("position {lat}, {lon} is outside the served area (south {south}, west {west}, north {north}, east {east})")]
    OutsideArea {
        lat: f64,
        lon: f64,
        south: f64,
        west: f64,
        north: f64,
        east: f64,
    },
    /// The fix is older than the newest one already held for that car.
    #[error("time {time} is older than the newest fix held for this car ({held})")]
    Older { time: String, held: String },
    /// The fix's time lies too far in the future.
    #[error("time {time} is {ahead_s:.1} s in the future (more than 5 s: is the publisher's clock right?)")]
    Future { time: String, ahead_s: f64 },
    /// The id belongs to a car of another source (the simulator).
    #[error("id {0:?} belongs to the simulator")]
    NotYours(String),
    /// The fleet already holds `--max-cars` cars.
    #[error("the fleet is full ({0} cars); remove cars or raise --max-cars")]
    Full(usize),
}

impl FixInput {
    /// Checks everything that does not depend on the fleet state or the clock.
    pub fn validate(self, area: &Area) -> Result<Fix, FixError> {
        let invalid = |m: String| Err(FixError::Invalid(m));
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN {
            return invalid(format!(
                "id must be 1-{MAX_ID_LEN} bytes (got {})",
                self.id.len()
            ));
        }
        if let Err(e) = check_lat_lon(self.lat, self.lon) {
            return invalid(e);
        }
        if !area.contains(self.lat, self.lon) {
            return Err(FixError::OutsideArea {
                lat: self.lat,
                lon: self.lon,
                south: area.south,
                west: area.west,
                north: area.north,
                east: area.east,
            });
        }
        if let Some(h) = self.heading_deg {
            if !(0.0..=360.0).contains(&h) {
                return invalid(format!("heading_deg {h} is outside 0-360"));
            }
        }
        if let Some(s) = self.speed_mps {
            if s < 0.0 {
                return invalid(format!("speed_mps {s} is negative"));
            }
        }
        if let Some(label) = &self.label {
            if label.len() > MAX_ID_LEN {
                return invalid(format!(
                    "label must be at most {MAX_ID_LEN} bytes (got {})",
                    label.len()
                ));
            }
        }
        let time_us = match &self.time {
            None => None,
            Some(t) => Some(parse_time(t).map_err(FixError::Invalid)?),
        };
        Ok(Fix {
            id: self.id,
            lat: self.lat,
            lon: self.lon,
            heading_deg: self.heading_deg.map(|h| h.rem_euclid(360.0)),
            speed_mps: self.speed_mps,
            time_us,
            label: self.label.filter(|l| !l.is_empty()),
        })
    }
}

/// Parses one JSON value as a fix and validates it against `area`.
pub fn fix_from_json(value: serde_json::Value, area: &Area) -> Result<Fix, FixError> {
    let input: FixInput = serde_json::from_value(value).map_err(|e| {
        // serde_json appends " at line 0 column 0" to errors from a Value: drop it.
        let msg = e.to_string();
        FixError::Shape(
            msg.strip_suffix(" at line 0 column 0")
                .unwrap_or(&msg)
                .to_string(),
        )
    })?;
    input.validate(area)
}

/// RFC 3339 text to µs since the Unix epoch.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("time {text:?} is not RFC 3339 (like 2026-11-29T14:00:00.123Z): {e}")
        })?;
    let us = t.unix_timestamp_nanos() / 1_000;
    u64::try_from(us).map_err(|_| format!("time {text:?} is before 1970"))
}

/// µs since the Unix epoch to RFC 3339 text in UTC (as many fraction digits as needed).
pub fn format_time(us: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| us.to_string())
}

/// Who reports a car.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The built-in simulator.
    Simulator,
    /// A publisher, over HTTP or the streaming endpoint.
    Publisher,
}

/// A car as the fleet state holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Car {
    /// The operator's id.
    pub id: String,
    /// The id on the wire.
    pub wire_id: u32,
    /// Label shown to viewers.
    pub label: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Heading, degrees: as given, else derived from the last two fixes, else the last known.
    pub heading_deg: f64,
    /// Speed, m/s: as given, else derived from the last two fixes.
    pub speed_mps: f64,
    /// When the fix was taken, µs.
    pub fix_time_us: u64,
    /// When the server last received a fix for this car, µs.
    pub last_heard_us: u64,
    /// Who reports it.
    pub source: Source,
}

/// A change to the roster, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    Added(CarInfo),
    Removed(u32),
}

/// Everything a [`FleetState`] must carry over to another process to continue it exactly:
/// the same wire ids, the same roster version, the same next wire id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetCheckpoint {
    /// Every car, by ascending wire id.
    pub cars: Vec<Car>,
    /// The wire id the next new car gets.
    pub next_wire_id: u32,
    /// The roster version the cars are at.
    pub roster_version: u64,
}

/// Every car's newest fix, keyed by wire id (ascending, as the wire wants them).
#[derive(Debug, Clone)]
pub struct FleetState {
    area: Area,
    max_cars: usize,
    cars: BTreeMap<u32, Car>,
    by_id: HashMap<String, u32>,
    /// Cars whose source is [`Source::Publisher`] (the ones `max_cars` limits).
    published: usize,
    next_wire_id: u32,
    changes: Vec<Change>,
    roster_version: u64,
}

impl FleetState {
    /// An empty fleet in `area`, holding at most `max_cars` publishers' cars (the simulator's
    /// are not limited: their number is an option of their own).
    pub fn new(area: Area, max_cars: usize) -> Self {
        Self {
            area,
            max_cars,
            cars: BTreeMap::new(),
            by_id: HashMap::new(),
            published: 0,
            next_wire_id: 0,
            changes: Vec::new(),
            roster_version: 0,
        }
    }

    /// The state to continue from elsewhere (see [`FleetState::restore`]). Pending roster
    /// changes are not part of it: take them first.
    pub fn checkpoint(&self) -> FleetCheckpoint {
        FleetCheckpoint {
            cars: self.cars.values().cloned().collect(),
            next_wire_id: self.next_wire_id,
            roster_version: self.roster_version,
        }
    }

    /// A fleet that continues `checkpoint`: same cars, wire ids and roster version, no pending
    /// changes. A car listed twice keeps its last entry.
    pub fn restore(area: Area, max_cars: usize, checkpoint: FleetCheckpoint) -> Self {
        let mut fleet = FleetState::new(area, max_cars);
        for car in checkpoint.cars {
            if let Some(old) = fleet.by_id.insert(car.id.clone(), car.wire_id) {
                if let Some(gone) = fleet.cars.remove(&old) {
                    if gone.source == Source::Publisher {
                        fleet.published -= 1;
                    }
                }
            }
            if car.source == Source::Publisher {
                fleet.published += 1;
            }
            fleet.next_wire_id = fleet.next_wire_id.max(car.wire_id.wrapping_add(1));
            fleet.cars.insert(car.wire_id, car);
        }
        fleet.next_wire_id = fleet.next_wire_id.max(checkpoint.next_wire_id);
        fleet.roster_version = checkpoint.roster_version;
        fleet
    }

    /// The served area.
    pub fn area(&self) -> &Area {
        &self.area
    }

    /// Number of cars.
    pub fn len(&self) -> usize {
        self.cars.len()
    }

    /// True when no car is held.
    pub fn is_empty(&self) -> bool {
        self.cars.is_empty()
    }

    /// Every car, by ascending wire id.
    pub fn cars(&self) -> impl Iterator<Item = &Car> {
        self.cars.values()
    }

    /// The car with operator id `id`.
    pub fn car(&self, id: &str) -> Option<&Car> {
        self.by_id.get(id).and_then(|w| self.cars.get(w))
    }

    /// Increases whenever a car joins, leaves or is relabelled.
    pub fn roster_version(&self) -> u64 {
        self.roster_version
    }

    /// Applies a validated fix from `source`, received at `now_us`; a new id joins the roster.
    pub fn apply(&mut self, fix: Fix, source: Source, now_us: u64) -> Result<(), FixError> {
        let time_us = fix.time_us.unwrap_or(now_us);
        if time_us > now_us.saturating_add(MAX_FUTURE_US) {
            return Err(FixError::Future {
                time: format_time(time_us),
                ahead_s: (time_us - now_us) as f64 / 1e6,
            });
        }
        if let Some(&wire_id) = self.by_id.get(&fix.id) {
            let area = self.area;
            // Invariant: `by_id` and `cars` always hold the same cars.
            let car = self.cars.get_mut(&wire_id).expect("by_id matches cars");
            if car.source != source {
                return Err(FixError::NotYours(fix.id));
            }
            if time_us < car.fix_time_us {
                return Err(FixError::Older {
                    time: format_time(time_us),
                    held: format_time(car.fix_time_us),
                });
            }
            let (e0, n0) = area.to_metres(car.lat, car.lon);
            let (e1, n1) = area.to_metres(fix.lat, fix.lon);
            let (de, dn) = (e1 - e0, n1 - n0);
            let moved = (de * de + dn * dn).sqrt();
            let dt_s = (time_us - car.fix_time_us) as f64 / 1e6;
            car.heading_deg = match fix.heading_deg {
                Some(h) => h,
                // Derived from the movement when it is clearly more than GPS jitter.
                None if moved >= 1.0 => de.atan2(dn).to_degrees().rem_euclid(360.0),
                None => car.heading_deg,
            };
            car.speed_mps = match fix.speed_mps {
                Some(s) => s,
                None if dt_s > 0.0 => moved / dt_s,
                None => car.speed_mps,
            };
            car.lat = fix.lat;
            car.lon = fix.lon;
            car.fix_time_us = time_us;
            car.last_heard_us = now_us;
            if let Some(label) = fix.label {
                if label != car.label {
                    car.label = label;
                    let info = CarInfo {
                        id: wire_id,
                        label: car.label.clone(),
                    };
                    self.record(Change::Added(info));
                }
            }
            return Ok(());
        }
        if source == Source::Publisher {
            if self.published >= self.max_cars {
                return Err(FixError::Full(self.max_cars));
            }
            self.published += 1;
        }
        let wire_id = self.next_wire_id;
        // Wire ids are never reused within a process, so no client can mistake a new car for
        // an old one; 2^32 joins outlast any deployment.
        self.next_wire_id = self.next_wire_id.wrapping_add(1);
        let label = fix.label.unwrap_or_else(|| fix.id.clone());
        self.record(Change::Added(CarInfo {
            id: wire_id,
            label: label.clone(),
        }));
        self.by_id.insert(fix.id.clone(), wire_id);
        self.cars.insert(
            wire_id,
            Car {
                id: fix.id,
                wire_id,
                label,
                lat: fix.lat,
                lon: fix.lon,
                heading_deg: fix.heading_deg.unwrap_or(0.0),
                speed_mps: fix.speed_mps.unwrap_or(0.0),
                fix_time_us: time_us,
                last_heard_us: now_us,
                source,
            },
        );
        Ok(())
    }

    /// Removes the car with operator id `id`; returns its wire id if it was there.
    pub fn remove(&mut self, id: &str) -> Option<u32> {
        let wire_id = self.by_id.remove(id)?;
        if self.cars.remove(&wire_id).map(|c| c.source) == Some(Source::Publisher) {
            self.published -= 1;
        }
        self.record(Change::Removed(wire_id));
        Some(wire_id)
    }

    /// Removes the publishers' cars not heard from for `timeout_us`; returns how many.
    pub fn expire(&mut self, now_us: u64, timeout_us: u64) -> usize {
        let stale: Vec<String> = self
            .cars
            .values()
            .filter(|c| {
                c.source == Source::Publisher
                    && now_us.saturating_sub(c.last_heard_us) >= timeout_us
            })
            .map(|c| c.id.clone())
            .collect();
        for id in &stale {
            self.remove(id);
        }
        stale.len()
    }

    fn record(&mut self, change: Change) {
        self.changes.push(change);
        self.roster_version += 1;
    }

    /// The roster version before the changes [`FleetState::take_changes`] would return: every
    /// change moves the version on by one.
    pub fn version_before_changes(&self) -> u64 {
        self.roster_version - self.changes.len() as u64
    }

    /// The roster changes since the last call, as stream messages in the order they happened
    /// (consecutive changes of one kind share a message).
    pub fn take_changes(&mut self) -> Vec<StreamMessage> {
        let mut out: Vec<StreamMessage> = Vec::new();
        for change in self.changes.drain(..) {
            match (change, out.last_mut()) {
                (Change::Added(info), Some(StreamMessage::CarsAdded(list))) => list.push(info),
                (Change::Removed(id), Some(StreamMessage::CarsRemoved(list))) => list.push(id),
                (Change::Added(info), _) => out.push(StreamMessage::CarsAdded(vec![info])),
                (Change::Removed(id), _) => out.push(StreamMessage::CarsRemoved(vec![id])),
            }
        }
        out
    }

    /// The whole roster, by ascending wire id.
    pub fn roster(&self) -> Vec<CarInfo> {
        self.cars
            .values()
            .map(|c| CarInfo {
                id: c.wire_id,
                label: c.label.clone(),
            })
            .collect()
    }

    /// Every car quantised for a tick at `tick_us`, by ascending wire id; `age` is the time
    /// from the car's own fix to the tick.
    pub fn samples(&self, tick_us: u64) -> Vec<CarSample> {
        let q = &self.area.quant;
        self.cars
            .values()
            .map(|c| {
                let (east, north) = self.area.to_metres(c.lat, c.lon);
                CarSample {
                    id: c.wire_id,
                    x: q.position_step(east),
                    y: q.position_step(north),
                    heading: heading_step(c.heading_deg),
                    speed: q.speed_step(c.speed_mps),
                    age: age_step(tick_us.saturating_sub(c.fix_time_us)),
                }
            })
            .collect()
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "south {:.6}, west {:.6}, north {:.6}, east {:.6} ({:.0} m square, {} m steps)",
            self.south,
            self.west,
            self.north,
            self.east,
            self.side_m(),
            self.quant.unit_m
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_764_424_800_000_000; // 2025-11-29T14:00:00Z

    fn area() -> Area {
        Area::square(52.35, 4.86, 4000.0).unwrap()
    }

    fn fix(id: &str, lat: f64, lon: f64, time_us: Option<u64>) -> Fix {
        Fix {
            id: id.into(),
            lat,
            lon,
            heading_deg: None,
            speed_mps: None,
            time_us,
            label: None,
        }
    }

    fn json_fix(v: serde_json::Value) -> Result<Fix, FixError> {
        fix_from_json(v, &area())
    }

    #[test]
    fn area_square_round_trips_positions_within_half_a_step() {
        let a = area();
        assert!(a.contains(52.36, 4.87));
        assert!(!a.contains(52.34, 4.87));
        let (e, n) = a.to_metres(52.36, 4.87);
        let (lat, lon) = a.quant.to_lat_lon(e, n);
        assert!((lat - 52.36).abs() < 1e-12 && (lon - 4.87).abs() < 1e-12);
        assert!((a.side_m() - 4000.0).abs() < 1e-6);
    }

    #[test]
    fn area_bbox_quantises_over_its_longer_side() {
        let a = Area::bbox(52.0, 4.0, 52.1, 4.5).unwrap();
        assert!(a.side_m() > 30_000.0);
        assert!(a.quant.extent_m() >= a.side_m());
        assert!(Area::bbox(52.1, 4.0, 52.0, 4.5).is_err());
        assert!(Area::bbox(52.0, 179.0, 52.1, -179.0).is_err());
        assert!(Area::bbox(89.99, 4.0, 90.0, 4.5).is_err());
        assert!(Area::square(52.0, 4.0, 0.0).is_err());
    }

    #[test]
    fn fix_json_reports_type_missing_and_unknown_fields() {
        let e = json_fix(serde_json::json!({"id": "a", "lat": "52.36", "lon": 4.87})).unwrap_err();
        assert!(e.to_string().contains("invalid type: string"), "{e}");
        let e = json_fix(serde_json::json!({"id": "a", "lon": 4.87})).unwrap_err();
        assert_eq!(e.to_string(), "missing field `lat`");
        let e = json_fix(serde_json::json!({"id": "a", "lat": 52.36, "lon": 4.87, "heading": 3}))
            .unwrap_err();
        assert!(e.to_string().starts_with("unknown field `heading`"), "{e}");
        let e = json_fix(serde_json::json!({"id": 7, "lat": 52.36, "lon": 4.87})).unwrap_err();
        assert!(e.to_string().contains("expected a string"), "{e}");
    }

    #[test]
    fn fix_validate_rejects_each_out_of_range_field() {
        let base = serde_json::json!({"id": "a", "lat": 52.36, "lon": 4.87});
        let with = |k: &str, v: serde_json::Value| {
            let mut o = base.clone();
            o[k] = v;
            json_fix(o).unwrap_err().to_string()
        };
        assert!(with("lat", 95.0.into()).contains("lat 95 is outside -90..90"));
        assert!(with("lon", (-181.0).into()).contains("lon -181 is outside"));
        assert!(with("lat", 52.0.into()).contains("outside the served area"));
        assert!(with("heading_deg", 361.0.into()).contains("outside 0-360"));
        assert!(with("heading_deg", (-1.0).into()).contains("outside 0-360"));
        assert!(with("speed_mps", (-0.5).into()).contains("negative"));
        assert!(with("id", "".into()).contains("1-64 bytes"));
        assert!(with("id", "x".repeat(65).into()).contains("1-64 bytes"));
        assert!(with("label", "x".repeat(65).into()).contains("at most 64"));
        assert!(with("time", "yesterday".into()).contains("not RFC 3339"));
        let ok = json_fix(serde_json::json!({"id": "a", "lat": 52.36, "lon": 4.87,
            "heading_deg": 360.0, "time": "2026-11-29T14:00:00.123Z"}))
        .unwrap();
        assert_eq!(ok.heading_deg, Some(0.0));
        assert_eq!(
            ok.time_us,
            Some(parse_time("2026-11-29T14:00:00.123Z").unwrap())
        );
    }

    #[test]
    fn time_parse_and_format_round_trip_to_the_microsecond() {
        let us = parse_time("2026-11-29T14:00:00.123+01:00").unwrap();
        assert_eq!(format_time(us), "2026-11-29T13:00:00.123Z");
        assert_eq!(format_time(us + 4), "2026-11-29T13:00:00.123004Z");
        assert_eq!(parse_time(&format_time(us + 4)), Ok(us + 4));
        assert!(parse_time("1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn apply_new_id_joins_with_dense_wire_ids_and_label_defaulting_to_id() {
        let mut f = FleetState::new(area(), 10);
        f.apply(fix("truck-17", 52.36, 4.87, None), Source::Publisher, T0)
            .unwrap();
        let mut labelled = fix("van-2", 52.37, 4.88, None);
        labelled.label = Some("Van 2".into());
        f.apply(labelled, Source::Publisher, T0).unwrap();
        assert_eq!(
            f.take_changes(),
            vec![StreamMessage::CarsAdded(vec![
                CarInfo {
                    id: 0,
                    label: "truck-17".into()
                },
                CarInfo {
                    id: 1,
                    label: "Van 2".into()
                },
            ])]
        );
        assert!(f.take_changes().is_empty(), "changes are taken once");
        assert_eq!(
            f.car("van-2").unwrap().fix_time_us,
            T0,
            "missing time means now"
        );
    }

    #[test]
    fn apply_rejects_older_and_future_fixes_and_keeps_the_held_one() {
        let mut f = FleetState::new(area(), 10);
        f.apply(fix("a", 52.36, 4.87, Some(T0)), Source::Publisher, T0)
            .unwrap();
        let e = f
            .apply(fix("a", 52.37, 4.87, Some(T0 - 1)), Source::Publisher, T0)
            .unwrap_err();
        assert!(matches!(e, FixError::Older { .. }), "{e}");
        let e = f
            .apply(
                fix("a", 52.37, 4.87, Some(T0 + 5_000_001)),
                Source::Publisher,
                T0,
            )
            .unwrap_err();
        assert!(e.to_string().contains("in the future"), "{e}");
        assert_eq!(f.car("a").unwrap().lat, 52.36);
        // The same time again is a repeat, not older: accepted.
        f.apply(fix("a", 52.36, 4.87, Some(T0)), Source::Publisher, T0)
            .unwrap();
        f.apply(
            fix("a", 52.36, 4.87, Some(T0 + 5_000_000)),
            Source::Publisher,
            T0,
        )
        .unwrap();
    }

    #[test]
    fn apply_derives_heading_and_speed_when_missing() {
        let mut f = FleetState::new(area(), 10);
        f.apply(fix("a", 52.36, 4.87, Some(T0)), Source::Publisher, T0)
            .unwrap();
        // 10 m east in 1 s.
        let lon = 4.87 + 10.0 / (METRES_PER_DEGREE * 52.35f64.to_radians().cos());
        f.apply(
            fix("a", 52.36, lon, Some(T0 + 1_000_000)),
            Source::Publisher,
            T0,
        )
        .unwrap();
        let car = f.car("a").unwrap();
        assert!((car.heading_deg - 90.0).abs() < 1e-6, "{}", car.heading_deg);
        assert!((car.speed_mps - 10.0).abs() < 1e-6, "{}", car.speed_mps);
    }

    #[test]
    fn apply_refuses_other_sources_ids_and_a_full_fleet() {
        let mut f = FleetState::new(area(), 1);
        f.apply(fix("FC-0001", 52.36, 4.87, None), Source::Simulator, T0)
            .unwrap();
        f.apply(fix("FC-0002", 52.36, 4.87, None), Source::Simulator, T0)
            .unwrap();
        f.apply(fix("a", 52.36, 4.87, None), Source::Publisher, T0)
            .unwrap();
        let e = f
            .apply(fix("FC-0001", 52.36, 4.87, None), Source::Publisher, T0)
            .unwrap_err();
        assert_eq!(e, FixError::NotYours("FC-0001".into()));
        let e = f
            .apply(fix("b", 52.36, 4.87, None), Source::Publisher, T0)
            .unwrap_err();
        assert_eq!(e, FixError::Full(1));
    }

    #[test]
    fn remove_and_expire_emit_removals_in_order_and_never_reuse_ids() {
        let mut f = FleetState::new(area(), 10);
        f.apply(fix("a", 52.36, 4.87, None), Source::Publisher, T0)
            .unwrap();
        f.apply(
            fix("b", 52.36, 4.87, None),
            Source::Publisher,
            T0 + 2_000_000,
        )
        .unwrap();
        f.apply(fix("sim", 52.36, 4.87, None), Source::Simulator, T0)
            .unwrap();
        f.take_changes();
        assert_eq!(f.remove("nope"), None);
        assert_eq!(f.expire(T0 + 3_000_000, 3_000_000), 1, "only a is stale");
        assert_eq!(f.remove("b"), Some(1));
        f.apply(
            fix("a", 52.36, 4.87, None),
            Source::Publisher,
            T0 + 4_000_000,
        )
        .unwrap();
        assert_eq!(
            f.take_changes(),
            vec![
                StreamMessage::CarsRemoved(vec![0, 1]),
                StreamMessage::CarsAdded(vec![CarInfo {
                    id: 3,
                    label: "a".into()
                }]),
            ]
        );
        assert_eq!(f.len(), 2, "the simulator's car never expires");
    }

    #[test]
    fn samples_carry_position_steps_and_fix_age() {
        let a = area();
        let mut f = FleetState::new(a, 10);
        let (lat, lon) = a.quant.to_lat_lon(700.0, 1400.0);
        let mut x = fix("a", lat, lon, Some(T0));
        x.heading_deg = Some(90.0);
        x.speed_mps = Some(11.0);
        f.apply(x, Source::Publisher, T0).unwrap();
        let s = f.samples(T0 + 2_350_000);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].x, s[0].y), (10_000, 20_000));
        assert_eq!((s[0].heading, s[0].speed, s[0].age), (64, 44, 23));
    }

    #[test]
    fn restore_continues_wire_ids_roster_version_and_limits() {
        let a = area();
        let (lat, lon) = a.quant.to_lat_lon(100.0, 100.0);
        let mut f = FleetState::new(a, 2);
        f.apply(fix("a", lat, lon, Some(T0)), Source::Publisher, T0)
            .unwrap();
        f.apply(fix("b", lat, lon, Some(T0)), Source::Publisher, T0)
            .unwrap();
        f.remove("b");
        f.take_changes();
        let saved = f.checkpoint();
        // Through the bytes another node would read.
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let back: FleetCheckpoint = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, saved);
        let mut g = FleetState::restore(a, 2, back);
        assert_eq!(g.roster_version(), f.roster_version());
        assert_eq!(g.roster(), f.roster());
        assert!(
            g.take_changes().is_empty(),
            "a restored fleet has no pending changes"
        );
        // "b" left with wire id 1: a new car must not get it again.
        g.apply(fix("c", lat, lon, Some(T0)), Source::Publisher, T0)
            .unwrap();
        assert_eq!(g.car("c").unwrap().wire_id, 2);
        // The publishers' limit counts restored cars.
        let e = g
            .apply(fix("d", lat, lon, Some(T0)), Source::Publisher, T0)
            .unwrap_err();
        assert_eq!(e, FixError::Full(2));
        // Older fixes are still refused against the restored time.
        let e = g
            .apply(fix("a", lat, lon, Some(T0 - 1)), Source::Publisher, T0)
            .unwrap_err();
        assert!(matches!(e, FixError::Older { .. }), "{e:?}");
    }
}
