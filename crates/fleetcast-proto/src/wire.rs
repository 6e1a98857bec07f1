//! Wire messages and their exact byte layout (postcard), stream framing and datagram layout.
//!
//! `PROTOCOL.md` describes the same bytes for people writing clients in other languages; the
//! golden vectors in `tests/vectors/` pin both.

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::{self, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

use super::quant::Quantisation;

/// Protocol version carried in [`Hello::version`]; also the first byte of every datagram.
pub const PROTOCOL_VERSION: u16 = 1;

/// First byte of every v1 datagram.
pub const DATAGRAM_VERSION: u8 = PROTOCOL_VERSION as u8;

/// Largest frame body a decoder accepts on the reliable stream (bytes).
///
/// A roster of 10,000 cars with 32-byte labels is ~350 KB; the limit stops a hostile or broken
/// peer from making a client buffer without bound.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Reasons a session ends, sent as the QUIC application close code and in [`StreamMessage::Goodbye`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CloseCode {
    /// The client ended the session normally.
    Normal = 0,
    /// The server is shutting down; reconnect later (with backoff).
    GoingAway = 1,
    /// The peer sent something the protocol does not allow (in v1: any datagram or stream from a
    /// client, or bytes that do not decode).
    ProtocolViolation = 2,
    /// The client did not read the reliable stream fast enough.
    SlowConsumer = 3,
    /// The server hit an internal error for this session.
    Internal = 4,
    /// The client does not speak the server's protocol version.
    UnsupportedVersion = 5,
}

impl CloseCode {
    /// The numeric value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps a received code back; `None` for codes this version does not define.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::GoingAway,
            2 => Self::ProtocolViolation,
            3 => Self::SlowConsumer,
            4 => Self::Internal,
            5 => Self::UnsupportedVersion,
            _ => return None,
        })
    }
}

/// Why bytes from the network could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a length prefix, a frame or a field.
    #[error("input ended early")]
    Truncated,
    /// A frame announced a body larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: u64, max: usize },
    /// A frame length prefix is not a valid varint of at most 5 bytes.
    #[error("malformed frame length prefix")]
    BadLength,
    /// A datagram's first byte names a version this decoder does not speak.
    #[error("unsupported datagram version {0}")]
    UnsupportedVersion(u8),
    /// The message tag on the stream is not one this version defines.
    #[error("unknown stream message tag {0}")]
    UnknownMessage(u32),
    /// A car id gap overflowed `u32`.
    #[error("car id overflows u32")]
    CarIdOverflow,
    /// A tick part's `part`/`parts` fields are inconsistent.
    #[error("part {part} of {parts} is out of range")]
    BadPart { part: u16, parts: u16 },
    /// The fields do not decode as postcard.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl From<postcard::Error> for DecodeError {
    fn from(e: postcard::Error) -> Self {
        match e {
            postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
            other => DecodeError::Malformed(other.to_string()),
        }
    }
}

/// One car's quantised state as carried on the wire (see [`super::quant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CarSample {
    /// Car id, unique within the fleet.
    pub id: u32,
    /// East of the area origin, in `Quantisation::unit_m` steps.
    pub x: u16,
    /// North of the area origin, in `Quantisation::unit_m` steps.
    pub y: u16,
    /// Direction of travel, clockwise from north, in 360/256 degree steps.
    pub heading: u8,
    /// Ground speed in `Quantisation::speed_unit_mps` steps, saturating at 255.
    pub speed: u8,
    /// Age of the fix at the message's time, in 100 ms steps, saturating at 255.
    pub age: u8,
}

/// A car's identity, sent once on the reliable stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarInfo {
    /// Car id, as used in every [`CarSample`].
    pub id: u32,
    /// Human-readable label (plate, call sign).
    pub label: String,
}

/// First message on every session's reliable stream.
///
/// `bounds` was appended within version 1: it is encoded after `server` when present, and a
/// hello that ends after `server` (an older server) decodes with `bounds: None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// Protocol version the server speaks ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Nominal time between ticks, in milliseconds.
    pub tick_interval_ms: u32,
    /// Server wall-clock time when the hello was written, microseconds since the Unix epoch.
    pub server_time_us: u64,
    /// How to turn wire integers back into coordinates and speeds.
    pub quant: Quantisation,
    /// Free-form server identification, e.g. `fleetcast/0.1.0`.
    pub server: String,
    /// The served area; every car is inside it. `None` from servers that predate it.
    pub bounds: Option<Bounds>,
}

