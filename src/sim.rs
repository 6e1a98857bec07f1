//! The built-in position feed: cars driving continuously on a small grid road network.
//!
//! Pure and deterministic for a seed: the caller advances it with [`Simulator::step`] and a time
//! step, so tests can run it without a clock. Cars accelerate and brake smoothly, slow down for
//! turns at intersections and never jump.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::proto::quant::Motion;

/// Simulator parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of cars.
    pub cars: u32,
    /// Side of the square area, metres. Roads stay inside it.
    pub area_m: f64,
    /// Distance between parallel streets, metres.
    pub block_m: f64,
    /// Seed for the random choices (start positions, speeds, turns).
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            cars: 100,
            area_m: 4000.0,
            block_m: 400.0,
            seed: 1,
        }
    }
}

/// A road segment between two intersections, in metres east/north of the area origin.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Road {
    /// Start, `[east, north]`.
    pub a: [f64; 2],
    /// End, `[east, north]`.
    pub b: [f64; 2],
    /// Speed limit, m/s.
    pub limit_mps: f64,
}

#[derive(Debug, Clone)]
struct Node {
    pos: [f64; 2],
    /// (neighbour node, speed limit of the road)
    links: Vec<(usize, f64)>,
}

#[derive(Debug, Clone)]
struct Car {
    id: u32,
    label: String,
    from: usize,
    to: usize,
    along_m: f64,
    speed_mps: f64,
    limit_mps: f64,
    /// Personal factor on the speed limit, so cars do not move in lockstep.
    temper: f64,
}

/// Speed cars slow to before turning at an intersection, m/s.
const TURN_SPEED: f64 = 4.0;
const ACCEL: f64 = 2.0;
const BRAKE: f64 = 3.0;
const MAX_SUBSTEP_S: f64 = 0.1;

/// The simulated fleet.
#[derive(Debug, Clone)]
pub struct Simulator {
    nodes: Vec<Node>,
    cars: Vec<Car>,
    rng: SmallRng,
}

impl Simulator {
    /// Builds the road grid and places the cars at random on it.
    pub fn new(config: &SimConfig) -> Self {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let block = config.block_m.max(50.0);
        let margin = block / 2.0;
        let n = (((config.area_m - 2.0 * margin) / block).floor() as usize + 1).max(2);
        let mut nodes: Vec<Node> = Vec::with_capacity(n * n);
        for row in 0..n {
            for col in 0..n {
                nodes.push(Node {
                    pos: [margin + col as f64 * block, margin + row as f64 * block],
                    links: Vec::new(),
                });
            }
        }
        // Every third street is an avenue with a higher limit.
        let limit = |line: usize| if line.is_multiple_of(3) { 16.0 } else { 11.0 };
        for row in 0..n {
            for col in 0..n {
                let i = row * n + col;
                if col + 1 < n {
                    nodes[i].links.push((i + 1, limit(row)));
                    nodes[i + 1].links.push((i, limit(row)));
                }
                if row + 1 < n {
                    nodes[i].links.push((i + n, limit(col)));
                    nodes[i + n].links.push((i, limit(col)));
                }
            }
        }
        let cars = (0..config.cars)
            .map(|id| {
                let from = rng.random_range(0..nodes.len());
                let (to, limit_mps) =
                    nodes[from].links[rng.random_range(0..nodes[from].links.len())];
                let temper = rng.random_range(0.8..1.05);
                let len = dist(nodes[from].pos, nodes[to].pos);
                Car {
                    id,
                    label: format!("FC-{:04}", id + 1),
                    from,
                    to,
                    along_m: rng.random_range(0.0..len),
                    speed_mps: limit_mps * temper * rng.random_range(0.3..1.0),
                    limit_mps,
                    temper,
                }
            })
            .collect();
        Self { nodes, cars, rng }
    }

    /// Every car's id and label.
    pub fn roster(&self) -> Vec<(u32, String)> {
        self.cars.iter().map(|c| (c.id, c.label.clone())).collect()
    }

    /// Retires the longest-serving car and puts a new one on the road.
    ///
    /// Returns the retired car's label and the new car's label (labels are unique, so they
    /// serve as the cars' ids in the fleet state), or `None` when there are no cars.
    pub fn churn(&mut self) -> Option<(String, String)> {
        let next_id = self.cars.iter().map(|c| c.id).max()? + 1;
        let mut car = self.cars.remove(0);
        let gone = std::mem::take(&mut car.label);
        car.id = next_id;
        car.label = format!("FC-{:04}", next_id + 1);
        let joined = car.label.clone();
        self.cars.push(car);
        Some((gone, joined))
    }

