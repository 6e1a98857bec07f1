//! Server counters, shared lock-free between the tick loop, the sessions and the HTTP side.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters since the server started.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Stats {
            /// Every counter with its name, for `/healthz` and tests.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Ticks encoded and fanned out.
    ticks,
    /// WebTransport sessions accepted.
    sessions_accepted,
    /// Sessions refused with 404 (wrong path).
    refused_not_found,
    /// Sessions refused with 403 (origin not allowed).
    refused_forbidden,
    /// Sessions refused with 429 (--max-sessions reached).
    refused_full,
    /// Connection attempts refused because --max-handshakes were in progress.
    refused_busy,
    /// Handshakes that failed or did not send CONNECT within --handshake-timeout.
    handshake_failed,
    /// Sessions closed for sending what protocol v1 forbids.
    closed_protocol_violation,
    /// Sessions closed for not reading the reliable stream in time.
    closed_slow,
    /// Sessions closed at shutdown.
    closed_going_away,
    /// Datagrams handed to QUIC.
    datagrams_sent,
    /// Payload bytes of those datagrams (with the WebTransport header).
    bytes_sent,
    /// Datagrams refused by QUIC as too large for the session's current limit.
    datagrams_too_large,
    /// Ticks re-encoded for a session whose datagram limit is below --datagram-budget.
    reencoded_ticks,
    /// WebSocket sessions accepted (`/positions.ws`).
    ws_sessions_accepted,
    /// WebSocket upgrades refused with 403 (origin not allowed).
    ws_refused_forbidden,
    /// WebSocket upgrades refused with 429 (--max-sessions reached).
    ws_refused_full,
    /// WebSocket sessions closed (1008) for sending anything but ping, pong or close.
    ws_closed_protocol_violation,
    /// WebSocket sessions dropped for not reading within --write-timeout.
    ws_closed_slow,
    /// WebSocket sessions closed (1001) at shutdown.
    ws_closed_going_away,
    /// Datagram-channel messages sent to WebSocket sessions.
    ws_datagrams_sent,
    /// Bytes of those messages (with the channel byte).
    ws_bytes_sent,
    /// Ticks a lagging WebSocket session skipped to catch up with the newest.
    ws_ticks_skipped,
}

impl Stats {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads one counter by name (tests and tools).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}
