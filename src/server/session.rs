//! Accepting WebTransport sessions and running each one in its own task.
//!
//! A session's failure stays inside it: every error ends that session (with a close code the
//! client can read) and is logged once, in [`handle`].

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};
use wtransport::endpoint::SessionRequest;
use wtransport::error::{ApplicationClose, ConnectionError, StreamOpeningError, StreamWriteError};
use wtransport::{Connection, SendStream, VarInt};

use super::admission::Refusal;
use super::config::origin_allowed;
use super::stats::GaugeGuard;
use super::{now_us, Member, ServerEndpoint, Shared, Stats, SESSION_PATH};
use crate::proto::wire::webtransport_datagram_header;
use crate::proto::wire::{CloseCode, StreamMessage};
use crate::token;

/// How long a goodbye may take before the session is closed regardless.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// Close reason sent with [`CloseCode::Normal`] when the client ended the session.
const CLIENT_ENDED: &str = "the client ended the session";

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    /// The client ended the session: a CLOSE_WEBTRANSPORT_SESSION capsule, a FIN on the CONNECT
    /// stream, or a QUIC close with an application code.
    #[error("the client ended the session with code {}: {}", .0.code(),
            String::from_utf8_lossy(.0.reason()))]
    ClientEnded(ApplicationClose),
    #[error("client lost: {0}")]
    Connection(ConnectionError),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    #[error("client did not read the reliable stream within {0:?}")]
    Slow(Duration),
    #[error("reliable stream failed: {0}")]
    Stream(#[from] StreamWriteError),
    #[error("cannot open the reliable stream: {0}")]
    Opening(StreamOpeningError),
    #[error("server shutting down")]
    Shutdown,
}

impl From<ConnectionError> for SessionEnd {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(close) => SessionEnd::ClientEnded(close),
            other => SessionEnd::Connection(other),
        }
    }
}

/// Accepts connection attempts until `token` is cancelled.
pub(crate) async fn accept_loop(
    endpoint: &ServerEndpoint,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    token: &CancellationToken,
) {
    let max_handshakes = shared.args.max_handshakes.max(1);
    let handshakes = Arc::new(Semaphore::new(max_handshakes));
    loop {
        let incoming = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let in_flight = max_handshakes - handshakes.available_permits();
        if !validated && in_flight >= shared.args.validate_above {
            // Many handshakes at once: make the client prove its address first (a Retry costs
            // us one stateless packet), so spoofed sources cannot take handshake slots.
            Stats::inc(&shared.stats.handshakes_retried);
            incoming.retry();
            continue;
        }
        if !shared.handshake_allowed(remote.ip(), std::time::Instant::now()) {
            if validated {
                Stats::inc(&shared.stats.refused_handshake_rate);
                debug!(%remote, "refused: --handshakes-per-ip exceeded");
                incoming.refuse();
            } else {
                // The source may be spoofed to get a victim refused: ask it to validate.
                Stats::inc(&shared.stats.handshakes_retried);
                incoming.retry();
            }
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            Stats::inc(&shared.stats.refused_busy);
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let token = token.clone();
        tracker.spawn(async move {
            // One limit covers the QUIC handshake, HTTP/3 settings and the CONNECT request.
            let request = tokio::select! {
                _ = token.cancelled() => return,
                r = tokio::time::timeout(shared.args.handshake_timeout, incoming) => r,
            };
            drop(permit);
            match request {
                Ok(Ok(request)) => handle(request, shared, token).await,
                Ok(Err(e)) => {
                    Stats::inc(&shared.stats.handshake_failed);
                    debug!(%remote, "handshake failed: {e}");
                }
                Err(_) => {
                    Stats::inc(&shared.stats.handshake_failed);
                    debug!(%remote, "no CONNECT within {:?}", shared.args.handshake_timeout);
                }
            }
        });
    }
    debug!("accept loop stopped");
}

/// Sends the answer to a session request within --write-timeout. A client that does not take
/// it (no flow-control credit, say) would otherwise hold the connection and this task outside
/// every limit; dropping the request closes the connection.
async fn reply(shared: &Shared, remote: std::net::SocketAddr, answer: impl Future<Output = ()>) {
    if tokio::time::timeout(shared.args.write_timeout, answer)
        .await
        .is_err()
    {
        Stats::inc(&shared.stats.reply_timeouts);
        debug!(%remote, "refusal not taken within --write-timeout: connection dropped");
    }
}

/// Removes the session from the datagram fan-out when it ends, and counts the datagrams QUIC
/// dropped for it (queued but never sent because its send buffer was full).
struct Registration<'a>(&'a Shared, u64);
impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let member = self
            .0
            .members
            .lock()
            .expect("members lock poisoned")
            .remove(&self.1);
        if let Some(member) = member {
            let sent = member.conn.stats().frame_tx.datagram;
            let queued = member.queued.load(Ordering::Relaxed);
            self.0
                .stats
                .datagrams_dropped
                .fetch_add(queued.saturating_sub(sent), Ordering::Relaxed);
        }
    }
}

