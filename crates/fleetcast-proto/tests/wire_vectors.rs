//! Golden vectors: pin the wire format that PROTOCOL.md describes and the browser decodes.
//!
//! `tests/vectors/wire.json` lists frames and datagrams as hex with their decoded meaning as
//! plain JSON. This test checks that Rust encodes each message to exactly those bytes, decodes
//! them back, and rejects the invalid ones. The web demo's Node test checks its decoder
//! against the same file. Regenerate after a deliberate format change with
//! `FLEETCAST_BLESS=1 cargo test --test wire_vectors` and say so in PROTOCOL.md.

use fleetcast_proto::pack::pack_tick;
use fleetcast_proto::quant::Quantisation;
use fleetcast_proto::wire::{
    Bounds, CarInfo, CarList, CarSample, FrameDecoder, Hello, State, StreamMessage, TickPart,
};
use serde_json::{json, Value};

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/wire.json");

fn car_json(c: &CarSample) -> Value {
    json!({"id": c.id, "x": c.x, "y": c.y, "heading": c.heading, "speed": c.speed, "age": c.age})
}

fn cars_json(cars: &CarList) -> Value {
    Value::Array(cars.0.iter().map(car_json).collect())
}

fn message_json(msg: &StreamMessage) -> Value {
    match msg {
        StreamMessage::Hello(h) => json!({"type": "Hello", "version": h.version,
            "tick_interval_ms": h.tick_interval_ms, "server_time_us": h.server_time_us,
            "quant": {"origin_lat_deg": h.quant.origin_lat_deg,
                      "origin_lon_deg": h.quant.origin_lon_deg,
                      "unit_m": h.quant.unit_m, "speed_unit_mps": h.quant.speed_unit_mps},
            "server": h.server,
            "bounds": h.bounds.map(|b| json!({"south": b.south, "west": b.west,
                                               "north": b.north, "east": b.east}))}),
        StreamMessage::Roster(cars) => json!({"type": "Roster", "cars": cars.iter()
            .map(|c| json!({"id": c.id, "label": c.label})).collect::<Vec<_>>()}),
        StreamMessage::State(s) => json!({"type": "State", "tick": s.tick,
            "time_us": s.time_us, "cars": cars_json(&s.cars)}),
        StreamMessage::CarsAdded(cars) => json!({"type": "CarsAdded", "cars": cars.iter()
            .map(|c| json!({"id": c.id, "label": c.label})).collect::<Vec<_>>()}),
        StreamMessage::CarsRemoved(ids) => json!({"type": "CarsRemoved", "ids": ids}),
        StreamMessage::Goodbye { code, reason } => {
            json!({"type": "Goodbye", "code": code, "reason": reason})
        }
    }
}

fn part_json(p: &TickPart) -> Value {
    json!({"tick": p.tick, "time_us": p.time_us, "part": p.part, "parts": p.parts,
           "cars": cars_json(&p.cars)})
}

fn car(id: u32, x: u16, y: u16, heading: u8, speed: u8, age: u8) -> CarSample {
    CarSample {
        id,
        x,
        y,
        heading,
        speed,
        age,
    }
}

fn stream_cases() -> Vec<(&'static str, StreamMessage)> {
    vec![
        (
            "hello",
            StreamMessage::Hello(Hello {
                version: 1,
                tick_interval_ms: 1000,
                server_time_us: 1_764_072_000_123_456,
                quant: Quantisation::for_area(52.35, 4.86, 4000.0),
                server: "fleetcast/0.1.0".into(),
                // The 4 km square from the origin, to about 0.1 m.
                bounds: Some(Bounds {
                    south: 52.35,
                    west: 4.86,
                    north: 52.385932,
                    east: 4.918825,
                }),
            }),
        ),
        (
            "roster",
            StreamMessage::Roster(vec![
                CarInfo {
                    id: 0,
                    label: "FC-0001".into(),
                },
                CarInfo {
                    id: 300,
                    label: "Tåxi 7".into(),
                },
            ]),
        ),
        (
            "state",
            StreamMessage::State(State {
                tick: 41,
                time_us: 1_764_072_041_000_000,
                cars: CarList(vec![
                    car(0, 28571, 5714, 64, 44, 0),
                    car(1, 0, 65535, 255, 255, 255),
                    car(300, 1, 2, 3, 4, 5),
                ]),
            }),
        ),
        (
            "cars_added",
            StreamMessage::CarsAdded(vec![CarInfo {
                id: 100,
                label: "FC-0101".into(),
            }]),
        ),
        ("cars_removed", StreamMessage::CarsRemoved(vec![0, 70000])),
        (
            "goodbye",
            StreamMessage::Goodbye {
                code: 1,
                reason: "server shutting down".into(),
            },
        ),
        // What servers sent before the bounds were appended: decoders must still take it.
        (
            "hello_without_bounds",
            StreamMessage::Hello(Hello {
                version: 1,
                tick_interval_ms: 1000,
                server_time_us: 1_764_072_000_123_456,
                quant: Quantisation::for_area(52.35, 4.86, 4000.0),
                server: "fleetcast/0.1.0".into(),
                bounds: None,
            }),
        ),
    ]
}

