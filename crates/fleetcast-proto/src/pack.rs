//! Splitting one tick into self-contained datagrams that each fit a size budget.
//!
//! Every part carries the tick number, the tick time and `part`/`parts`, so a lost datagram only
//! loses its own cars for that tick. Parts are filled greedily in id order.

use super::wire::{self, CarList, CarSample, TickPart};

/// Why a tick could not be packed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    /// The budget cannot hold the header and even one car.
    #[error("datagram budget of {budget} bytes cannot hold one car (needs {needed})")]
    BudgetTooSmall { budget: usize, needed: usize },
    /// More than `u16::MAX` parts would be needed.
    #[error("tick needs more than 65535 datagrams")]
    TooManyParts,
}

/// Worst-case size of everything in a part except the cars' own bytes.
fn overhead(tick: u64, time_us: u64) -> usize {
    // version byte + tick + time + part (<= 3 bytes) + parts (<= 3) + car count (<= 3)
    1 + wire::varint_len(tick) + wire::varint_len(time_us) + 3 + 3 + 3
}

/// Packs `cars` (any order; duplicates by id are dropped) into datagram payloads of at most
/// `budget` bytes each. An empty fleet yields one part with no cars, so clients still see ticks.
pub fn pack_tick(
    tick: u64,
    time_us: u64,
    cars: &[CarSample],
    budget: usize,
) -> Result<Vec<Vec<u8>>, PackError> {
    let CarList(sorted) = CarList::sorted(cars.to_vec());
    let fixed = overhead(tick, time_us);
    // A car never costs more than 5 (id varint) + 7 bytes.
    if budget < fixed + 12 {
        return Err(PackError::BudgetTooSmall {
            budget,
            needed: fixed + 12,
        });
    }

    let mut groups: Vec<Vec<CarSample>> = Vec::new();
    let mut current: Vec<CarSample> = Vec::new();
    let mut used = fixed;
    for car in sorted {
        let gap = current
            .last()
            .map_or(car.id, |prev: &CarSample| car.id - prev.id - 1);
        let cost = wire::varint_len(u64::from(gap)) + 7;
        if used + cost > budget && !current.is_empty() {
            groups.push(std::mem::take(&mut current));
            used = fixed;
            // First car of a new part carries its absolute id.
            used += wire::varint_len(u64::from(car.id)) + 7;
        } else {
            used += cost;
        }
        current.push(car);
    }
    groups.push(current);

    let parts = u16::try_from(groups.len()).map_err(|_| PackError::TooManyParts)?;
    let mut out = Vec::with_capacity(groups.len());
    for (i, cars) in groups.into_iter().enumerate() {
        let part = TickPart {
            tick,
            time_us,
            part: i as u16,
            parts,
            cars: CarList(cars),
        };
        // Invariant: ids are sorted and unique, so encoding cannot fail.
        let bytes = part.encode().expect("sorted unique car ids always encode");
        debug_assert!(bytes.len() <= budget);
        out.push(bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: u32) -> Vec<CarSample> {
        (0..n)
            .map(|id| CarSample {
                id: id * 3,
                x: id as u16,
                y: (id * 7) as u16,
                heading: id as u8,
                speed: 20,
                age: 1,
            })
            .collect()
    }

    #[test]
    fn pack_hundred_cars_fit_one_datagram() {
        let parts = pack_tick(1000, 1_764_000_000_000_000, &fleet(100), 1100).unwrap();
        assert_eq!(parts.len(), 1);
        assert!(parts[0].len() <= 100 * 8 + 20, "{}", parts[0].len());
    }

    #[test]
    fn pack_splits_under_budget_and_keeps_every_car() {
        let cars = fleet(1000);
        for budget in [60, 200, 1100, 1400] {
            let parts = pack_tick(5, 1_764_000_000_000_000, &cars, budget).unwrap();
            let mut seen = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                assert!(p.len() <= budget, "part {} is {} > {budget}", i, p.len());
                let d = TickPart::decode(p).unwrap();
                assert_eq!(d.part as usize, i);
                assert_eq!(d.parts as usize, parts.len());
                seen.extend(d.cars.0);
            }
            assert_eq!(seen, cars);
        }
    }

    #[test]
    fn pack_empty_fleet_is_one_empty_part() {
        let parts = pack_tick(1, 2, &[], 100).unwrap();
        assert_eq!(parts.len(), 1);
        assert!(TickPart::decode(&parts[0]).unwrap().cars.0.is_empty());
    }

    #[test]
    fn pack_tiny_budget_is_an_error() {
        assert!(matches!(
            pack_tick(1, 2, &fleet(3), 20),
            Err(PackError::BudgetTooSmall { .. })
        ));
    }
}