/// Checks a session request and, if it passes, runs the session to its end.
async fn handle(request: SessionRequest, shared: Arc<Shared>, token: CancellationToken) {
    let remote = request.remote_address();
    let (path, query) = match request.path().split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (request.path(), None),
    };
    if let Some(name) = request
        .headers()
        .keys()
        .find(|k| k.bytes().any(|b| b.is_ascii_uppercase()))
    {
        // HTTP/3 field names are lower-case (RFC 9114 §4.2): such a request is malformed, and
        // an `Origin` spelt otherwise must not pass as a request without one.
        Stats::inc(&shared.stats.refused_malformed);
        debug!(%remote, header = %name, "refused: upper-case header name (400)");
        reply(&shared, remote, request.reject_with_status(400)).await;
        return;
    }
    if path != SESSION_PATH {
        Stats::inc(&shared.stats.refused_not_found);
        debug!(%remote, path, "refused: 404"); // without the query: it may hold a token
        reply(&shared, remote, request.not_found()).await;
        return;
    }
    if !origin_allowed(&shared.allowed_origins, request.origin()) {
        Stats::inc(&shared.stats.refused_forbidden);
        info!(%remote, origin = request.origin(), "refused: origin not allowed (403)");
        reply(&shared, remote, request.forbidden()).await;
        return;
    }
    if let Some(secret) = &shared.args.subscribe_secret {
        match token::verify_query(secret, query, now_us() / 1_000_000) {
            Ok(claims) => debug!(%remote, sub = claims.sub.as_deref(), "subscriber token accepted"),
            Err(e) => {
                Stats::inc(&shared.stats.refused_unauthorized);
                // The reason only: the token itself is a credential and never logged.
                debug!(%remote, "refused: {e} (401)");
                reply(&shared, remote, request.reject_with_status(401)).await;
                return;
            }
        }
    }
    let _slot = match shared.admit(remote.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            match refusal {
                Refusal::Full => Stats::inc(&shared.stats.refused_full),
                Refusal::PerAddress => Stats::inc(&shared.stats.refused_per_ip),
            }
            debug!(%remote, ?refusal, "refused (429)");
            reply(&shared, remote, request.too_many_requests()).await;
            return;
        }
    };
    // Like a refusal, the acceptance is a write the client could leave waiting forever.
    let conn = match tokio::time::timeout(shared.args.write_timeout, request.accept()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(%remote, "session failed while accepting: {e}");
            return;
        }
        Err(_) => {
            Stats::inc(&shared.stats.reply_timeouts);
            debug!(%remote, "acceptance not taken within --write-timeout: connection dropped");
            return;
        }
    };
    Stats::inc(&shared.stats.sessions_accepted);
    let _open = GaugeGuard::new(&shared.stats.open_webtransport);
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("session", id, %remote);
    async {
        debug!("opened");
        let end = run(&conn, &shared, &token, id).await;
        let (code, reason) = match &end {
            SessionEnd::ClientEnded(_) => {
                debug!("closed: {end}");
                // Whatever code the client gave, the server's answer is "normal" (section 8).
                // A no-op if the client already closed the QUIC connection itself.
                conn.close(
                    VarInt::from_u32(CloseCode::Normal.code()),
                    CLIENT_ENDED.as_bytes(),
                );
                return;
            }
            SessionEnd::Connection(e) => {
                debug!("ended: {e}");
                return;
            }
            SessionEnd::Shutdown => {
                Stats::inc(&shared.stats.closed_going_away);
                debug!("closed: {end}");
                return; // `run` already said goodbye and closed
            }
            SessionEnd::Violation(_) => {
                Stats::inc(&shared.stats.closed_protocol_violation);
                (CloseCode::ProtocolViolation, end.to_string())
            }
            SessionEnd::Slow(_) => {
                Stats::inc(&shared.stats.closed_slow);
                (CloseCode::SlowConsumer, end.to_string())
            }
            SessionEnd::Stream(_) | SessionEnd::Opening(_) => {
                (CloseCode::Internal, end.to_string())
            }
        };
        info!(code = code.code(), "closing session: {reason}");
        conn.close(VarInt::from_u32(code.code()), reason.as_bytes());
    }
    .instrument(span)
    .await;
}

