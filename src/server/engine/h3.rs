//! HTTP/3 and WebTransport as far as a fleetcast server speaks them: encoders and incremental
//! parsers over byte slices. No sockets, no clock, no QUIC: the shard feeds stream bytes in and
//! writes what these functions return.
//!
//! What a session looks like on the wire (RFC 9114, RFC 9297, draft-ietf-webtrans-http3):
//! - each side opens a control stream (uni, type 0x00) whose first frame is SETTINGS; the client
//!   must announce `SETTINGS_H3_DATAGRAM = 1`;
//! - the client sends an extended CONNECT (HEADERS frame, QPACK with the static table only) on a
//!   bidirectional stream; that stream's id is the session id;
//! - the server answers with a HEADERS frame (`:status`), then the stream carries capsules in
//!   DATA frames, such as CLOSE_WEBTRANSPORT_SESSION (type 0x2843: u32 code, UTF-8 reason);
//! - the server opens a uni stream of type 0x54 followed by the session id, then fleetcast frames;
//! - datagrams start with the session id divided by four (the quarter stream id), as a varint.

use std::collections::HashMap;

use wtransport_proto::qpack;

/// HTTP/3 error codes the server closes connections or streams with.
pub const H3_NO_ERROR: u32 = 0x100;
pub const H3_STREAM_CREATION_ERROR: u32 = 0x103;
pub const H3_CLOSED_CRITICAL_STREAM: u32 = 0x104;
pub const H3_FRAME_UNEXPECTED: u32 = 0x105;
pub const H3_FRAME_ERROR: u32 = 0x106;
pub const H3_SETTINGS_ERROR: u32 = 0x109;
pub const H3_MISSING_SETTINGS: u32 = 0x10a;
pub const H3_REQUEST_REJECTED: u32 = 0x10b;
pub const H3_MESSAGE_ERROR: u32 = 0x10e;

/// Uni stream types.
pub const STREAM_CONTROL: u64 = 0x00;
pub const STREAM_QPACK_ENCODER: u64 = 0x02;
pub const STREAM_QPACK_DECODER: u64 = 0x03;
pub const STREAM_WEBTRANSPORT: u64 = 0x54;

/// Frame types.
const FRAME_DATA: u64 = 0x00;
const FRAME_HEADERS: u64 = 0x01;
const FRAME_SETTINGS: u64 = 0x04;
/// On a bidirectional stream, opens a WebTransport stream (client-opened bidi streams).
const FRAME_WEBTRANSPORT_STREAM: u64 = 0x41;

/// Settings.
const SETTINGS_QPACK_MAX_TABLE_CAPACITY: u64 = 0x01;
const SETTINGS_QPACK_BLOCKED_STREAMS: u64 = 0x07;
const SETTINGS_ENABLE_CONNECT_PROTOCOL: u64 = 0x08;
const SETTINGS_H3_DATAGRAM: u64 = 0x33;
const SETTINGS_ENABLE_WEBTRANSPORT: u64 = 0x2b60_3742;
const SETTINGS_WEBTRANSPORT_MAX_SESSIONS: u64 = 0xc671_706a;

/// The capsule that ends a WebTransport session.
pub const CAPSULE_CLOSE_WEBTRANSPORT_SESSION: u64 = 0x2843;
/// The longest close reason a capsule may carry (draft-ietf-webtrans-http3 §6).
pub const MAX_CLOSE_REASON: usize = 1024;

/// The largest frame the server reads into memory (a CONNECT request, SETTINGS, a capsule).
pub const MAX_FRAME: usize = 16 * 1024;

/// Appends `v` as a QUIC variable-length integer.
///
/// # Panics
/// If `v` is 2^62 or more (never for the values this module writes).
pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        assert!(v < 1 << 62, "varint out of range");
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// Reads a QUIC variable-length integer: the value and its length, or `None` if `buf` ends
/// first.
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// A protocol error: the HTTP/3 code to close the connection with, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (HTTP/3 error {code:#x})")]
pub struct H3Error {
    pub code: u32,
    pub reason: &'static str,
}

fn err(code: u32, reason: &'static str) -> H3Error {
    H3Error { code, reason }
}

/// One frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub ty: u64,
    pub payload: &'a [u8],
    /// Bytes the frame took, header included.
    pub len: usize,
}

