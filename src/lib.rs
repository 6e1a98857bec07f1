//! fleetcast: live vehicle positions to many browsers over WebTransport datagrams.
//!
//! Each tick the server encodes the whole fleet once into self-contained datagrams and hands
//! the same bytes to every session; a lost datagram is skipped, never retransmitted, because
//! the next tick replaces it. A reliable stream per session carries the initial state.
//!
//! Layout:
//! - [`proto`]: the pure protocol core, the `fleetcast-proto` crate (wire format,
//!   quantisation, packing, apply logic) and [`token`], the subscriber tokens (HS256 JWTs).
//! - [`sim`]: the built-in simulated fleet (pure, stepped by the caller).
//! - [`fleet`]: the fleet state, where position sources meet the tick loop (pure).
//! - [`backoff`]: the reconnect schedule (full jitter over a growing window), pure.
//! - [`certs`]: self-signed or CA-issued TLS identities.
//! - [`fdlimit`]: the open-files limit, raised at start-up.
//! - [`mint`]: `fleetcast token`, which prints a subscriber token.
//! - [`server`]: `fleetcast serve`, the async shell around the core.
//! - [`client`]: the native WebTransport client used by `watch`, the tests and load tools.
//! - [`watch`]: `fleetcast watch`, a client that reports what it receives.
//! - [`swarm`]: `fleetcast swarm`, a load generator over WebTransport (on quinn-proto, or on
//!   wtransport) or WebSocket.
//! - [`publish`]: `fleetcast publish` and `fleetcast sim`: fixes from files or the simulator
//!   into a server's position ingest.
//! - [`udp`]: UDP sockets with large kernel buffers.

pub mod backoff;
pub mod certs;
pub mod client;
pub mod fdlimit;
pub mod fleet;
pub mod mint;
pub mod publish;
pub mod server;
pub mod sim;
pub mod swarm;
pub mod udp;
pub mod watch;

pub use fleetcast_proto as proto;
pub use fleetcast_proto::token;