fn datagram_cases() -> Vec<(&'static str, TickPart)> {
    vec![
        (
            "one_part",
            TickPart {
                tick: 42,
                time_us: 1_764_072_042_000_000,
                part: 0,
                parts: 1,
                cars: CarList(vec![
                    car(0, 28571, 5714, 64, 44, 0),
                    car(1, 100, 200, 128, 0, 3),
                    car(5, 65535, 0, 192, 60, 255),
                ]),
            },
        ),
        (
            "second_of_three",
            TickPart {
                tick: 100_000,
                time_us: 1_764_172_000_000_000,
                part: 1,
                parts: 3,
                cars: CarList(vec![car(200, 1, 1, 1, 1, 1), car(16_600, 2, 2, 2, 2, 2)]),
            },
        ),
        (
            "empty",
            TickPart {
                tick: 1,
                time_us: 0,
                part: 0,
                parts: 1,
                cars: CarList(vec![]),
            },
        ),
        // One tick in three parts: what pack_tick makes of MULTI_PART_CARS under a 40-byte
        // budget (checked below). Each part's first car carries its absolute id.
        ("multi_part_0", multi_part(0, &MULTI_PART_CARS[0..2])),
        ("multi_part_1", multi_part(1, &MULTI_PART_CARS[2..4])),
        ("multi_part_2", multi_part(2, &MULTI_PART_CARS[4..5])),
    ]
}

/// The cars of the multi-part tick.
const MULTI_PART_CARS: [CarSample; 5] = [
    CarSample {
        id: 0,
        x: 1000,
        y: 2000,
        heading: 0,
        speed: 40,
        age: 0,
    },
    CarSample {
        id: 1,
        x: 1010,
        y: 2010,
        heading: 64,
        speed: 41,
        age: 1,
    },
    CarSample {
        id: 2,
        x: 1020,
        y: 2020,
        heading: 128,
        speed: 42,
        age: 2,
    },
    CarSample {
        id: 3,
        x: 1030,
        y: 2030,
        heading: 192,
        speed: 43,
        age: 3,
    },
    CarSample {
        id: 300,
        x: 1040,
        y: 2040,
        heading: 255,
        speed: 44,
        age: 4,
    },
];

/// Tick 43 of the multi-part vectors, part `part` of 3.
fn multi_part(part: u16, cars: &[CarSample]) -> TickPart {
    TickPart {
        tick: 43,
        time_us: 1_764_072_043_000_000,
        part,
        parts: 3,
        cars: CarList(cars.to_vec()),
    }
}

/// Bytes every decoder must reject, with the reason.
fn invalid_datagrams() -> Vec<(&'static str, &'static str)> {
    vec![
        ("empty datagram", ""),
        ("unknown version 2", "02012a00010100"),
        ("truncated after tick", "012a"),
        ("part index not below parts", "012a00010100"),
        ("zero parts", "012a00000000"),
        ("car list truncated", "012a0000010200"),
        (
            "car id overflows u32",
            "012a00000102ffffffff0f0000000000000000000000000000",
        ),
    ]
}

fn build() -> Value {
    let mut stream = Vec::new();
    for (name, msg) in stream_cases() {
        let mut bytes = Vec::new();
        msg.encode_frame(&mut bytes).unwrap();
        stream
            .push(json!({"name": name, "hex": hex::encode(&bytes), "message": message_json(&msg)}));
    }
    let mut datagrams = Vec::new();
    for (name, part) in datagram_cases() {
        let bytes = part.encode().unwrap();
        datagrams.push(json!({"name": name, "hex": hex::encode(&bytes), "part": part_json(&part)}));
    }
    let invalid: Vec<Value> = invalid_datagrams()
        .into_iter()
        .map(|(why, hex)| json!({"name": why, "hex": hex}))
        .collect();
    json!({
        "comment": "fleetcast protocol v1 golden vectors; see PROTOCOL.md. Stream hex is a whole frame (length prefix included); datagram hex is the WebTransport datagram payload (after the quarter-stream-id header).",
        "stream": stream,
        "datagrams": datagrams,
        "invalid_datagrams": invalid,
    })
}

#[test]
fn vectors_match_the_committed_file() {
    let built = build();
    if std::env::var_os("FLEETCAST_BLESS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(PATH).parent().unwrap()).unwrap();
        std::fs::write(PATH, serde_json::to_string_pretty(&built).unwrap() + "\n").unwrap();
    }
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(PATH).expect("tests/vectors/wire.json exists"),
    )
    .unwrap();
    assert_eq!(
        committed, built,
        "the wire format changed: if deliberate, bless the vectors and update PROTOCOL.md"
    );
}

#[test]
fn multi_part_vectors_are_what_pack_tick_makes() {
    let packed = pack_tick(43, 1_764_072_043_000_000, &MULTI_PART_CARS, 40).unwrap();
    let vectors: Vec<Vec<u8>> = datagram_cases()
        .into_iter()
        .filter(|(name, _)| name.starts_with("multi_part"))
        .map(|(_, part)| part.encode().unwrap())
        .collect();
    assert_eq!(packed, vectors);
}

#[test]
fn vectors_decode_to_their_messages() {
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    // All stream frames back to back, fed one byte at a time, as a stream delivers them.
    let mut all = Vec::new();
    for v in committed["stream"].as_array().unwrap() {
        all.extend(hex::decode(v["hex"].as_str().unwrap()).unwrap());
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for b in all {
        dec.push(&[b]);
        while let Some(msg) = dec.next_message().unwrap() {
            got.push(message_json(&msg));
        }
    }
    let want: Vec<Value> = committed["stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["message"].clone())
        .collect();
    assert_eq!(got, want);

    for v in committed["datagrams"].as_array().unwrap() {
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        let part = TickPart::decode(&bytes).unwrap();
        assert_eq!(part_json(&part), v["part"], "{}", v["name"]);
    }
    for v in committed["invalid_datagrams"].as_array().unwrap() {
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        assert!(TickPart::decode(&bytes).is_err(), "{} decoded", v["name"]);
    }
}
