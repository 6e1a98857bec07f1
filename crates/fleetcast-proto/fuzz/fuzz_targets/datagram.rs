//! Datagram decoder: arbitrary bytes must decode or fail cleanly, and what decodes re-encodes
//! to a datagram that decodes to the same part.
#![no_main]

use fleetcast_proto::wire::TickPart;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(part) = TickPart::decode(data) {
        let again = part.encode().expect("a decoded part re-encodes");
        assert_eq!(TickPart::decode(&again).expect("re-encoded part decodes"), part);
    }
});
