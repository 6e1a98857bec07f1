//! The HTTP side: certificate hash, health, the road network, the page's config, the WebSocket
//! fallback and the web demo's static files.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::warn;

use super::ingest;
use super::ws::{self, WsState, WEBSOCKET_PATH};
use super::{Shared, SESSION_PATH};

/// Serves HTTP until `token` is cancelled; WebSocket sessions run on `tasks`, so shutdown waits
/// for their goodbyes.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: CancellationToken,
    tasks: TaskTracker,
) {
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
            token: token.clone(),
            tasks,
        });
    let app = Router::new()
        .route("/certificate.sha256", get(certificate_hash))
        .route("/config.json", get(config))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/roads.json", get(roads))
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
        .merge(websocket);
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(token.cancelled_owned())
        .await;
    if let Err(e) = result {
        warn!("HTTP server failed: {e}");
    }
}

async fn certificate_hash(State(shared): State<Arc<Shared>>) -> Response {
    match &shared.cert_hash {
        Some(hash) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            ],
            format!("{hash}\n"),
        )
            .into_response(),
        None => (
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
    let status = match &health {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = serde_json::json!({
        "status": if health.is_ok() { "ok" } else { "unhealthy" },
        "reason": health.err(),
        "last_tick_ms_ago": shared.tick_health.since_last_tick().as_millis() as u64,
        "session_path": SESSION_PATH,
        "sessions": shared.sessions.load(Ordering::Relaxed),
        "tick": latest.tick,
        "cars": latest.cars.len(),
        "counters": counters,
    });
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
