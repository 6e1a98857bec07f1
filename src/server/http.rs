//! The HTTP side: certificate hash, health, the road network, the page's config, the WebSocket
//! fallback and the web demo's static files.
//!
//! Connections are served by hyper's HTTP/1.1 server from an accept loop of our own rather than
//! `axum::serve`, which has no timer and so no header-read timeout, and whose graceful shutdown
//! waits for every connection forever. Here:
//! - a request's headers must arrive within `--http-header-timeout`, and a kept-alive connection
//!   idle for as long is closed (hyper starts the same timer when it waits for the next
//!   request), so a client sending half a header (slowloris) or nothing holds a socket for at
//!   most that long; the WebSocket handshake is such a request;
//! - one client address holds at most `--max-http-conns-per-ip` sockets, WebSocket sessions
//!   included (the count lives in the socket, which the upgrade hands to the session);
//! - at shutdown, idle connections close at once, requests in flight get until
//!   `--shutdown-timeout`, and whatever is still open then is dropped.
//!
//! HTTP/1.1 only: browsers speak HTTP/2 only over TLS, the WebSocket fallback upgrades from
//! HTTP/1.1, and hyper's HTTP/2 server has no header-read timeout to bound a silent client.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::FutureExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::{debug, warn};

use super::admission::{is_loopback, AddressKey};
use super::ingest;
use super::ws::{self, WsState, WEBSOCKET_PATH};
use super::{Shared, Stats, SESSION_PATH};

/// Sent, best effort, to a connection over the per-address limit before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\n\
    Retry-After: 1\r\nContent-Length: 0\r\n\r\n";

/// Serves HTTP until `token` is cancelled, then lets open connections finish until
/// `--shutdown-timeout` has passed and drops the rest. WebSocket sessions run on `tasks`, so
/// shutdown waits for their goodbyes.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: CancellationToken,
    tasks: TaskTracker,
) {
    let app = router(shared.clone(), token.clone(), tasks);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(shared.args.http_header_timeout)
        .keep_alive(true);
    let per_ip = PerIp::new(
        shared.args.max_http_conns_per_ip,
        shared.args.limit_loopback,
    );
    let mut connections = JoinSet::new();
    let mut accept_errors = AcceptErrors::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            // Reap finished connections so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_errors.handle(e, &listener, &shared).await;
                continue;
            }
        };
        let Some(slot) = per_ip.take(remote.ip()) else {
            Stats::inc(&shared.stats.http_refused_per_ip);
            debug!(%remote, "HTTP connection refused: --max-http-conns-per-ip reached (429)");
            // Best effort and never waiting: a client that does not read loses the answer.
            let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            continue;
        };
        let stream = CountedStream {
            stream,
            _slot: slot,
            _open: OpenConnection::new(shared.clone()),
        };
        let (http, app, shared, token) = (http.clone(), app.clone(), shared.clone(), token.clone());
        let tls = shared
            .https
            .as_ref()
            .map(|t| t.read().expect("https lock poisoned").clone());
        connections.spawn(async move {
            match tls {
                None => connection(http, app, TokioIo::new(stream), remote, shared, token).await,
                Some(tls) => {
                    // The TLS handshake is part of what the header timeout bounds.
                    let limit = shared.args.http_header_timeout;
                    match tokio::time::timeout(limit, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            connection(http, app, TokioIo::new(stream), remote, shared, token).await
                        }
                        Ok(Err(e)) => debug!(%remote, "TLS handshake failed: {e}"),
                        Err(_) => {
                            Stats::inc(&shared.stats.http_header_timeouts);
                            debug!(%remote, "no TLS handshake within --http-header-timeout");
                        }
                    }
                }
            }
        });
    }
    // New connections now wait in the backlog until the listener closes, then are refused.
    drop(listener);
    let grace = shared.args.shutdown_timeout;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            "{} HTTP connections still open after {grace:?}; dropping them",
            connections.len()
        );
        connections.shutdown().await;
    }
}

/// Every route of the HTTP side.
fn router(shared: Arc<Shared>, token: CancellationToken, tasks: TaskTracker) -> Router {
    let web_root = shared.args.web_root.clone();
    if !web_root.join("index.html").exists() {
        warn!(
            "no index.html in {}: the web demo is not served",
            web_root.display()
        );
    }
    let websocket = Router::new()
        .route(WEBSOCKET_PATH, get(ws::upgrade))
        .route(ingest::PUBLISH_WS_PATH, get(ingest::stream))
        .with_state(WsState {
            shared: shared.clone(),
            token,
            tasks,
        });
    Router::new()
        .route("/certificate.sha256", get(certificate_hash))
        // A page on another origin (a dashboard embedding fleetcast-client.js, or a node of a
        // multi-node deployment) reads these two like the certificate hash: public, no cookies.
        .route("/config.json", get(config).layer(any_origin()))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/roads.json", get(roads).layer(any_origin()))
        .route(ingest::POSITIONS_PATH, post(ingest::post_positions))
        .route(ingest::CARS_PATH, get(ingest::list_cars))
        .route(
            &format!("{}/{{id}}", ingest::CARS_PATH),
            delete(ingest::delete_car),
        )
        .fallback_service(ServeDir::new(web_root))
        // Short-lived certificates and live data: never cache.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .with_state(shared)
        .merge(websocket)
}

