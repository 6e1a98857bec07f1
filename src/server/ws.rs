//! The WebSocket fallback: the same frames and datagram payloads as WebTransport, over TCP.
//!
//! For browsers without WebTransport (or networks that block UDP). `GET /positions.ws` on the
//! HTTP port upgrades to a WebSocket; every binary message the server sends starts with a
//! channel byte:
//! - [`CHANNEL_STREAM`] (`0x00`): bytes of the reliable stream, one or more whole frames, exactly
//!   as on the WebTransport stream (Hello, then Roster + State, later roster events, Goodbye);
//! - [`CHANNEL_DATAGRAM`] (`0x01`): exactly one datagram payload, as in a WebTransport datagram.
//!
//! TCP cannot drop a datagram, so the server drops ticks instead: the tick loop publishes each
//! encoded tick on a `watch` channel and a session always sends the newest one. A client that
//! falls behind skips to the newest tick; nothing queues and the tick loop never waits.
//!
//! Clients send nothing but ping, pong and close. Anything else closes that socket with 1008.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, trace, Instrument};

use super::admission::{Refusal, SessionSlot};
use super::config::origin_allowed;
use super::{now_us, Shared, Stats};
use crate::proto::wire::{CloseCode, StreamMessage};
use crate::token;

/// Path of the WebSocket endpoint on the HTTP port.
pub const WEBSOCKET_PATH: &str = "/positions.ws";

/// Channel byte of messages carrying reliable-stream bytes.
pub const CHANNEL_STREAM: u8 = crate::proto::wire::WS_CHANNEL_STREAM;

/// Channel byte of messages carrying one datagram payload.
pub const CHANNEL_DATAGRAM: u8 = crate::proto::wire::WS_CHANNEL_DATAGRAM;

/// WebSocket close code for shutdown ("going away", RFC 6455 §7.4.1).
const WS_GOING_AWAY: u16 = 1001;
/// WebSocket close code for a client that sent what the protocol forbids ("policy violation").
const WS_POLICY_VIOLATION: u16 = 1008;
/// WebSocket close code for an internal error.
const WS_INTERNAL: u16 = 1011;

/// Largest message or frame the server reads from a client; clients send none in v1.
const MAX_CLIENT_MESSAGE: usize = 4096;

/// How long a goodbye and close may take before the socket is dropped regardless.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// What the WebSocket route needs beyond [`Shared`].
#[derive(Clone)]
pub(crate) struct WsState {
    pub shared: Arc<Shared>,
    pub token: CancellationToken,
    /// Sessions run here so shutdown waits for their goodbyes.
    pub tasks: TaskTracker,
}

/// Why a WebSocket session ended.
#[derive(Debug, thiserror::Error)]
enum WsEnd {
    #[error("client closed")]
    ClientClosed,
    #[error("connection failed: {0}")]
    Connection(#[from] axum::Error),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    #[error("client did not read within {0:?}")]
    Slow(Duration),
    #[error("server shutting down")]
    Shutdown,
}

/// `GET /positions.ws`: checks origin, subscriber token and capacity, then upgrades.
pub(crate) async fn upgrade(
    State(state): State<WsState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let shared = &state.shared;
    if !valid_websocket_key(&headers) {
        Stats::inc(&shared.stats.ws_refused_malformed);
        debug!(%remote, "websocket refused: malformed Sec-WebSocket-Key (400)");
        return (
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 4.1)\n",
        )
            .into_response();
    }
    // A header that is not text cannot match any allowed origin.
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("\u{fffd}"));
    if !origin_allowed(&shared.allowed_origins, origin) {
        Stats::inc(&shared.stats.ws_refused_forbidden);
        info!(%remote, ?origin, "websocket refused: origin not allowed (403)");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    if let Some(secret) = &shared.args.subscribe_secret {
        match token::verify_query(secret, query.as_deref(), now_us() / 1_000_000) {
            Ok(claims) => {
                debug!(%remote, sub = claims.sub.as_deref(), "websocket subscriber token accepted")
            }
            Err(e) => {
                Stats::inc(&shared.stats.ws_refused_unauthorized);
                // The reason only: the token itself is a credential and never logged.
                debug!(%remote, "websocket refused: {e} (401)");
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "subscriber token missing, invalid or expired\n",
                )
                    .into_response();
            }
        }
    }
    if state.token.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n").into_response();
    }
    let slot = match shared.admit(remote.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            let (counter, why) = match refusal {
                Refusal::Full => (&shared.stats.ws_refused_full, "too many sessions\n"),
                Refusal::PerAddress => (
                    &shared.stats.ws_refused_per_ip,
                    "too many sessions from this address\n",
                ),
            };
            Stats::inc(counter);
            debug!(%remote, ?refusal, "websocket refused (429)");
            return (StatusCode::TOO_MANY_REQUESTS, why).into_response();
        }
    };
    let tasks = state.tasks.clone();
    ws.max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .read_buffer_size(shared.args.ws_read_buffer)
        .write_buffer_size(shared.args.ws_write_buffer)
        .on_upgrade(move |socket| tasks.track_future(handle(socket, state, remote, slot)))
}

