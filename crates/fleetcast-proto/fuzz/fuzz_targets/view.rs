//! Client apply logic: any sequence of decodable stream bytes and datagrams, in any order, keeps
//! the view consistent (no panic; a car's tick never decreases while it stays on the roster).
#![no_main]

use std::collections::HashMap;

use fleetcast_proto::view::FleetView;
use fleetcast_proto::wire::{FrameDecoder, TickPart};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut view = FleetView::new();
    let mut frames = FrameDecoder::new();
    let mut held: HashMap<u32, u64> = HashMap::new();
    // Records: one length byte, one kind byte, then the bytes.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (record, tail) = tail.split_at(len);
        rest = tail;
        let Some((&kind, body)) = record.split_first() else { continue };
        if kind % 2 == 0 {
            frames.push(body);
            while let Ok(Some(msg)) = frames.next_message() {
                view.apply_message(msg);
                // A car that left may come back later as a new car.
                held.retain(|id, _| view.cars().contains_key(id));
            }
        } else if let Ok(part) = TickPart::decode(body) {
            view.apply_part(&part);
        }
        for (id, car) in view.cars() {
            if let Some(prev) = held.insert(*id, car.tick) {
                assert!(car.tick >= prev, "car {id} went back from tick {prev} to {}", car.tick);
            }
        }
    }
    view.finish();
    let c = view.counts();
    assert_eq!(c.complete + c.partial, c.received);
});
