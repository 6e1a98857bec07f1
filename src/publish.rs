//! `fleetcast publish` and `fleetcast sim`: put positions into a server's fleet over HTTP ingest.
//!
//! Layout:
//! - [`input`]: pure readers: NDJSON, CSV and GPX text to fix objects with their input lines.
//! - [`plan`]: pure: batches, the replay schedule and time rewriting, what each HTTP answer
//!   means, the tally and the summary.

pub mod input;
pub mod plan;