    /// The road network, each road once.
    pub fn roads(&self) -> Vec<Road> {
        let mut roads = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for &(j, limit_mps) in &node.links {
                if i < j {
                    roads.push(Road {
                        a: node.pos,
                        b: self.nodes[j].pos,
                        limit_mps,
                    });
                }
            }
        }
        roads
    }

    /// Advances every car by `dt_s` seconds (in sub-steps of at most 100 ms).
    pub fn step(&mut self, dt_s: f64) {
        let mut left = dt_s.max(0.0);
        while left > 0.0 {
            let dt = left.min(MAX_SUBSTEP_S);
            left -= dt;
            for i in 0..self.cars.len() {
                self.step_car(i, dt);
            }
        }
    }

    fn step_car(&mut self, i: usize, dt: f64) {
        let car = &self.cars[i];
        let len = dist(self.nodes[car.from].pos, self.nodes[car.to].pos);
        let remaining = len - car.along_m;
        let cruise = car.limit_mps * car.temper;
        // Slow down for the coming turn: v^2 = v_turn^2 + 2 * brake * distance.
        let approach = (TURN_SPEED * TURN_SPEED + 2.0 * BRAKE * remaining).sqrt();
        let target = cruise.min(approach);
        let speed = if car.speed_mps < target {
            (car.speed_mps + ACCEL * dt).min(target)
        } else {
            (car.speed_mps - BRAKE * dt).max(target)
        };
        let mut along = car.along_m + speed * dt;
        let (mut from, mut to, mut limit) = (car.from, car.to, car.limit_mps);
        let mut len = len;
        while along >= len {
            along -= len;
            let links = &self.nodes[to].links;
            let choices: Vec<(usize, f64)> =
                links.iter().copied().filter(|&(n, _)| n != from).collect();
            let next = if choices.is_empty() {
                links[0]
            } else {
                choices[self.rng.random_range(0..choices.len())]
            };
            from = to;
            (to, limit) = next;
            len = dist(self.nodes[from].pos, self.nodes[to].pos);
        }
        let car = &mut self.cars[i];
        car.speed_mps = speed;
        car.along_m = along;
        (car.from, car.to, car.limit_mps) = (from, to, limit);
    }

    /// Every car's label (its id in the fleet state) and current motion.
    pub fn labelled_motions(&self) -> Vec<(&str, Motion)> {
        self.cars
            .iter()
            .map(|car| (car.label.as_str(), self.motion(car)))
            .collect()
    }

    /// Every car's current motion, by id.
    pub fn motions(&self) -> Vec<(u32, Motion)> {
        self.cars
            .iter()
            .map(|car| (car.id, self.motion(car)))
            .collect()
    }

    fn motion(&self, car: &Car) -> Motion {
        let a = self.nodes[car.from].pos;
        let b = self.nodes[car.to].pos;
        let len = dist(a, b);
        let t = if len > 0.0 { car.along_m / len } else { 0.0 };
        Motion {
            east_m: a[0] + (b[0] - a[0]) * t,
            north_m: a[1] + (b[1] - a[1]) * t,
            heading_deg: (b[0] - a[0])
                .atan2(b[1] - a[1])
                .to_degrees()
                .rem_euclid(360.0),
            speed_mps: car.speed_mps,
        }
    }
}

fn dist(a: [f64; 2], b: [f64; 2]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_cars_move_continuously_at_plausible_speeds() {
        let config = SimConfig::default();
        let mut sim = Simulator::new(&config);
        let mut prev = sim.motions();
        for _ in 0..120 {
            sim.step(1.0);
            let now = sim.motions();
            for ((id, a), (id2, b)) in prev.iter().zip(&now) {
                assert_eq!(id, id2);
                let moved =
                    ((a.east_m - b.east_m).powi(2) + (a.north_m - b.north_m).powi(2)).sqrt();
                // Never faster than the top limit for one second (plus a turn's geometry).
                assert!(moved <= 17.0, "car {id} jumped {moved} m");
                assert!(b.speed_mps >= 0.0 && b.speed_mps <= 17.0);
                assert!(b.east_m >= 0.0 && b.east_m <= config.area_m);
                assert!(b.north_m >= 0.0 && b.north_m <= config.area_m);
            }
            prev = now;
        }
        let moving = prev.iter().filter(|(_, m)| m.speed_mps > 1.0).count();
        assert!(moving > 50, "only {moving} cars moving");
    }

    #[test]
    fn sim_is_deterministic_for_a_seed() {
        let mut a = Simulator::new(&SimConfig::default());
        let mut b = Simulator::new(&SimConfig::default());
        a.step(10.0);
        b.step(10.0);
        assert_eq!(a.motions(), b.motions());
        assert_eq!(a.roster().len(), 100);
        assert!(!a.roads().is_empty());
    }

    #[test]
    fn sim_churn_replaces_the_oldest_car_with_a_new_id() {
        let mut sim = Simulator::new(&SimConfig::default());
        let (gone, joined) = sim.churn().unwrap();
        assert_eq!((gone.as_str(), joined.as_str()), ("FC-0001", "FC-0101"));
        let ids: Vec<u32> = sim.roster().iter().map(|(id, _)| *id).collect();
        assert!(!ids.contains(&0) && ids.contains(&100));
        assert_eq!(ids.len(), 100);
        let mut empty = Simulator::new(&SimConfig {
            cars: 0,
            ..SimConfig::default()
        });
        assert_eq!(empty.churn(), None, "no car to retire");
    }
}
