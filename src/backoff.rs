//! Reconnect backoff: how long a client waits before its next attempt (pure: no clock, no
//! randomness of its own; the caller passes a uniform sample in `[0, 1)`).
//!
//! The window grows as `base · 2^attempt` up to `cap`. With [`Jitter::Full`] the wait is
//! anywhere in the window ("full jitter"), so a population that lost the same server at the same
//! moment comes back spread evenly over the window instead of in one burst; every failed attempt
//! doubles the window, so a server that refuses or is still down sees fewer attempts per second.
//! [`Jitter::Equal`] is the web demo's schedule before issue 8 (half the window fixed, half
//! random: every page retried 250-500 ms after a restart); the swarm keeps it to compare.
//!
//! `web-demo/backoff.js` is the same schedule for the page; keep the two in step.

use std::time::Duration;

/// How the wait is drawn from the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Anywhere in `[0, window)`.
    Full,
    /// In `[window / 2, window)`: the old page schedule, kept for comparison.
    Equal,
}

/// A reconnect schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Window of the first attempt after a session was lost.
    pub base: Duration,
    /// Largest window.
    pub cap: Duration,
    /// How the wait is drawn from the window.
    pub jitter: Jitter,
}

impl Backoff {
    /// The page's schedule (`web-demo/backoff.js`): full jitter over 1 s, doubling to 8 s.
    pub const PAGE: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(8),
        jitter: Jitter::Full,
    };

    /// The window for `attempt` (0 after a session that worked, +1 per failure since).
    pub fn window(&self, attempt: u32) -> Duration {
        // 2^attempt overflows nothing once it is past the cap: clamp the exponent first.
        let factor = 1u32 << attempt.min(30);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before `attempt`, for a uniform sample `unit` in `[0, 1)` (clamped there).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let window = self.window(attempt);
        match self.jitter {
            Jitter::Full => window.mul_f64(unit),
            Jitter::Equal => window / 2 + (window / 2).mul_f64(unit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn window_doubles_up_to_the_cap() {
        let b = Backoff::PAGE;
        let windows: Vec<_> = (0..7).map(|a| b.window(a)).collect();
        assert_eq!(
            windows,
            [
                MS(1000),
                MS(2000),
                MS(4000),
                MS(8000),
                MS(8000),
                MS(8000),
                MS(8000)
            ]
        );
    }

    #[test]
    fn window_huge_attempt_stays_at_the_cap() {
        assert_eq!(Backoff::PAGE.window(u32::MAX), MS(8000));
        let b = Backoff {
            base: Duration::from_secs(u64::MAX / 2),
            cap: Duration::MAX,
            jitter: Jitter::Full,
        };
        assert_eq!(
            b.window(40),
            Duration::MAX,
            "saturates instead of overflowing"
        );
    }

    #[test]
    fn delay_full_jitter_spans_the_whole_window() {
        let b = Backoff::PAGE;
        assert_eq!(b.delay(0, 0.0), Duration::ZERO);
        assert_eq!(b.delay(0, 0.5), MS(500));
        assert_eq!(b.delay(2, 0.25), MS(1000));
        assert!(b.delay(0, 0.999_999) < MS(1000));
    }

    #[test]
    fn delay_equal_jitter_is_the_old_page_schedule() {
        // The page before issue 8: base 500 ms, cap 10 s, cap/2 + random * cap/2.
        let b = Backoff {
            base: MS(500),
            cap: MS(10_000),
            jitter: Jitter::Equal,
        };
        assert_eq!(b.delay(0, 0.0), MS(250));
        assert_eq!(b.delay(0, 0.5), MS(375));
        assert_eq!(b.delay(5, 0.0), MS(5000));
    }

    #[test]
    fn delay_clamps_bad_samples() {
        let b = Backoff::PAGE;
        assert_eq!(b.delay(0, -1.0), Duration::ZERO);
        assert_eq!(b.delay(0, f64::NAN), Duration::ZERO);
        assert_eq!(b.delay(0, 7.0), MS(1000));
    }

    #[test]
    fn delay_full_jitter_spreads_a_population_evenly() {
        // 10,000 clients with evenly spread samples: every 100 ms of the first window gets
        // a tenth of them (the old schedule put all of them into its last 250 ms).
        let b = Backoff::PAGE;
        let mut buckets = [0u32; 10];
        for i in 0..10_000 {
            let d = b.delay(0, (f64::from(i) + 0.5) / 10_000.0);
            buckets[(d.as_millis() / 100) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| n == 1000), "{buckets:?}");
    }
}