impl Hello {
    /// Whether this client speaks the server's protocol version. A client that does not must
    /// close the session with [`CloseCode::UnsupportedVersion`] (PROTOCOL.md section 4.2).
    pub fn version_supported(&self) -> bool {
        self.version == PROTOCOL_VERSION
    }
}

/// A bounding box in degrees (WGS 84): the area a server serves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// Southern edge, degrees of latitude.
    pub south: f64,
    /// Western edge, degrees of longitude.
    pub west: f64,
    /// Northern edge, degrees of latitude.
    pub north: f64,
    /// Eastern edge, degrees of longitude.
    pub east: f64,
}

const HELLO_FIELDS: &[&str] = &[
    "version",
    "tick_interval_ms",
    "server_time_us",
    "quant",
    "server",
    "bounds",
];

impl Serialize for Hello {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let fields = if self.bounds.is_some() { 6 } else { 5 };
        let mut st = serializer.serialize_struct("Hello", fields)?;
        st.serialize_field("version", &self.version)?;
        st.serialize_field("tick_interval_ms", &self.tick_interval_ms)?;
        st.serialize_field("server_time_us", &self.server_time_us)?;
        st.serialize_field("quant", &self.quant)?;
        st.serialize_field("server", &self.server)?;
        // No Option tag on the wire: the bounds are simply there, or the hello ends.
        if let Some(bounds) = &self.bounds {
            st.serialize_field("bounds", bounds)?;
        }
        st.end()
    }
}

impl<'de> Deserialize<'de> for Hello {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HelloVisitor;
        impl<'de> Visitor<'de> for HelloVisitor {
            type Value = Hello;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a hello")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Hello, A::Error> {
                let missing = |i| de::Error::invalid_length(i, &"a hello");
                Ok(Hello {
                    version: seq.next_element()?.ok_or_else(|| missing(0))?,
                    tick_interval_ms: seq.next_element()?.ok_or_else(|| missing(1))?,
                    server_time_us: seq.next_element()?.ok_or_else(|| missing(2))?,
                    quant: seq.next_element()?.ok_or_else(|| missing(3))?,
                    server: seq.next_element()?.ok_or_else(|| missing(4))?,
                    // A hello is the whole frame body: when it ends after `server` (or the
                    // bounds are cut short), there are no bounds.
                    bounds: seq.next_element::<Bounds>().ok().flatten(),
                })
            }
        }
        deserializer.deserialize_struct("Hello", HELLO_FIELDS, HelloVisitor)
    }
}

/// The state of every car at one tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Tick number the state belongs to.
    pub tick: u64,
    /// Server wall-clock time of that tick, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Every car, ids strictly ascending.
    pub cars: CarList,
}

/// One message on the reliable stream (after its length prefix).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamMessage {
    /// Tag 0: protocol version and parameters; always the first frame.
    Hello(Hello),
    /// Tag 1: the complete roster, replacing whatever the client held.
    Roster(Vec<CarInfo>),
    /// Tag 2: the full state at a tick.
    State(State),
    /// Tag 3: cars that joined the fleet.
    CarsAdded(Vec<CarInfo>),
    /// Tag 4: ids of cars that left the fleet.
    CarsRemoved(Vec<u32>),
    /// Tag 5: the server is about to close the session with `code`.
    Goodbye { code: u32, reason: String },
}

/// Number of stream message tags defined in v1; frames with higher tags are skipped.
pub const STREAM_MESSAGE_TAGS: u32 = 6;

/// One self-contained datagram: some of the cars of one tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickPart {
    /// Tick number, increasing by one per tick for the life of the server process.
    pub tick: u64,
    /// Server wall-clock time of the tick, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Index of this part, `0..parts`.
    pub part: u16,
    /// How many parts the tick was split into.
    pub parts: u16,
    /// The cars in this part, ids strictly ascending.
    pub cars: CarList,
}

