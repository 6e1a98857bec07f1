//! The pure protocol core: wire messages, quantisation, tick packing and the client's apply logic.
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

pub mod pack;
pub mod quant;
pub mod view;
pub mod wire;

pub use wire::{
    CarInfo, CarSample, CloseCode, DecodeError, Hello, StreamMessage, TickPart, PROTOCOL_VERSION,
};
