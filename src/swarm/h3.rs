//! The HTTP/3 side of a WebTransport client session, without I/O: the bytes a client sends to
//! open a session and small incremental readers for what the server sends back.
//!
//! Used by the swarm's quinn-proto engine ([`super::engine`]); it imports no socket and never
//! reads the clock. The codecs are wtransport-proto's.

use wtransport_proto::bytes::{BufferReader, BufferWriter};
use wtransport_proto::frame::{Frame, FrameKind};
use wtransport_proto::headers::Headers;
use wtransport_proto::session::SessionRequest;
use wtransport_proto::settings::Settings;
use wtransport_proto::stream_header::{StreamHeader, StreamKind};
use wtransport_proto::varint::VarInt;

/// Why a session request could not be built or its answer not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H3Error {
    /// The URL is not an `https://` URL wtransport-proto can turn into a request.
    #[error("bad session URL: {0}")]
    Url(String),
    /// The server's answer on the CONNECT stream did not parse.
    #[error("bad CONNECT response: {0}")]
    Response(String),
}

/// The client's control stream: stream type 0x00, then SETTINGS announcing a QPACK table of 0,
/// no blocked streams, extended CONNECT, WebTransport, HTTP/3 datagrams and one session.
pub fn control_stream() -> Vec<u8> {
    let settings = Settings::builder()
        .qpack_max_table_capacity(VarInt::from_u32(0))
        .qpack_blocked_streams(VarInt::from_u32(0))
        .enable_connect_protocol()
        .enable_webtransport()
        .enable_h3_datagrams()
        .webtransport_max_sessions(VarInt::from_u32(1))
        .build();
    let header = StreamHeader::new_control();
    let frame = settings.generate_frame();
    let mut out = vec![0; header.write_size() + frame.write_size()];
    let mut w = BufferWriter::new(&mut out);
    // The buffer has exactly the size both pieces ask for.
    header.write_to_buffer(&mut w).expect("sized by write_size");
    frame.write_to_buffer(&mut w).expect("sized by write_size");
    out
}

/// The extended CONNECT request for `url` (`:method CONNECT`, `:protocol webtransport`,
/// `:scheme https`, `:authority`, `:path` with the query string), with an `origin` header when
/// given: one HEADERS frame, to send on a new bidirectional stream.
pub fn connect_request(url: &str, origin: Option<&str>) -> Result<Vec<u8>, H3Error> {
    let mut request = SessionRequest::new(url).map_err(|e| H3Error::Url(e.to_string()))?;
    if let Some(origin) = origin {
        request
            .insert("origin", origin)
            .map_err(|e| H3Error::Url(e.to_string()))?;
    }
    let frame = request.headers().generate_frame();
    let mut out = vec![0; frame.write_size()];
    frame
        .write_to_buffer(&mut BufferWriter::new(&mut out))
        .expect("sized by write_size");
    Ok(out)
}

/// Reads the server's answer on the CONNECT stream: bytes in, the `:status` out once the
/// HEADERS frame is complete. Frames before it (reserved "exercise" types) are skipped.
#[derive(Debug, Default)]
pub struct ResponseReader {
    buf: Vec<u8>,
    status: Option<u16>,
}

impl ResponseReader {
    /// Adds bytes from the stream; returns the status once known (and from then on ignores
    /// everything else: capsules the server may send later do not matter to the swarm).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<u16>, H3Error> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        self.buf.extend_from_slice(bytes);
        loop {
            let mut reader = BufferReader::new(&self.buf);
            let frame = match Frame::read_from_buffer(&mut reader) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(e) => return Err(H3Error::Response(e.to_string())),
            };
            let used = reader.offset();
            if matches!(frame.kind(), FrameKind::Headers) {
                let headers =
                    Headers::with_frame(&frame).map_err(|e| H3Error::Response(format!("{e:?}")))?;
                let status = headers
                    .get(":status")
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(|| H3Error::Response("no :status".into()))?;
                self.status = Some(status);
                self.buf = Vec::new();
                return Ok(self.status);
            }
            self.buf.drain(..used);
        }
    }
}

/// What a server-opened unidirectional stream carries, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniKind {
    /// A WebTransport stream of a session (type 0x54 and the session id): fleetcast's frames.
    WebTransport,
    /// The control stream, QPACK streams or anything else: read and dropped.
    Ignored,
}

/// Reads the type (and session id) at the start of a server-opened unidirectional stream.
#[derive(Debug, Default)]
pub struct UniHeaderReader {
    buf: Vec<u8>,
}