/// Runs one session to its end and logs how it ended, once.
async fn handle(socket: WebSocket, state: WsState, remote: SocketAddr, slot: SessionSlot) {
    let shared = state.shared;
    Stats::inc(&shared.stats.ws_sessions_accepted);
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("ws_session", id, %remote);
    async move {
        debug!("opened");
        let open = super::stats::GaugeGuard::new(&shared.stats.open_websocket);
        let end = run(socket, &shared, &state.token).await;
        drop(open);
        match &end {
            WsEnd::ClientClosed => debug!("ended: {end}"),
            WsEnd::Connection(_) => debug!("ended: {end}"),
            WsEnd::Shutdown => {
                Stats::inc(&shared.stats.ws_closed_going_away);
                debug!("closed: {end}");
            }
            WsEnd::Violation(_) => {
                Stats::inc(&shared.stats.ws_closed_protocol_violation);
                info!("closed: {end}");
            }
            WsEnd::Slow(_) => {
                Stats::inc(&shared.stats.ws_closed_slow);
                info!("closed: {end}");
            }
        }
        drop(slot);
    }
    .instrument(span)
    .await;
}

/// Whether the request's `Sec-WebSocket-Key` is a base64-encoded 16-byte value, as RFC 6455
/// §4.1 requires (the upgrade extractor only checks that the header exists).
fn valid_websocket_key(headers: &HeaderMap) -> bool {
    use base64::Engine;
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .ok()
        })
        .is_some_and(|key| key.len() == 16)
}

/// A stream-channel message holding `frames` (whole frames).
fn stream_message(frames: &[u8]) -> Message {
    let mut b = BytesMut::with_capacity(1 + frames.len());
    b.put_u8(CHANNEL_STREAM);
    b.put_slice(frames);
    Message::Binary(b.freeze())
}

