//! A token bucket, for rate limits (ingest per token, handshakes per address).

use std::time::{Duration, Instant};

/// `rate` tokens per second, holding at most one second's worth (and at least one).
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    /// Takes one token, or says how long until one is there.
    pub(crate) fn take(&mut self, rate: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = self
            .at
            .map_or(1.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Whether nothing was taken for `d` (a bucket idle for a second is full again).
    pub(crate) fn idle_for(&self, d: Duration, now: Instant) -> bool {
        self.at
            .is_none_or(|at| now.saturating_duration_since(at) >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_one_second_burst_then_paces() {
        let mut b = Bucket::default();
        let t = Instant::now();
        for _ in 0..10 {
            assert!(b.take(10.0, t).is_ok());
        }
        let wait = b.take(10.0, t).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        assert!(b.take(10.0, t + Duration::from_millis(100)).is_ok());
        assert!(!b.idle_for(Duration::from_secs(1), t + Duration::from_millis(500)));
        assert!(b.idle_for(Duration::from_secs(1), t + Duration::from_millis(1100)));
    }
}