impl UniHeaderReader {
    /// Adds bytes; once the header is complete returns its kind and the bytes after it.
    pub fn push(&mut self, bytes: &[u8]) -> Option<(UniKind, Vec<u8>)> {
        self.buf.extend_from_slice(bytes);
        let mut reader = BufferReader::new(&self.buf);
        let kind = match StreamHeader::read_from_buffer(&mut reader) {
            Ok(None) => return None,
            Ok(Some(header)) if matches!(header.kind(), StreamKind::WebTransport) => {
                UniKind::WebTransport
            }
            // Unknown stream types are ignored (RFC 9114, 6.2).
            Ok(Some(_)) | Err(_) => UniKind::Ignored,
        };
        let rest = self.buf[reader.offset()..].to_vec();
        Some((kind, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wtransport_proto::ids::SessionId;
    use wtransport_proto::session::SessionResponse;
    use wtransport_proto::settings::SettingId;

    #[test]
    fn control_stream_announces_webtransport_and_datagrams() {
        let bytes = control_stream();
        assert_eq!(bytes[0], 0x00, "control stream type");
        let mut reader = BufferReader::new(&bytes[1..]);
        let frame = Frame::read_from_buffer(&mut reader).unwrap().unwrap();
        let settings = Settings::with_frame(&frame).unwrap();
        assert_eq!(
            settings.get(SettingId::H3Datagram),
            Some(VarInt::from_u32(1))
        );
        assert_eq!(
            settings.get(SettingId::EnableWebTransport),
            Some(VarInt::from_u32(1))
        );
        assert_eq!(
            settings.get(SettingId::EnableConnectProtocol),
            Some(VarInt::from_u32(1))
        );
        assert_eq!(
            settings.get(SettingId::WebTransportMaxSessions),
            Some(VarInt::from_u32(1))
        );
        assert_eq!(reader.offset(), bytes.len() - 1, "nothing after SETTINGS");
    }

    #[test]
    fn connect_request_carries_path_query_and_origin() {
        let bytes =
            connect_request("https://h:4433/positions?token=a.b", Some("http://o")).unwrap();
        let mut reader = BufferReader::new(&bytes);
        let frame = Frame::read_from_buffer(&mut reader).unwrap().unwrap();
        let request = SessionRequest::try_from(Headers::with_frame(&frame).unwrap()).unwrap();
        assert_eq!(request.path(), "/positions?token=a.b");
        assert_eq!(request.authority(), "h:4433");
        assert_eq!(request.origin(), Some("http://o"));
        assert!(connect_request("http://h/positions", None).is_err());
    }

    fn response(status: u16) -> Vec<u8> {
        let code = wtransport_proto::ids::StatusCode::try_from_u32(status.into()).unwrap();
        let frame = SessionResponse::with_status_code(code)
            .headers()
            .generate_frame();
        let mut out = vec![0; frame.write_size()];
        frame
            .write_to_buffer(&mut BufferWriter::new(&mut out))
            .unwrap();
        out
    }

    #[test]
    fn response_reader_finds_the_status_byte_by_byte() {
        let bytes = response(429);
        let mut r = ResponseReader::default();
        for (i, b) in bytes.iter().enumerate() {
            let got = r.push(&[*b]).unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(got, None, "incomplete at {i}");
            } else {
                assert_eq!(got, Some(429));
            }
        }
        assert_eq!(r.push(b"anything after").unwrap(), Some(429));
        let mut ok = ResponseReader::default();
        assert_eq!(ok.push(&response(200)).unwrap(), Some(200));
    }

    #[test]
    fn response_reader_rejects_an_unknown_frame() {
        let mut r = ResponseReader::default();
        // Frame type 0x02 is not an HTTP/3 frame wtransport-proto knows (nor reserved).
        assert!(r.push(&[0x02, 0x00]).is_err());
    }

    proptest::proptest! {
        /// Whatever the server sends, in whatever pieces, the readers answer without panicking.
        #[test]
        fn readers_take_any_bytes_in_any_pieces(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            cut in 0usize..64,
        ) {
            let cut = cut.min(bytes.len());
            let mut response = ResponseReader::default();
            let _ = response.push(&bytes[..cut]);
            let _ = response.push(&bytes[cut..]);
            let mut uni = UniHeaderReader::default();
            let _ = uni.push(&bytes[..cut]);
            let _ = uni.push(&bytes[cut..]);
        }

        /// A response split anywhere gives the same status as in one piece.
        #[test]
        fn response_status_does_not_depend_on_the_pieces(status in 200u16..600, cut in 0usize..64) {
            let bytes = response(status);
            let cut = cut.min(bytes.len());
            let mut r = ResponseReader::default();
            let first = r.push(&bytes[..cut]).unwrap();
            let second = r.push(&bytes[cut..]).unwrap();
            proptest::prop_assert_eq!(second, Some(status));
            proptest::prop_assert!(first.is_none() || cut == bytes.len());
        }
    }

    #[test]
    fn uni_header_reader_sorts_streams_and_keeps_the_rest() {
        let session = SessionId::try_from_session_stream(wtransport_proto::ids::StreamId::new(
            VarInt::from_u32(0),
        ))
        .unwrap();
        let header = StreamHeader::new_webtransport(session);
        let mut bytes = vec![0; header.write_size()];
        header
            .write_to_buffer(&mut BufferWriter::new(&mut bytes))
            .unwrap();
        bytes.extend_from_slice(b"frames");
        let mut r = UniHeaderReader::default();
        assert_eq!(
            r.push(&bytes[..1]),
            None,
            "0x54 needs two bytes as a varint"
        );
        assert_eq!(
            r.push(&bytes[1..]),
            Some((UniKind::WebTransport, b"frames".to_vec()))
        );
        let mut control = UniHeaderReader::default();
        assert_eq!(
            control.push(&control_stream()).map(|(k, _)| k),
            Some(UniKind::Ignored)
        );
    }
}