/// Sends `messages` and flushes within `limit`.
async fn send_all<S>(sink: &mut S, messages: &[Message], limit: Duration) -> Result<(), WsEnd>
where
    S: SinkExt<Message, Error = axum::Error> + Unpin,
{
    let sending = async {
        for m in messages {
            sink.feed(m.clone()).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(limit, sending).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(WsEnd::Slow(limit)),
    }
}

/// The session's life: initial state, then the newest tick and roster events until it ends.
async fn run(socket: WebSocket, shared: &Shared, token: &CancellationToken) -> WsEnd {
    let (mut sink, mut incoming) = socket.split();
    let limit = shared.args.write_timeout;
    let result = async {
        // Subscribe before reading the snapshot, so no roster event and no tick falls between
        // the initial state and what follows it.
        let mut ticks = shared.ticks.subscribe();
        let mut last_tick = ticks.borrow_and_update().tick;
        let (mut events, snapshot) = shared.subscribe();
        let initial = shared.initial_frames(&snapshot);
        last_tick = last_tick.max(snapshot.tick);
        drop(snapshot);
        send_all(&mut sink, &[stream_message(&initial)], limit).await?;
        drop(initial);
        let mut frames = Vec::new();

        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return Err(WsEnd::Shutdown),
                incoming = incoming.next() => match incoming {
                    None | Some(Ok(Message::Close(_))) => return Err(WsEnd::ClientClosed),
                    // The library answers pings itself with the next write.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Text(_))) => {
                        return Err(WsEnd::Violation("clients must not send text messages"));
                    }
                    Some(Ok(Message::Binary(_))) => {
                        return Err(WsEnd::Violation("clients must not send data in protocol v1"));
                    }
                    Some(Err(e)) => return Err(WsEnd::Connection(e)),
                },
                event = events.recv() => {
                    frames.clear();
                    match event {
                        // Invariant: roster events hold ids and labels only; they always encode.
                        Ok(msg) => msg.encode_frame(&mut frames).expect("roster events encode"),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            // A fresh receiver, so no event older than this state follows it.
                            debug!(missed = n, "roster events lagged; resending full state");
                            let snapshot;
                            (events, snapshot) = shared.subscribe();
                            frames.extend_from_slice(&snapshot.frames);
                        }
                        Err(broadcast::error::RecvError::Closed) => continue,
                    }
                    send_all(&mut sink, &[stream_message(&frames)], limit).await?;
                }
                changed = ticks.changed() => {
                    if changed.is_err() {
                        // The tick loop has stopped: the server is shutting down.
                        return Err(WsEnd::Shutdown);
                    }
                    let tick = ticks.borrow_and_update().clone();
                    if tick.tick <= last_tick {
                        continue; // the initial state already covered it
                    }
                    let skipped = tick.tick - last_tick - 1;
                    if skipped > 0 {
                        shared.stats.ws_ticks_skipped.fetch_add(skipped, Ordering::Relaxed);
                        trace!(skipped, "client fell behind; skipping to the newest tick");
                    }
                    last_tick = tick.tick;
                    let messages: Vec<Message> = tick
                        .messages
                        .iter()
                        .map(|m: &Bytes| Message::Binary(m.clone()))
                        .collect();
                    send_all(&mut sink, &messages, limit).await?;
                    let bytes: usize = tick.messages.iter().map(Bytes::len).sum();
                    let stats = &shared.stats;
                    stats.ws_datagrams_sent.fetch_add(messages.len() as u64, Ordering::Relaxed);
                    stats.ws_bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
                }
            }
        }
    }
    .await;
    let end = match result {
        Ok(()) => WsEnd::Shutdown,
        Err(end) => end,
    };
    let close = match &end {
        WsEnd::Shutdown => Some((CloseCode::GoingAway, WS_GOING_AWAY, end.to_string())),
        WsEnd::Violation(_) => Some((
            CloseCode::ProtocolViolation,
            WS_POLICY_VIOLATION,
            end.to_string(),
        )),
        WsEnd::Connection(_) | WsEnd::ClientClosed | WsEnd::Slow(_) => None,
    };
    if let Some((code, ws_code, reason)) = close {
        goodbye(&mut sink, code, ws_code, &reason).await;
    }
    end
}

/// Tells the client why the session ends: a Goodbye frame, then a WebSocket close frame.
async fn goodbye<S>(sink: &mut S, code: CloseCode, ws_code: u16, reason: &str)
where
    S: SinkExt<Message, Error = axum::Error> + Unpin,
{
    let mut frames = Vec::new();
    let frame = StreamMessage::Goodbye {
        code: code.code(),
        reason: reason.to_string(),
    };
    let close = Message::Close(Some(CloseFrame {
        code: ws_code,
        reason: close_reason(reason).into(),
    }));
    let messages = if frame.encode_frame(&mut frames).is_ok() {
        vec![stream_message(&frames), close]
    } else {
        vec![Message::Close(Some(CloseFrame {
            code: WS_INTERNAL,
            reason: "".into(),
        }))]
    };
    let _ = send_all(sink, &messages, GOODBYE_WAIT).await;
}

/// A close reason cut to the 123 bytes a close frame allows, on a character boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reason_fits_close_frame_on_char_boundary() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123);
        assert_eq!(cut.len() % 2, 0);
    }

    #[test]
    fn websocket_key_must_be_sixteen_bytes_of_base64() {
        let with = |k: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::SEC_WEBSOCKET_KEY, k.parse().unwrap());
            valid_websocket_key(&h)
        };
        assert!(with("dGhlIHNhbXBsZSBub25jZQ=="), "the RFC's example key");
        assert!(!with("c2hvcnQ="));
        assert!(!with("not base64!"));
        assert!(!valid_websocket_key(&HeaderMap::new()));
    }

    #[test]
    fn stream_message_starts_with_channel_byte() {
        let Message::Binary(b) = stream_message(&[5, 6]) else {
            panic!("binary expected");
        };
        assert_eq!(&b[..], &[CHANNEL_STREAM, 5, 6]);
    }
}