/// Reads the frame at the start of `buf`; `Ok(None)` if it is not complete yet.
pub fn next_frame(buf: &[u8]) -> Result<Option<RawFrame<'_>>, H3Error> {
    let Some((ty, a)) = get_varint(buf) else {
        return Ok(None);
    };
    if ty == FRAME_WEBTRANSPORT_STREAM {
        // Not a frame with a length: the rest of the stream belongs to WebTransport.
        return Ok(Some(RawFrame {
            ty,
            payload: &[],
            len: a,
        }));
    }
    let Some((len, b)) = get_varint(&buf[a..]) else {
        return Ok(None);
    };
    if len > MAX_FRAME as u64 {
        return Err(err(H3_FRAME_ERROR, "frame larger than the server reads"));
    }
    let end = a + b + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(RawFrame {
        ty,
        payload: &buf[a + b..end],
        len: end,
    }))
}

/// The server's control stream: its type, then SETTINGS.
pub fn control_stream_preamble() -> Vec<u8> {
    let mut settings = Vec::new();
    for (id, value) in [
        (SETTINGS_QPACK_MAX_TABLE_CAPACITY, 0),
        (SETTINGS_QPACK_BLOCKED_STREAMS, 0),
        (SETTINGS_ENABLE_CONNECT_PROTOCOL, 1),
        (SETTINGS_H3_DATAGRAM, 1),
        (SETTINGS_ENABLE_WEBTRANSPORT, 1),
        (SETTINGS_WEBTRANSPORT_MAX_SESSIONS, 1),
    ] {
        put_varint(&mut settings, id);
        put_varint(&mut settings, value);
    }
    let mut out = Vec::with_capacity(settings.len() + 4);
    put_varint(&mut out, STREAM_CONTROL);
    put_varint(&mut out, FRAME_SETTINGS);
    put_varint(&mut out, settings.len() as u64);
    out.extend_from_slice(&settings);
    out
}

/// Checks the peer's SETTINGS frame: WebTransport needs `SETTINGS_H3_DATAGRAM = 1`.
pub fn check_settings(frame: &RawFrame) -> Result<(), H3Error> {
    if frame.ty != FRAME_SETTINGS {
        return Err(err(
            H3_MISSING_SETTINGS,
            "the control stream must start with SETTINGS",
        ));
    }
    let mut rest = frame.payload;
    let mut datagrams = false;
    while !rest.is_empty() {
        let (id, a) = get_varint(rest).ok_or(err(H3_FRAME_ERROR, "truncated SETTINGS"))?;
        let (value, b) = get_varint(&rest[a..]).ok_or(err(H3_FRAME_ERROR, "truncated SETTINGS"))?;
        rest = &rest[a + b..];
        if id == SETTINGS_H3_DATAGRAM {
            if value > 1 {
                return Err(err(H3_SETTINGS_ERROR, "SETTINGS_H3_DATAGRAM above 1"));
            }
            datagrams = value == 1;
        }
    }
    if !datagrams {
        return Err(err(
            H3_SETTINGS_ERROR,
            "the client did not enable HTTP/3 datagrams (SETTINGS_H3_DATAGRAM)",
        ));
    }
    Ok(())
}

/// An extended CONNECT request, checked for the WebTransport shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `:path`, with the query string.
    pub path: String,
    pub authority: String,
    pub origin: Option<String>,
    /// A field name with an upper-case letter (malformed in HTTP/3), if any.
    pub upper_case: Option<String>,
}

/// What a request stream's HEADERS frame asks for.
pub enum Requested {
    /// A WebTransport session.
    WebTransport(Request),
    /// Something else: answered with this status (a plain GET, say).
    Other(u16),
}

/// Decodes a HEADERS frame's payload as a request.
pub fn parse_request(payload: &[u8]) -> Result<Requested, H3Error> {
    let headers: HashMap<String, String> = qpack::Decoder::decode(payload)
        .map_err(|_| err(H3_MESSAGE_ERROR, "undecodable request headers"))?;
    let upper_case = headers
        .keys()
        .find(|k| k.bytes().any(|b| b.is_ascii_uppercase()))
        .cloned();
    let get = |name: &str| headers.get(name).cloned();
    if get(":method").as_deref() != Some("CONNECT")
        || get(":protocol").as_deref() != Some("webtransport")
    {
        // HTTP/3 without WebTransport is not served on this port.
        return Ok(Requested::Other(
            if get(":method").as_deref() == Some("CONNECT") {
                400
            } else {
                405
            },
        ));
    }
    let (Some(scheme), Some(authority), Some(path)) =
        (get(":scheme"), get(":authority"), get(":path"))
    else {
        return Ok(Requested::Other(400));
    };
    if scheme != "https" {
        return Ok(Requested::Other(400));
    }
    Ok(Requested::WebTransport(Request {
        path,
        authority,
        origin: get("origin"),
        upper_case,
    }))
}

