//! Property tests: every message round-trips, packing never loses or duplicates a car, and
//! decoders never panic on arbitrary bytes.

use fleetcast_proto::pack::pack_tick;
use fleetcast_proto::quant::Quantisation;
use fleetcast_proto::view::{FleetView, PENDING_TICKS};
use fleetcast_proto::wire::{
    Bounds, CarInfo, CarList, CarSample, FrameDecoder, Hello, State, StreamMessage, TickPart,
};
use proptest::prelude::*;

fn sample() -> impl Strategy<Value = CarSample> {
    (
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
    )
        .prop_map(|(id, x, y, heading, speed, age)| CarSample {
            id,
            x,
            y,
            heading,
            speed,
            age,
        })
}

fn car_list() -> impl Strategy<Value = CarList> {
    prop::collection::vec(sample(), 0..200).prop_map(CarList::sorted)
}

fn message() -> impl Strategy<Value = StreamMessage> {
    let info = (any::<u32>(), ".{0,20}").prop_map(|(id, label)| CarInfo { id, label });
    prop_oneof![
        (
            any::<u16>(),
            any::<u32>(),
            any::<u64>(),
            any::<f64>(),
            any::<f64>(),
            any::<f32>(),
            any::<f32>(),
            ".{0,30}",
            prop::option::of(any::<[i16; 4]>()),
        )
            .prop_filter("NaN never equals itself", |t| !t.3.is_nan()
                && !t.4.is_nan()
                && !t.5.is_nan()
                && !t.6.is_nan())
            .prop_map(
                |(version, tick_interval_ms, server_time_us, lat, lon, unit, speed, server, b)| {
                    StreamMessage::Hello(Hello {
                        version,
                        tick_interval_ms,
                        server_time_us,
                        quant: Quantisation {
                            origin_lat_deg: lat,
                            origin_lon_deg: lon,
                            unit_m: unit,
                            speed_unit_mps: speed,
                        },
                        server,
                        bounds: b.map(|b| Bounds {
                            south: f64::from(b[0]) / 100.0,
                            west: f64::from(b[1]) / 100.0,
                            north: f64::from(b[2]) / 100.0,
                            east: f64::from(b[3]) / 100.0,
                        }),
                    })
                }
            ),
        prop::collection::vec(info.clone(), 0..50).prop_map(StreamMessage::Roster),
        (any::<u64>(), any::<u64>(), car_list()).prop_map(|(tick, time_us, cars)| {
            StreamMessage::State(State {
                tick,
                time_us,
                cars,
            })
        }),
        prop::collection::vec(info, 0..5).prop_map(StreamMessage::CarsAdded),
        prop::collection::vec(any::<u32>(), 0..50).prop_map(StreamMessage::CarsRemoved),
        (any::<u32>(), ".{0,40}")
            .prop_map(|(code, reason)| StreamMessage::Goodbye { code, reason }),
    ]
}

proptest! {
    #[test]
    fn stream_messages_round_trip_through_split_frames(
        msgs in prop::collection::vec(message(), 1..8),
        chunk in 1usize..64,
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            m.encode_frame(&mut bytes).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(chunk) {
            dec.push(piece);
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn tick_parts_round_trip(tick in any::<u64>(), time_us in any::<u64>(), parts in 1u16..=u16::MAX,
                             part_seed in any::<u16>(), cars in car_list()) {
        let part = TickPart { tick, time_us, part: part_seed % parts, parts, cars };
        let bytes = part.encode().unwrap();
        prop_assert_eq!(bytes.len(), part.encoded_len());
        prop_assert_eq!(TickPart::decode(&bytes).unwrap(), part);
    }

    #[test]
    fn packing_keeps_every_car_exactly_once_under_budget(
        cars in prop::collection::vec(sample(), 0..600),
        budget in 60usize..1500,
        tick in any::<u64>(),
    ) {
        let parts = pack_tick(tick, 1_764_000_000_000_000, &cars, budget).unwrap();
        let mut seen = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            prop_assert!(p.len() <= budget);
            let d = TickPart::decode(p).unwrap();
            prop_assert_eq!(usize::from(d.part), i);
            prop_assert_eq!(usize::from(d.parts), parts.len());
            seen.extend(d.cars.0);
        }
        prop_assert_eq!(CarList(seen), CarList::sorted(cars));
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = TickPart::decode(&bytes);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        while let Ok(Some(_)) = dec.next_message() {}
    }

    #[test]
    fn view_never_goes_back_in_time_whatever_the_arrival_order(
        ticks in prop::collection::vec((1u64..40, 0u16..3), 1..120),
    ) {
        let ids = [1u32, 2, 3];
        let mut view = FleetView::new();
        view.apply_message(StreamMessage::Roster(
            ids.iter().map(|&id| CarInfo { id, label: String::new() }).collect(),
        ));
        view.apply_message(StreamMessage::State(State {
            tick: 0,
            time_us: 0,
            cars: CarList(ids.iter().map(|&id| CarSample { id, ..Default::default() }).collect()),
        }));
        let mut newest = [0u64; 3];
        for (tick, part) in ticks {
            // Part p of 3 carries car p+1; its x encodes the tick so the view's choice shows.
            let car = CarSample { id: ids[usize::from(part)], x: tick as u16, ..Default::default() };
            view.apply_part(&TickPart { tick, time_us: tick, part, parts: 3, cars: CarList(vec![car]) });
            let slot = &mut newest[usize::from(part)];
            *slot = (*slot).max(tick);
            for (i, id) in ids.iter().enumerate() {
                let entry = &view.cars()[id];
                prop_assert_eq!(entry.tick, newest[i]);
                prop_assert_eq!(u64::from(entry.sample.unwrap().x), newest[i]);
            }
        }
        view.finish();
        let c = view.counts();
        // Once finished, every received tick was settled as complete or partial.
        prop_assert_eq!(c.complete + c.partial, c.received);
    }

    #[test]
    fn view_keeps_the_newest_sample_of_a_car_whose_roster_event_comes_late(
        ticks in prop::collection::vec(1u64..=PENDING_TICKS, 1..20),
        added_after in 0usize..20,
    ) {
        // Car 9 joins after the initial state; its samples arrive in any order, some or all
        // of them before its CarsAdded (datagrams overtake the stream).
        let mut view = FleetView::new();
        view.apply_message(StreamMessage::Roster(vec![]));
        view.apply_message(StreamMessage::State(State { tick: 0, time_us: 0, cars: CarList(vec![]) }));
        let added = || StreamMessage::CarsAdded(vec![CarInfo { id: 9, label: "new".into() }]);
        for (i, &tick) in ticks.iter().enumerate() {
            if i == added_after {
                view.apply_message(added());
            }
            let car = CarSample { id: 9, x: tick as u16, ..Default::default() };
            view.apply_part(&TickPart { tick, time_us: tick, part: 0, parts: 1, cars: CarList(vec![car]) });
        }
        if added_after >= ticks.len() {
            view.apply_message(added());
        }
        let newest = *ticks.iter().max().unwrap();
        let entry = &view.cars()[&9];
        prop_assert_eq!(entry.tick, newest);
        prop_assert_eq!(u64::from(entry.sample.unwrap().x), newest);
        let s = view.samples();
        prop_assert_eq!((s.expired, s.overflow, s.removed), (0, 0, 0));
        prop_assert_eq!(view.pending(), 0);
    }
}
