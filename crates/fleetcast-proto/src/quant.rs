//! Quantisation: positions, headings and speeds to and from the small integers on the wire.
//!
//! Positions are local east/north metres from the area's south-west corner (the origin), turned
//! into `u16` steps of `unit_m` metres; latitude and longitude follow from an equirectangular
//! projection around the origin, which is accurate to well under a metre over a city.

use serde::{Deserialize, Serialize};

/// Metres per degree of latitude (and of longitude at the equator) used by the projection.
pub const METRES_PER_DEGREE: f64 = 111_320.0;

/// The parameters a client needs to turn wire integers into coordinates; sent in the hello.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantisation {
    /// Latitude of the area's south-west corner, degrees.
    pub origin_lat_deg: f64,
    /// Longitude of the area's south-west corner, degrees.
    pub origin_lon_deg: f64,
    /// Metres per position step (`x`, `y`).
    pub unit_m: f32,
    /// Metres per second per speed step.
    pub speed_unit_mps: f32,
}

/// A car's position and motion in physical units.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Motion {
    /// Metres east of the origin.
    pub east_m: f64,
    /// Metres north of the origin.
    pub north_m: f64,
    /// Heading in degrees clockwise from north, `[0, 360)`.
    pub heading_deg: f64,
    /// Ground speed, m/s.
    pub speed_mps: f64,
}

impl Quantisation {
    /// Parameters for a square area of `size_m` metres: the finest position step that still
    /// covers the whole area with `u16`, rounded up to whole centimetres.
    pub fn for_area(origin_lat_deg: f64, origin_lon_deg: f64, size_m: f64) -> Self {
        let unit_m = ((size_m / f64::from(u16::MAX)) * 100.0).ceil().max(1.0) / 100.0;
        Self {
            origin_lat_deg,
            origin_lon_deg,
            unit_m: unit_m as f32,
            speed_unit_mps: 0.25,
        }
    }

    /// Largest east or north distance representable, metres.
    pub fn extent_m(&self) -> f64 {
        f64::from(u16::MAX) * f64::from(self.unit_m)
    }

    /// Quantises a distance from the origin to a position step, clamping to the area.
    pub fn position_step(&self, metres: f64) -> u16 {
        let steps = (metres / f64::from(self.unit_m)).round();
        steps.clamp(0.0, f64::from(u16::MAX)) as u16
    }

    /// Metres from the origin for a position step.
    pub fn position_m(&self, step: u16) -> f64 {
        f64::from(step) * f64::from(self.unit_m)
    }

    /// Quantises a speed, saturating at 255 steps.
    pub fn speed_step(&self, mps: f64) -> u8 {
        let steps = (mps / f64::from(self.speed_unit_mps)).round();
        steps.clamp(0.0, 255.0) as u8
    }

    /// m/s for a speed step.
    pub fn speed_mps(&self, step: u8) -> f64 {
        f64::from(step) * f64::from(self.speed_unit_mps)
    }

    /// Latitude and longitude (degrees) of a point `east_m`, `north_m` from the origin.
    pub fn to_lat_lon(&self, east_m: f64, north_m: f64) -> (f64, f64) {
        let lat = self.origin_lat_deg + north_m / METRES_PER_DEGREE;
        let lon = self.origin_lon_deg
            + east_m / (METRES_PER_DEGREE * self.origin_lat_deg.to_radians().cos());
        (lat, lon)
    }
}

/// Quantises a heading in degrees (any value; wrapped) to 256 steps per turn.
pub fn heading_step(deg: f64) -> u8 {
    let turns = deg.rem_euclid(360.0) / 360.0;
    ((turns * 256.0).round() as u32 % 256) as u8
}

/// Degrees clockwise from north for a heading step.
pub fn heading_deg(step: u8) -> f64 {
    f64::from(step) * 360.0 / 256.0
}

/// Quantises a fix age to 100 ms steps, saturating at 255 (25.5 s or older).
pub fn age_step(age_us: u64) -> u8 {
    (age_us / 100_000).min(255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_area_covers_the_area_at_centimetre_steps() {
        let q = Quantisation::for_area(52.0, 4.0, 4000.0);
        assert_eq!(q.unit_m, 0.07);
        assert!(q.extent_m() >= 4000.0);
        let q = Quantisation::for_area(52.0, 4.0, 100.0);
        assert_eq!(q.unit_m, 0.01);
    }

    #[test]
    fn position_round_trip_error_is_half_a_step() {
        let q = Quantisation::for_area(52.0, 4.0, 4000.0);
        for m in [0.0, 0.034, 1234.5678, 3999.99] {
            let back = q.position_m(q.position_step(m));
            assert!(
                (back - m).abs() <= f64::from(q.unit_m) / 2.0 + 1e-9,
                "{m} -> {back}"
            );
        }
        assert_eq!(q.position_step(-5.0), 0);
        assert_eq!(q.position_step(1e9), u16::MAX);
    }

    #[test]
    fn heading_wraps_and_rounds() {
        assert_eq!(heading_step(0.0), 0);
        assert_eq!(heading_step(90.0), 64);
        assert_eq!(heading_step(359.9), 0);
        assert_eq!(heading_step(-90.0), 192);
        assert_eq!(heading_deg(64), 90.0);
    }

    #[test]
    fn speed_and_age_saturate() {
        let q = Quantisation::for_area(0.0, 0.0, 1000.0);
        assert_eq!(q.speed_step(13.9), 56);
        assert_eq!(q.speed_step(1000.0), 255);
        assert_eq!(q.speed_step(-1.0), 0);
        assert_eq!(age_step(250_000), 2);
        assert_eq!(age_step(u64::MAX), 255);
    }

    #[test]
    fn lat_lon_moves_north_and_east() {
        let q = Quantisation::for_area(52.0, 4.0, 4000.0);
        let (lat, lon) = q.to_lat_lon(1000.0, 1000.0);
        assert!((lat - (52.0 + 1000.0 / METRES_PER_DEGREE)).abs() < 1e-12);
        assert!(lon > 4.0 + 1000.0 / METRES_PER_DEGREE);
    }
}