/// A HEADERS frame with a response status.
pub fn response(status: u16) -> Vec<u8> {
    let status = status.to_string();
    let payload = qpack::Encoder::encode([(":status", status.as_str())]);
    let mut out = Vec::with_capacity(payload.len() + 4);
    put_varint(&mut out, FRAME_HEADERS);
    put_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(&payload);
    out
}

/// The header of the server's WebTransport uni stream for `session_id`.
pub fn webtransport_uni_header(session_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    put_varint(&mut out, STREAM_WEBTRANSPORT);
    put_varint(&mut out, session_id);
    out
}

/// A DATA frame holding a CLOSE_WEBTRANSPORT_SESSION capsule (reason cut to 1,024 bytes, on a
/// character boundary).
pub fn close_capsule(code: u32, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = &reason.as_bytes()[..cut];
    let mut capsule = Vec::with_capacity(reason.len() + 12);
    put_varint(&mut capsule, CAPSULE_CLOSE_WEBTRANSPORT_SESSION);
    put_varint(&mut capsule, 4 + reason.len() as u64);
    capsule.extend_from_slice(&code.to_be_bytes());
    capsule.extend_from_slice(reason);
    let mut out = Vec::with_capacity(capsule.len() + 4);
    put_varint(&mut out, FRAME_DATA);
    put_varint(&mut out, capsule.len() as u64);
    out.extend_from_slice(&capsule);
    out
}

/// What the client sent on the CONNECT stream after the response.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectStreamEvent {
    /// CLOSE_WEBTRANSPORT_SESSION with its code and reason.
    Close { code: u32, reason: String },
}

/// Reads the CONNECT stream after the response: DATA frames whose payloads form the capsule
/// sequence. Consumes complete frames from `frames` into `capsules`, then complete capsules
/// from `capsules`; unknown frames and capsules are skipped (RFC 9114 §9, RFC 9297 §3.2).
pub fn read_connect_stream(
    frames: &mut Vec<u8>,
    capsules: &mut Vec<u8>,
) -> Result<Option<ConnectStreamEvent>, H3Error> {
    let mut used = 0;
    while let Some(frame) = next_frame(&frames[used..])? {
        match frame.ty {
            FRAME_DATA => capsules.extend_from_slice(frame.payload),
            FRAME_HEADERS => {
                return Err(err(H3_FRAME_UNEXPECTED, "HEADERS after the request"));
            }
            FRAME_SETTINGS | FRAME_WEBTRANSPORT_STREAM => {
                return Err(err(
                    H3_FRAME_UNEXPECTED,
                    "unexpected frame on the CONNECT stream",
                ));
            }
            _ => {}
        }
        used += frame.len;
    }
    frames.drain(..used);
    if capsules.len() > MAX_FRAME {
        return Err(err(
            H3_MESSAGE_ERROR,
            "capsule larger than the server reads",
        ));
    }
    let mut used = 0;
    let mut event = None;
    while event.is_none() {
        let rest = &capsules[used..];
        let Some((ty, a)) = get_varint(rest) else {
            break;
        };
        let Some((len, b)) = get_varint(&rest[a..]) else {
            break;
        };
        let end = a + b + len as usize;
        if len > MAX_FRAME as u64 || rest.len() < end {
            break;
        }
        let payload = &rest[a + b..end];
        if ty == CAPSULE_CLOSE_WEBTRANSPORT_SESSION {
            if payload.len() < 4 || payload.len() > 4 + MAX_CLOSE_REASON {
                return Err(err(
                    H3_MESSAGE_ERROR,
                    "malformed CLOSE_WEBTRANSPORT_SESSION",
                ));
            }
            let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            let reason = String::from_utf8_lossy(&payload[4..]).into_owned();
            event = Some(ConnectStreamEvent::Close { code, reason });
        }
        used += end;
    }
    capsules.drain(..used);
    Ok(event)
}

/// What kind of uni stream the client opened, once its type is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniKind {
    Control,
    /// QPACK encoder or decoder: with a zero-capacity table there is nothing to read.
    Qpack,
    WebTransport,
    /// Reserved or unknown types are ignored (RFC 9114 §6.2.3).
    Unknown,
}

