//! Subscriber token checks: an attacker chooses the whole query string of a session request,
//! so arbitrary text must be refused or accepted without a panic, and only a token signed with
//! the server's secret may pass.
#![no_main]

use fleetcast_proto::token::{self, Secret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let secret = Secret::parse("fuzz-secret-0123456789abcdef-0123456789").expect("long enough");
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = token::from_query(text);
    let _ = token::verify_query(&secret, Some(text), 1_700_000_000);
    if let Ok(claims) = token::verify(&secret, text, 1_700_000_000) {
        // Only a correctly signed, unexpired token passes; the fuzzer cannot forge one.
        panic!("accepted a token the fuzzer made up: {claims:?}");
    }
});