/// Cars with strictly ascending ids, encoded with id gaps so dense fleets cost one id byte.
///
/// On the wire: a varint count, then per car `gap` (varint; first car: its id, later cars:
/// `id - previous_id - 1`), `x` (u16 little-endian), `y` (u16 LE), `heading`, `speed`, `age`
/// (one byte each).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CarList(pub Vec<CarSample>);

impl CarList {
    /// Wraps cars, sorting them by id (the wire requires ascending ids).
    pub fn sorted(mut cars: Vec<CarSample>) -> Self {
        cars.sort_unstable_by_key(|c| c.id);
        cars.dedup_by_key(|c| c.id);
        CarList(cars)
    }
}

impl Serialize for CarList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        let mut prev: Option<u32> = None;
        for car in &self.0 {
            let gap = match prev {
                None => car.id,
                Some(p) if car.id > p => car.id - p - 1,
                Some(_) => return Err(ser::Error::custom("car ids must be strictly ascending")),
            };
            prev = Some(car.id);
            seq.serialize_element(&(
                gap,
                car.x.to_le_bytes(),
                car.y.to_le_bytes(),
                car.heading,
                car.speed,
                car.age,
            ))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for CarList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CarListVisitor;
        impl<'de> Visitor<'de> for CarListVisitor {
            type Value = CarList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a car list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CarList, A::Error> {
                // Never trust a length prefix for allocation: each car is at least 8 bytes, so
                // cap the reservation at what a maximal frame could hold.
                let hint = seq.size_hint().unwrap_or(0).min(MAX_FRAME_LEN / 8);
                let mut cars = Vec::with_capacity(hint);
                let mut next_min: u64 = 0;
                while let Some((gap, x, y, heading, speed, age)) =
                    seq.next_element::<(u32, [u8; 2], [u8; 2], u8, u8, u8)>()?
                {
                    let id = next_min + u64::from(gap);
                    let id =
                        u32::try_from(id).map_err(|_| de::Error::custom("car id overflows u32"))?;
                    next_min = u64::from(id) + 1;
                    cars.push(CarSample {
                        id,
                        x: u16::from_le_bytes(x),
                        y: u16::from_le_bytes(y),
                        heading,
                        speed,
                        age,
                    });
                }
                Ok(CarList(cars))
            }
        }
        deserializer.deserialize_seq(CarListVisitor)
    }
}

/// Encoded size of a car list of these cars (ids must ascend), without allocating.
pub fn car_list_size(cars: &[CarSample]) -> usize {
    let mut size = varint_len(cars.len() as u64);
    let mut prev: Option<u32> = None;
    for car in cars {
        let gap = prev.map_or(car.id, |p| car.id.wrapping_sub(p).wrapping_sub(1));
        size += varint_len(u64::from(gap)) + 7;
        prev = Some(car.id);
    }
    size
}

/// Length of `v` as a postcard (LEB128) varint.
pub fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

fn map_encode(e: postcard::Error) -> EncodeError {
    EncodeError(e.to_string())
}

/// A message could not be encoded (only for invalid values, e.g. unsorted car ids).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(String);

impl StreamMessage {
    /// Appends this message as one frame (varint body length, then the postcard body).
    pub fn encode_frame(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let body = postcard::to_stdvec(self).map_err(map_encode)?;
        write_varint(body.len() as u64, out);
        out.extend_from_slice(&body);
        Ok(())
    }

    /// Decodes one frame body (without its length prefix).
    ///
    /// Bytes after the known fields are ignored, so later minor revisions may append fields.
    /// Returns `Ok(None)` for a tag this version does not know: callers skip such frames.
    pub fn decode_body(body: &[u8]) -> Result<Option<Self>, DecodeError> {
        let (tag, _) = postcard::take_from_bytes::<u32>(body)?;
        if tag >= STREAM_MESSAGE_TAGS {
            return Ok(None);
        }
        let (msg, _rest) = postcard::take_from_bytes::<StreamMessage>(body)?;
        Ok(Some(msg))
    }
}