/// Reads a uni stream's type: the kind and the bytes it took, or `None` if incomplete.
pub fn uni_stream_kind(buf: &[u8]) -> Option<(UniKind, usize)> {
    let (ty, len) = get_varint(buf)?;
    let kind = match ty {
        STREAM_CONTROL => UniKind::Control,
        STREAM_QPACK_ENCODER | STREAM_QPACK_DECODER => UniKind::Qpack,
        STREAM_WEBTRANSPORT => UniKind::WebTransport,
        _ => UniKind::Unknown,
    };
    Some((kind, len))
}

/// The bytes a WebTransport datagram starts with for `session_id`: the quarter stream id.
pub fn datagram_header(session_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    put_varint(&mut out, session_id / 4);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(fields: &[(&str, &str)]) -> Vec<u8> {
        let payload = qpack::Encoder::encode(fields.iter().copied());
        let mut out = Vec::new();
        put_varint(&mut out, FRAME_HEADERS);
        put_varint(&mut out, payload.len() as u64);
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn varints_round_trip_at_every_length() {
        for v in [
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(get_varint(&out), Some((v, out.len())), "{v}");
            assert_eq!(get_varint(&out[..out.len() - 1]), None, "{v} truncated");
        }
        // RFC 9000 appendix A.1's examples.
        assert_eq!(
            get_varint(&[0x9d, 0x7f, 0x3e, 0x7d]),
            Some((494_878_333, 4))
        );
        assert_eq!(get_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
    }

    #[test]
    fn control_stream_announces_webtransport_and_datagrams() {
        let pre = control_stream_preamble();
        assert_eq!(pre[0], 0x00);
        let frame = next_frame(&pre[1..]).unwrap().unwrap();
        assert_eq!(frame.len, pre.len() - 1);
        check_settings(&frame).expect("our own settings enable datagrams");
        // wtransport's parser reads them too.
        let parsed = wtransport_proto::settings::Settings::with_frame(
            &wtransport_proto::frame::Frame::new_settings(frame.payload.into()),
        )
        .unwrap();
        use wtransport_proto::settings::SettingId;
        assert_eq!(parsed.get(SettingId::H3Datagram).unwrap().into_inner(), 1);
        assert_eq!(
            parsed
                .get(SettingId::EnableWebTransport)
                .unwrap()
                .into_inner(),
            1
        );
    }

    #[test]
    fn settings_without_datagrams_are_refused() {
        let mut payload = Vec::new();
        put_varint(&mut payload, SETTINGS_ENABLE_WEBTRANSPORT);
        put_varint(&mut payload, 1);
        let frame = RawFrame {
            ty: FRAME_SETTINGS,
            payload: &payload,
            len: 0,
        };
        assert_eq!(check_settings(&frame).unwrap_err().code, H3_SETTINGS_ERROR);
        let not_settings = RawFrame {
            ty: FRAME_HEADERS,
            payload: &[],
            len: 0,
        };
        assert_eq!(
            check_settings(&not_settings).unwrap_err().code,
            H3_MISSING_SETTINGS
        );
    }

    #[test]
    fn frames_parse_incrementally() {
        let frame = headers_frame(&[(":status", "200")]);
        for cut in 0..frame.len() {
            assert_eq!(next_frame(&frame[..cut]).unwrap(), None, "cut at {cut}");
        }
        let whole = next_frame(&frame).unwrap().unwrap();
        assert_eq!((whole.ty, whole.len), (FRAME_HEADERS, frame.len()));
        let mut huge = Vec::new();
        put_varint(&mut huge, FRAME_DATA);
        put_varint(&mut huge, MAX_FRAME as u64 + 1);
        assert_eq!(next_frame(&huge).unwrap_err().code, H3_FRAME_ERROR);
    }

    #[test]
    fn a_webtransport_connect_is_recognised_with_its_fields() {
        let frame = headers_frame(&[
            (":method", "CONNECT"),
            (":protocol", "webtransport"),
            (":scheme", "https"),
            (":authority", "localhost:4433"),
            (":path", "/positions?token=x"),
            ("origin", "http://localhost:8080"),
        ]);
        let raw = next_frame(&frame).unwrap().unwrap();
        let Requested::WebTransport(req) = parse_request(raw.payload).unwrap() else {
            panic!("not recognised");
        };
        assert_eq!(req.path, "/positions?token=x");
        assert_eq!(req.authority, "localhost:4433");
        assert_eq!(req.origin.as_deref(), Some("http://localhost:8080"));
        assert_eq!(req.upper_case, None);

        let upper = headers_frame(&[
            (":method", "CONNECT"),
            (":protocol", "webtransport"),
            (":scheme", "https"),
            (":authority", "a"),
            (":path", "/positions"),
            ("Origin", "http://evil"),
        ]);
        let raw = next_frame(&upper).unwrap().unwrap();
        let Requested::WebTransport(req) = parse_request(raw.payload).unwrap() else {
            panic!("not recognised");
        };
        assert_eq!(req.upper_case.as_deref(), Some("Origin"));
        assert_eq!(req.origin, None, "an upper-case Origin is not an origin");

        let get = headers_frame(&[(":method", "GET"), (":scheme", "https"), (":path", "/")]);
        let raw = next_frame(&get).unwrap().unwrap();
        assert!(matches!(
            parse_request(raw.payload).unwrap(),
            Requested::Other(405)
        ));
        assert_eq!(
            parse_request(&[0xff, 0xff, 0xff]).err().unwrap().code,
            H3_MESSAGE_ERROR
        );
    }

    #[test]
    fn responses_decode_with_wtransport() {
        let bytes = response(429);
        let raw = next_frame(&bytes).unwrap().unwrap();
        let decoded = qpack::Decoder::decode(raw.payload).unwrap();
        assert_eq!(decoded.get(":status").map(String::as_str), Some("429"));
    }

    #[test]
    fn close_capsules_round_trip_and_cut_long_reasons() {
        let mut frames = close_capsule(7, "slow");
        let mut capsules = Vec::new();
        assert_eq!(
            read_connect_stream(&mut frames, &mut capsules).unwrap(),
            Some(ConnectStreamEvent::Close {
                code: 7,
                reason: "slow".into()
            })
        );
        assert!(frames.is_empty() && capsules.is_empty());

        let long = "é".repeat(600); // 1,200 bytes
        let mut frames = close_capsule(1, &long);
        let mut capsules = Vec::new();
        let Some(ConnectStreamEvent::Close { reason, .. }) =
            read_connect_stream(&mut frames, &mut capsules).unwrap()
        else {
            panic!("no close");
        };
        assert_eq!(reason.len(), 1024);
        assert!(reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn capsules_split_across_frames_and_unknown_ones_are_skipped() {
        // An unknown capsule (type 0x29, 2 bytes), then the close capsule split over two DATA
        // frames with an unknown frame type between them.
        let close = close_capsule(3, "bye");
        let close_capsule_bytes = &close[2..]; // without the DATA frame header
        let mut capsule_stream = vec![0x29, 0x02, 0xaa, 0xbb];
        capsule_stream.extend_from_slice(close_capsule_bytes);
        let (a, b) = capsule_stream.split_at(5);
        let mut frames = Vec::new();
        for (i, part) in [a, b].iter().enumerate() {
            put_varint(&mut frames, FRAME_DATA);
            put_varint(&mut frames, part.len() as u64);
            frames.extend_from_slice(part);
            if i == 0 {
                frames.extend_from_slice(&[0x21, 0x01, 0x00]); // reserved frame type 0x21
            }
        }
        let mut capsules = Vec::new();
        // Byte by byte, as a slow network would deliver it.
        let mut fed = Vec::new();
        let mut seen = None;
        for byte in frames {
            fed.push(byte);
            if let Some(event) = read_connect_stream(&mut fed, &mut capsules).unwrap() {
                seen = Some(event);
            }
        }
        assert_eq!(
            seen,
            Some(ConnectStreamEvent::Close {
                code: 3,
                reason: "bye".into()
            })
        );
        let mut headers = headers_frame(&[(":status", "200")]);
        assert_eq!(
            read_connect_stream(&mut headers, &mut Vec::new())
                .unwrap_err()
                .code,
            H3_FRAME_UNEXPECTED
        );
    }

    #[test]
    fn uni_stream_kinds_and_datagram_headers() {
        assert_eq!(uni_stream_kind(&[0x00]), Some((UniKind::Control, 1)));
        assert_eq!(uni_stream_kind(&[0x02]), Some((UniKind::Qpack, 1)));
        assert_eq!(
            uni_stream_kind(&[0x40, 0x54]),
            Some((UniKind::WebTransport, 2))
        );
        assert_eq!(uni_stream_kind(&[0x21]), Some((UniKind::Unknown, 1)));
        assert_eq!(uni_stream_kind(&[]), None);
        assert_eq!(webtransport_uni_header(0), vec![0x40, 0x54, 0x00]);
        assert_eq!(datagram_header(0), vec![0]);
        assert_eq!(datagram_header(4 * 70), vec![0x40, 70]);
        assert_eq!(
            datagram_header(8),
            crate::proto::wire::webtransport_datagram_header(8)
        );
    }
}