/// `Access-Control-Allow-Origin: *`, so pages on any origin may read the response.
fn any_origin() -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    )
}

/// Serves one connection until it closes, times out, or shutdown closes it.
async fn connection<S>(
    http: hyper::server::conn::http1::Builder,
    app: Router,
    io: TokioIo<S>,
    remote: SocketAddr,
    shared: Arc<Shared>,
    token: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: axum::extract::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        tower::ServiceExt::oneshot(app.clone(), request)
    });
    let conn = http.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = token.cancelled() => {
            // Idle connections close now; a request in flight is answered first. The caller
            // drops whatever is left when --shutdown-timeout passes.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            Stats::inc(&shared.stats.http_header_timeouts);
            debug!(%remote, "HTTP connection closed: no request within --http-header-timeout");
        } else {
            debug!(%remote, "HTTP connection failed: {e}");
        }
    }
}

/// Counts open connections per client address.
#[derive(Clone)]
struct PerIp {
    max: u32,
    /// Whether loopback clients count too (`--limit-loopback`), as for sessions.
    limit_loopback: bool,
    open: Arc<Mutex<HashMap<AddressKey, u32>>>,
}

impl PerIp {
    fn new(max: u32, limit_loopback: bool) -> Self {
        Self {
            max,
            limit_loopback,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `ip`, or `None` at the limit. Addresses count as
    /// sessions do (`admission`): IPv4, or an IPv6 /64; loopback only with --limit-loopback.
    fn take(&self, ip: IpAddr) -> Option<IpSlot> {
        if !self.limit_loopback && is_loopback(ip) {
            return Some(IpSlot {
                per_ip: self.clone(),
                key: None,
            });
        }
        let key = AddressKey::new(ip);
        let mut open = self.open.lock().expect("per-address lock poisoned");
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            key: Some(key),
        })
    }
}