impl TickPart {
    /// Encodes this part as a complete datagram payload (version byte, then postcard fields).
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(DATAGRAM_VERSION);
        postcard::to_io(self, &mut out).map_err(map_encode)?;
        Ok(out)
    }

    /// Exact size of [`Self::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        1 + tick_part_header_len(self.tick, self.time_us, self.part, self.parts)
            + car_list_size(&self.cars.0)
    }

    /// Decodes a datagram payload. Trailing bytes after the known fields are ignored.
    pub fn decode(datagram: &[u8]) -> Result<Self, DecodeError> {
        let (&version, rest) = datagram.split_first().ok_or(DecodeError::Truncated)?;
        if version != DATAGRAM_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let (part, _rest) = postcard::take_from_bytes::<TickPart>(rest)?;
        if part.parts == 0 || part.part >= part.parts {
            return Err(DecodeError::BadPart {
                part: part.part,
                parts: part.parts,
            });
        }
        Ok(part)
    }
}

/// The fields of a tick part before its cars: what a load generator needs per datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickHeader {
    /// Tick number.
    pub tick: u64,
    /// Server time of the tick, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Index of this part.
    pub part: u16,
    /// Parts in the tick.
    pub parts: u16,
}

impl TickHeader {
    /// Decodes a datagram's header without decoding its cars.
    pub fn decode(datagram: &[u8]) -> Result<Self, DecodeError> {
        let (&version, rest) = datagram.split_first().ok_or(DecodeError::Truncated)?;
        if version != DATAGRAM_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let ((tick, time_us, part, parts), _) =
            postcard::take_from_bytes::<(u64, u64, u16, u16)>(rest)?;
        if parts == 0 || part >= parts {
            return Err(DecodeError::BadPart { part, parts });
        }
        Ok(Self {
            tick,
            time_us,
            part,
            parts,
        })
    }
}

/// WebSocket fallback: first byte of a message carrying reliable-stream bytes.
pub const WS_CHANNEL_STREAM: u8 = 0x00;
/// WebSocket fallback: first byte of a message carrying one datagram payload.
pub const WS_CHANNEL_DATAGRAM: u8 = 0x01;

/// Size of a tick part's fields before the car list.
pub fn tick_part_header_len(tick: u64, time_us: u64, part: u16, parts: u16) -> usize {
    varint_len(tick)
        + varint_len(time_us)
        + varint_len(u64::from(part))
        + varint_len(u64::from(parts))
}

/// Appends `v` as a postcard (LEB128) varint.
pub fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Incremental decoder for the reliable stream: push bytes as they arrive, pop whole messages.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed by a complete frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete message, `Ok(None)` when more bytes are needed.
    ///
    /// Frames with a tag unknown to this version are skipped silently, as PROTOCOL.md requires.
    pub fn next_message(&mut self) -> Result<Option<StreamMessage>, DecodeError> {
        loop {
            let Some((len, prefix)) = read_frame_len(&self.buf)? else {
                return Ok(None);
            };
            if self.buf.len() < prefix + len {
                return Ok(None);
            }
            let decoded = StreamMessage::decode_body(&self.buf[prefix..prefix + len]);
            self.buf.drain(..prefix + len);
            match decoded? {
                Some(msg) => return Ok(Some(msg)),
                None => continue,
            }
        }
    }
}

/// Reads a frame length prefix: `Ok(None)` if incomplete, else `(len, prefix_bytes)`.
fn read_frame_len(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut len: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(5) {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > u32::MAX as u64 || (i == 4 && b > 0x0f) {
                return Err(DecodeError::BadLength);
            }
            if len > MAX_FRAME_LEN as u64 {
                return Err(DecodeError::FrameTooLarge {
                    len,
                    max: MAX_FRAME_LEN,
                });
            }
            return Ok(Some((len as usize, i + 1)));
        }
    }
    if buf.len() >= 5 {
        return Err(DecodeError::BadLength);
    }
    Ok(None)
}

