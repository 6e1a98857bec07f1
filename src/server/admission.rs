//! Admission: session slots, per-address limits and handshake pacing, one set of rules for both
//! transports.
//!
//! One address (an IPv4 address, or an IPv6 /64, which one host usually holds whole) may hold at
//! most `--max-sessions-per-ip` sessions and start at most `--handshakes-per-ip` QUIC handshakes
//! a second. Loopback is exempt unless `--limit-loopback`: local tools and a reverse proxy on the
//! same machine all come from it. When many handshakes are in flight, new clients must first
//! prove their address with a QUIC Retry, so spoofed sources cost no handshake work.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::rate::Bucket;
use super::Shared;

/// Per-address state is swept once it holds this many addresses.
const SWEEP_ABOVE: usize = 65_536;

/// What the per-address limits count by: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AddressKey(IpAddr);

impl AddressKey {
    /// The key for `ip` (IPv4-mapped IPv6 counts as IPv4).
    pub(crate) fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

/// Loopback, IPv4-mapped loopback included.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Why a session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `--max-sessions` are open.
    Full,
    /// This address holds `--max-sessions-per-ip` sessions.
    PerAddress,
}

/// Per-address session counts and handshake buckets.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    sessions: Mutex<HashMap<AddressKey, u32>>,
    handshakes: Mutex<HashMap<AddressKey, Bucket>>,
}

/// A session's place: gives its slot (and its address's) back when dropped, however it ends.
pub(crate) struct SessionSlot {
    shared: Arc<Shared>,
    key: Option<AddressKey>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        if let Some(key) = self.key {
            let mut map = self
                .shared
                .admission
                .sessions
                .lock()
                .expect("admission lock poisoned");
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

impl Shared {
    /// Whether per-address limits apply to `ip`.
    fn limited(&self, ip: IpAddr) -> bool {
        self.args.limit_loopback || !is_loopback(ip)
    }

    /// Takes a session slot for a client at `ip`, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SessionSlot, Refusal> {
        let key = self.limited(ip).then(|| AddressKey::new(ip));
        if let Some(key) = key {
            let mut map = self
                .admission
                .sessions
                .lock()
                .expect("admission lock poisoned");
            let n = map.entry(key).or_insert(0);
            if *n >= self.args.max_sessions_per_ip {
                if *n == 0 {
                    map.remove(&key);
                }
                return Err(Refusal::PerAddress);
            }
            *n += 1;
        }
        let slot = SessionSlot {
            shared: self.clone(),
            key,
        };
        if self.sessions.fetch_add(1, Ordering::Relaxed) >= self.args.max_sessions {
            return Err(Refusal::Full); // dropping `slot` gives both counts back
        }
        Ok(slot)
    }

    /// Whether a client at `ip` may start a QUIC handshake now (`--handshakes-per-ip`).
    pub(crate) fn handshake_allowed(&self, ip: IpAddr, now: Instant) -> bool {
        if !self.limited(ip) {
            return true;
        }
        let rate = f64::from(self.args.handshakes_per_ip);
        let mut map = self
            .admission
            .handshakes
            .lock()
            .expect("admission lock poisoned");
        if map.len() >= SWEEP_ABOVE {
            // Addresses idle for a second have a full bucket again: forgetting them is exact.
            map.retain(|_, b| !b.idle_for(Duration::from_secs(1), now));
        }
        map.entry(AddressKey::new(ip))
            .or_default()
            .take(rate, now)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_key_groups_ipv6_by_64_and_unmaps_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddressKey::new(a), AddressKey::new(b));
        assert_ne!(AddressKey::new(a), AddressKey::new(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(AddressKey::new(mapped), AddressKey::new(v4));
        assert!(AddressKey::new("::ffff:127.0.0.1".parse().unwrap())
            .0
            .is_loopback());
    }
}