/// One connection's place in [`PerIp`], given back when dropped.
struct IpSlot {
    per_ip: PerIp,
    key: Option<AddressKey>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self.per_ip.open.lock().expect("per-address lock poisoned");
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

/// Holds the open-connections gauge one higher while the connection lives.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: Arc<Shared>) -> Self {
        Stats::inc(&shared.stats.open_http_connections);
        Self(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .stats
            .open_http_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's socket holding its [`IpSlot`]: the slot is given back when the socket closes,
/// also after a WebSocket upgrade has handed the socket to the session.
struct CountedStream {
    stream: TcpStream,
    _slot: IpSlot,
    _open: OpenConnection,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What the accept loop does when `accept` fails: refuse clients cleanly when out of file
/// descriptors, back off instead of spinning otherwise, and log at most one line a second
/// however many fail.
struct AcceptErrors {
    /// A descriptor held in reserve: freed for a moment to accept and refuse a client when
    /// none is left (the trick from libev's documentation).
    spare: Option<std::fs::File>,
    /// When the last line was logged, and failures since then not logged.
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

/// Shortest time between two accept-failure log lines.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

/// Sent, best effort, to a client accepted only to be refused for want of file descriptors.
const SERVICE_UNAVAILABLE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
    Retry-After: 1\r\nContent-Length: 0\r\n\r\n";

impl AcceptErrors {
    fn new() -> Self {
        Self {
            spare: spare_descriptor(),
            logged: None,
            unlogged: 0,
        }
    }

    /// Handles one failed `accept`; waits a little where retrying at once would spin.
    async fn handle(&mut self, e: io::Error, listener: &TcpListener, shared: &Shared) {
        // The client gave up before we accepted it: nothing to do.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            return;
        }
        Stats::inc(&shared.stats.http_accept_errors);
        if out_of_descriptors(&e) {
            if let Some(spare) = self.spare.take() {
                // Without a descriptor the waiting client stays in the kernel's backlog, hears
                // nothing until it gives up, and keeps the listener readable (a busy loop).
                // Accept it on the spare descriptor and refuse it, so it can retry later.
                drop(spare);
                if let Some(Ok((stream, remote))) = listener.accept().now_or_never() {
                    Stats::inc(&shared.stats.http_refused_no_fd);
                    let _ = stream.try_write(SERVICE_UNAVAILABLE);
                    drop(stream);
                    self.log(format_args!(
                        "HTTP connection from {remote} refused (503): out of file descriptors \
                         ({e})"
                    ));
                }
                self.spare = spare_descriptor();
                if self.spare.is_some() {
                    // The next waiting client, if any, is refused the same way.
                    return;
                }
            }
        }
        self.log(format_args!("HTTP accept failed: {e}; retrying in 100 ms"));
        // tokio leaves the listener readable after an error, so retrying at once would spin.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn log(&mut self, what: std::fmt::Arguments<'_>) {
        if self
            .logged
            .is_some_and(|at| at.elapsed() < ACCEPT_LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        let unlogged = std::mem::take(&mut self.unlogged);
        warn!("{what} ({unlogged} more like it since the last report)");
        self.logged = Some(std::time::Instant::now());
    }
}

/// Whether an error means the process (EMFILE) or the system (ENFILE) has no descriptor left.
fn out_of_descriptors(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            e.raw_os_error(),
            Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
                || code == rustix::io::Errno::NFILE.raw_os_error()
        )
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// A descriptor to hold in reserve (`None` if even that cannot be opened).
fn spare_descriptor() -> Option<std::fs::File> {
    #[cfg(unix)]
    let path = "/dev/null";
    #[cfg(not(unix))]
    let path = "NUL";
    std::fs::File::open(path).ok()
}

/// The hashes of the certificates to trust, one a line: the one in use, then the next one
/// once it is published (see `rotation`).
async fn certificate_hash(State(shared): State<Arc<Shared>>) -> Response {
    let hashes = shared
        .cert_hashes
        .read()
        .expect("hashes lock poisoned")
        .clone();
    match hashes.is_empty() {
        false => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            ],
            hashes.iter().map(|h| format!("{h}\n")).collect::<String>(),
        )
            .into_response(),
        true => (
            StatusCode::NOT_FOUND,
            "this server uses a CA-issued certificate: trust it through the system roots\n",
        )
            .into_response(),
    }
}

/// What the web page needs to connect: the WebTransport port is not the HTTP port.
async fn config(State(shared): State<Arc<Shared>>) -> Response {
    Json(serde_json::json!({
        "protocol_version": crate::proto::wire::PROTOCOL_VERSION,
        "webtransport_port": shared.wt_port,
        "session_path": SESSION_PATH,
        "websocket_path": WEBSOCKET_PATH,
        "tick_interval_ms": shared.args.tick_ms,
        "token_required": shared.args.subscribe_secret.is_some(),
        "servers": shared.args.cluster.servers,
    }))
    .into_response()
}

/// `GET /healthz`: 200 while the tick loop runs on time, 503 with the reason once it has
/// stopped or fallen behind (no tick for three intervals and a second), so an orchestrator
/// restarts the process.
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let latest = shared.latest.borrow().clone();
    let mut counters = serde_json::Map::new();
    for (name, value) in shared.stats.snapshot() {
        counters.insert(name.to_string(), value.into());
    }
    let period = std::time::Duration::from_millis(u64::from(shared.args.tick_ms));
    let health = shared.tick_health.check(period);
    let nats_down = shared.cluster.as_ref().filter(|c| !c.connected());
    let (status, state, reason) = match (&health, &shared.cluster) {
        // In a cluster, ticks that stop arriving are the cluster's trouble (no NATS, no
        // ticker): restarting this node would only cost its sessions, so it stays 200 and says
        // `degraded`. Its own tick loop stopping is this node's, as on a single node.
        (Err(why), _) if shared.tick_health.stopped() || shared.cluster.is_none() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            Some(why.clone()),
        ),
        _ if nats_down.is_some() => {
            let ms = nats_down.map_or(0, |c| c.disconnected_for_ms());
            let why =
                format!("NATS unreachable (for {ms} ms): no ticks, no ingest; sessions are kept");
            (StatusCode::OK, "degraded", Some(why))
        }
        (Err(why), _) => {
            let why = format!("{why}: no ticks from the cluster (no node holds the ticker lease?)");
            (StatusCode::OK, "degraded", Some(why))
        }
        (Ok(()), _) => (StatusCode::OK, "ok", None),
    };
    let mut body = serde_json::json!({
        "status": state,
        "reason": reason,
        "last_tick_ms_ago": shared.tick_health.since_last_tick().as_millis() as u64,
        "session_path": SESSION_PATH,
        "sessions": shared.sessions.load(Ordering::Relaxed),
        "tick": latest.tick,
        "cars": latest.cars.len(),
        "counters": counters,
    });
    if let Some(cluster) = &shared.cluster {
        let ticker_node = cluster
            .ticker_node
            .lock()
            .expect("ticker lock poisoned")
            .clone();
        body["node"] = cluster.node.clone().into();
        body["ticker"] = cluster.is_ticker().into();
        body["cluster"] = serde_json::json!({
            "nats_connected": cluster.connected(),
            "nats_disconnected_ms": cluster.disconnected_for_ms(),
            "ticker_node": ticker_node,
            "foreign_config": cluster.foreign_config.load(Ordering::Relaxed),
        });
    }
    (status, Json(body)).into_response()
}

async fn roads(State(shared): State<Arc<Shared>>) -> Response {
    let area = &shared.area;
    Json(serde_json::json!({
        "area_m": area.side_m(),
        "origin_lat_deg": area.quant.origin_lat_deg,
        "origin_lon_deg": area.quant.origin_lon_deg,
        "bounds": {"south": area.south, "west": area.west, "north": area.north, "east": area.east},
        "roads": shared.roads,
    }))
    .into_response()
}

/// Prometheus text exposition (format 0.0.4) of the server's counters and the process.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let body = super::metrics::render(&shared);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
