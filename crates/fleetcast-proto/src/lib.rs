//! fleetcast's wire protocol, version 1: the pure core every fleetcast client and server shares.
//!
//! Nothing in here touches a socket, a runtime or the clock: callers pass bytes and times in and
//! read bytes and decisions out. Everything the server, the native client, the load generator and
//! the browser agree on lives here (and in `PROTOCOL.md`, which describes the same bytes).
//!
//! Layout:
//! - [`wire`]: message types and their postcard encoding, stream framing, datagram layout.
//! - [`quant`]: metres, degrees and m/s to and from the small integers on the wire.
//! - [`pack`]: splitting one tick's cars into self-contained datagrams under a size budget.
//! - [`view`]: the client-side fleet view that applies state and datagram parts, newest wins.
//! - [`token`]: subscriber tokens (HS256 JWTs in the session URL), minted and verified.
//!
//! `PROTOCOL.md` (at the top of the repository) describes the same bytes for other languages;
//! the golden vectors in `tests/vectors/wire.json` pin them for Rust and JavaScript alike, and
//! `fuzz/` holds a cargo-fuzz target for every decoder.

pub mod pack;
pub mod quant;
pub mod token;
pub mod view;
pub mod wire;

pub use wire::{
    Bounds, CarInfo, CarSample, CloseCode, DecodeError, Hello, StreamMessage, TickPart,
    PROTOCOL_VERSION,
};