/// Writes `bytes` on the session's stream within `limit`.
async fn write(stream: &mut SendStream, bytes: &[u8], limit: Duration) -> Result<(), SessionEnd> {
    match tokio::time::timeout(limit, stream.write_all(bytes)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SessionEnd::Slow(limit)),
    }
}

/// The session's life: initial state, then roster events until it ends.
async fn run(conn: &Connection, shared: &Shared, token: &CancellationToken, id: u64) -> SessionEnd {
    match run_inner(conn, shared, token, id).await {
        Ok(()) => SessionEnd::Shutdown,
        Err(end) => end,
    }
}

async fn run_inner(
    conn: &Connection,
    shared: &Shared,
    token: &CancellationToken,
    id: u64,
) -> Result<(), SessionEnd> {
    let limit = shared.args.write_timeout;
    let opening = async {
        let opening = conn.open_uni().await?;
        opening.await.map_err(SessionEnd::Opening)
    };
    let mut stream = match tokio::time::timeout(limit, opening).await {
        Ok(stream) => stream?,
        Err(_) => return Err(SessionEnd::Slow(limit)),
    };
    // Register for datagrams, then take the snapshot with its event receiver, so no roster
    // event and no tick can fall between the initial state and what follows it.
    let header: Arc<[u8]> = webtransport_datagram_header(conn.session_id().into_u64()).into();
    shared
        .members
        .lock()
        .expect("members lock poisoned")
        .insert(
            id,
            Member {
                conn: conn.quic_connection().clone(),
                header,
                queued: Arc::default(),
            },
        );
    let _registration = Registration(shared, id);

    let (mut events, snapshot) = shared.subscribe();
    let initial = shared.initial_frames(&snapshot);
    drop(snapshot);
    write(&mut stream, &initial, limit).await?;
    // The initial state can be large; later events are small. Keep no big buffer per session.
    drop(initial);
    let mut buf = Vec::new();

    loop {
        tokio::select! {
            _ = token.cancelled() => {
                goodbye(conn, &mut stream, CloseCode::GoingAway, "server shutting down").await;
                return Ok(());
            }
            event = events.recv() => {
                buf.clear();
                match event {
                    Ok(msg) => {
                        // Invariant: roster events hold ids and labels only; they always encode.
                        msg.encode_frame(&mut buf).expect("roster events encode");
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Resynchronise with the full roster and state instead of the missed
                        // events; the client replaces what it held. A fresh receiver, so no
                        // event older than that state follows it.
                        debug!(missed = n, "roster events lagged; resending full state");
                        let snapshot;
                        (events, snapshot) = shared.subscribe();
                        buf.extend_from_slice(&snapshot.frames);
                    }
                    Err(broadcast::error::RecvError::Closed) => continue,
                }
                write(&mut stream, &buf, limit).await?;
            }
            datagram = conn.receive_datagram() => {
                datagram?;
                return Err(SessionEnd::Violation("clients must not send datagrams in protocol v1"));
            }
            uni = conn.accept_uni() => {
                uni?;
                return Err(SessionEnd::Violation("clients must not open streams in protocol v1"));
            }
            bi = conn.accept_bi() => {
                bi?;
                return Err(SessionEnd::Violation("clients must not open streams in protocol v1"));
            }
            closed = conn.closed() => return Err(closed.into()),
        }
    }
}

/// Tells the client why the session ends, on the stream and in the close code.
async fn goodbye(conn: &Connection, stream: &mut SendStream, code: CloseCode, reason: &str) {
    let mut buf = Vec::new();
    let frame = StreamMessage::Goodbye {
        code: code.code(),
        reason: reason.to_string(),
    };
    if frame.encode_frame(&mut buf).is_ok() {
        // `finish` completes once the client has acknowledged the stream's data.
        let acknowledged = tokio::time::timeout(GOODBYE_WAIT, async {
            stream.write_all(&buf).await?;
            stream.finish().await
        })
        .await;
        if matches!(acknowledged, Ok(Ok(()))) {
            // Acknowledged is not read: a browser discards stream bytes its page has not read
            // yet when the session closes. Give the client a moment to read the Goodbye and end
            // the session itself (the page does when the stream ends).
            let _ = tokio::time::timeout(GOODBYE_WAIT, conn.closed()).await;
        }
    }
    conn.close(VarInt::from_u32(code.code()), reason.as_bytes());
}