/// The WebTransport datagram header for a session: the quarter stream id (the session's CONNECT
/// stream id divided by four) as a QUIC variable-length integer (RFC 9000 §16).
///
/// The server prepends it once per distinct session id so one buffer serves many sessions.
pub fn webtransport_datagram_header(connect_stream_id: u64) -> Vec<u8> {
    let q = connect_stream_id / 4;
    match q {
        0..=0x3f => vec![q as u8],
        0x40..=0x3fff => (0x4000 | q as u16).to_be_bytes().to_vec(),
        0x4000..=0x3fff_ffff => (0x8000_0000 | q as u32).to_be_bytes().to_vec(),
        _ => (0xc000_0000_0000_0000 | q).to_be_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: u32) -> CarSample {
        CarSample {
            id,
            x: 0x1234,
            y: 0xfedc,
            heading: 64,
            speed: 40,
            age: 0,
        }
    }

    #[test]
    fn car_list_dense_ids_cost_eight_bytes() {
        let cars = CarList((0..100).map(sample).collect());
        let bytes = postcard::to_stdvec(&cars).unwrap();
        assert_eq!(bytes.len(), 1 + 100 * 8);
        assert_eq!(car_list_size(&cars.0), bytes.len());
        let back: CarList = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, cars);
    }

    #[test]
    fn car_list_unsorted_is_an_encode_error() {
        let cars = CarList(vec![sample(5), sample(5)]);
        assert!(postcard::to_stdvec(&cars).is_err());
    }

    #[test]
    fn car_list_id_overflow_is_rejected() {
        // Two cars: id u32::MAX, then gap 0 -> u32::MAX + 1.
        let mut bytes = vec![2];
        write_varint(u64::from(u32::MAX), &mut bytes);
        bytes.extend_from_slice(&[0; 7]);
        bytes.push(0);
        bytes.extend_from_slice(&[0; 7]);
        assert!(postcard::from_bytes::<CarList>(&bytes).is_err());
    }

    #[test]
    fn tick_part_encoded_len_is_exact() {
        let part = TickPart {
            tick: 300,
            time_us: 1_764_000_000_000_000,
            part: 1,
            parts: 3,
            cars: CarList(vec![sample(1), sample(200), sample(70_000)]),
        };
        let bytes = part.encode().unwrap();
        assert_eq!(bytes.len(), part.encoded_len());
        assert_eq!(TickPart::decode(&bytes).unwrap(), part);
    }

    #[test]
    fn tick_header_matches_the_full_decode() {
        let part = TickPart {
            tick: 77,
            time_us: 1_764_000_000_000_000,
            part: 2,
            parts: 5,
            cars: CarList(vec![sample(3)]),
        };
        let bytes = part.encode().unwrap();
        let h = TickHeader::decode(&bytes).unwrap();
        assert_eq!(
            (h.tick, h.time_us, h.part, h.parts),
            (77, part.time_us, 2, 5)
        );
        assert!(TickHeader::decode(&bytes[..3]).is_err());
        assert!(TickHeader::decode(&[1, 1, 1, 2, 2, 0]).is_err());
    }

    #[test]
    fn tick_part_decode_rejects_bad_input() {
        assert_eq!(TickPart::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(
            TickPart::decode(&[9, 0, 0]),
            Err(DecodeError::UnsupportedVersion(9))
        );
        assert_eq!(TickPart::decode(&[1, 1]), Err(DecodeError::Truncated));
        // part 2 of 2
        assert_eq!(
            TickPart::decode(&[1, 1, 1, 2, 2, 0]),
            Err(DecodeError::BadPart { part: 2, parts: 2 })
        );
    }

    #[test]
    fn frame_decoder_handles_split_input_and_skips_unknown_tags() {
        let mut bytes = Vec::new();
        StreamMessage::CarsRemoved(vec![1, 2])
            .encode_frame(&mut bytes)
            .unwrap();
        // A frame with unknown tag 77 and some body.
        bytes.extend_from_slice(&[3, 77, 1, 2]);
        StreamMessage::Goodbye {
            code: 1,
            reason: "bye".into(),
        }
        .encode_frame(&mut bytes)
        .unwrap();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in bytes {
            dec.push(&[b]);
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(
            got,
            vec![
                StreamMessage::CarsRemoved(vec![1, 2]),
                StreamMessage::Goodbye {
                    code: 1,
                    reason: "bye".into()
                }
            ]
        );
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn frame_decoder_rejects_oversized_and_bad_lengths() {
        let mut dec = FrameDecoder::new();
        let mut big = Vec::new();
        write_varint(MAX_FRAME_LEN as u64 + 1, &mut big);
        dec.push(&big);
        assert!(matches!(
            dec.next_message(),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        let mut dec = FrameDecoder::new();
        dec.push(&[0xff; 6]);
        assert_eq!(dec.next_message(), Err(DecodeError::BadLength));
    }

    #[test]
    fn non_canonical_varints_are_accepted_within_the_type_limit() {
        // PROTOCOL.md section 3: `80 00` is 0, `81 00` is 1. tick, time_us, part as `80 00`,
        // parts as `81 00`, car count as `80 00`.
        let part = TickPart::decode(&[1, 0x80, 0, 0x80, 0, 0x80, 0, 0x81, 0, 0x80, 0]).unwrap();
        assert_eq!(
            (part.tick, part.time_us, part.part, part.parts),
            (0, 0, 0, 1)
        );
        assert!(part.cars.0.is_empty());
        // A u16 takes at most 3 bytes: `81 80 00` is 1, `81 80 80 00` is too long.
        assert_eq!(
            TickPart::decode(&[1, 0, 0, 0, 0x81, 0x80, 0, 0])
                .unwrap()
                .parts,
            1
        );
        assert!(TickPart::decode(&[1, 0, 0, 0, 0x81, 0x80, 0x80, 0, 0]).is_err());
        // The frame length prefix too: `82 00` is a 2-byte body (CarsRemoved, no ids).
        let mut dec = FrameDecoder::new();
        dec.push(&[0x82, 0x00, 0x04, 0x00]);
        assert_eq!(
            dec.next_message(),
            Ok(Some(StreamMessage::CarsRemoved(vec![])))
        );
    }

    #[test]
    fn frame_with_an_empty_body_is_malformed() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0x00]);
        assert_eq!(dec.next_message(), Err(DecodeError::Truncated));
    }

    #[test]
    fn hello_bounds_are_read_when_present_and_optional() {
        let hello = Hello {
            version: 1,
            tick_interval_ms: 1000,
            server_time_us: 7,
            quant: Quantisation::for_area(52.35, 4.86, 4000.0),
            server: "s".into(),
            bounds: Some(Bounds {
                south: 1.0,
                west: 2.0,
                north: 3.0,
                east: 4.0,
            }),
        };
        let body = postcard::to_stdvec(&StreamMessage::Hello(hello.clone())).unwrap();
        let decode = |b: &[u8]| match StreamMessage::decode_body(b) {
            Ok(Some(StreamMessage::Hello(h))) => h,
            other => panic!("{other:?}"),
        };
        assert_eq!(decode(&body), hello);
        // Later revisions may append more: ignored.
        let mut longer = body.clone();
        longer.extend_from_slice(&[9; 5]);
        assert_eq!(decode(&longer), hello);
        // A server from before the bounds, and bounds cut short: no bounds, the rest intact.
        let without = Hello {
            bounds: None,
            ..hello.clone()
        };
        assert_eq!(decode(&body[..body.len() - 32]), without);
        assert_eq!(decode(&body[..body.len() - 9]), without);
        // Cut inside `server`: still an error.
        assert!(StreamMessage::decode_body(&body[..body.len() - 33]).is_err());
        assert!(hello.version_supported());
        assert!(!Hello {
            version: 2,
            ..hello
        }
        .version_supported());
    }

    #[test]
    fn webtransport_header_is_quic_varint_of_quarter_id() {
        assert_eq!(webtransport_datagram_header(0), vec![0]);
        assert_eq!(webtransport_datagram_header(4), vec![1]);
        assert_eq!(webtransport_datagram_header(4 * 64), vec![0x40, 0x40]);
        assert_eq!(
            webtransport_datagram_header(4 * 16384),
            vec![0x80, 0, 0x40, 0]
        );
    }

    #[test]
    fn varint_len_matches_encoding() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            write_varint(v, &mut out);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
