//! Position ingest: publishers put real cars into the fleet state.
//!
//! - `POST /v1/positions`: a JSON array of fixes (or one fix), or NDJSON, one fix a line.
//! - `GET /v1/publish.ws`: a WebSocket for gateways that report continuously; every text
//!   message is a batch, answered by one text message.
//! - `GET /v1/cars`: the fleet state as JSON; `DELETE /v1/cars/{id}` removes a car.
//!
//! Every request needs a publisher token (`Authorization: Bearer TOKEN`; the WebSocket may pass
//! `?token=` instead), compared in constant time and never logged. Each token has a rate limit.
//! A bad fix is rejected alone, with its index and reason; malformed JSON rejects the whole
//! batch with where it broke. Nothing a publisher sent is dropped without saying so.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{debug, info, Instrument};

use super::cluster::wire::{FleetOp, FleetReply};
use super::cluster::{fleet_op, Unavailable};
use super::config::PublishToken;
use super::rate::Bucket;
use super::ws::WsState;
use super::{Shared, Stats};
use crate::fleet::{fix_from_json, format_time, Source};

/// Path of the HTTP ingest endpoint.
pub const POSITIONS_PATH: &str = "/v1/positions";
/// Path of the streaming publisher endpoint.
pub const PUBLISH_WS_PATH: &str = "/v1/publish.ws";
/// Path of the fleet listing (and, with `/{id}`, of one car).
pub const CARS_PATH: &str = "/v1/cars";

/// Cars per page when `GET /v1/cars` collects the fleet: about 300 KB of reply.
const LIST_PAGE: usize = 2000;

/// WebSocket close code for a binary message (RFC 6455 "unsupported data").
const WS_UNSUPPORTED_DATA: u16 = 1003;
/// WebSocket close code at shutdown.
const WS_GOING_AWAY: u16 = 1001;

/// One publisher token with its rate limit.
pub(crate) struct Publisher {
    digest: [u8; 32],
    bucket: Mutex<Bucket>,
}

impl Publisher {
    pub(crate) fn new(token: PublishToken) -> Self {
        Self {
            digest: Sha256::digest(token.expose().as_bytes()).into(),
            bucket: Mutex::new(Bucket::default()),
        }
    }
}

/// Why a request was refused before any fix was looked at.
#[derive(Debug)]
enum Refusal {
    Off,
    Unauthorized(&'static str),
    RateLimited(Duration),
    TooLarge(usize),
    UnsupportedType(String),
    Malformed(ParseError),
    /// In a cluster: no ticker, or no NATS, to apply the request.
    Unavailable(Unavailable),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Off => (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "ingest is off: start the server with --feed ingest \
                                     (or --feed sim,ingest) and a --publish-token"})),
            )
                .into_response(),
            Refusal::Unauthorized(why) => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": why })),
            )
                .into_response(),
            Refusal::RateLimited(wait) => {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, secs.to_string())],
                    Json(json!({
                        "error": "rate limit of this token exceeded (--ingest-rate)",
                        "retry_after_ms": wait.as_millis().max(1) as u64,
                    })),
                )
                    .into_response()
            }
            Refusal::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(json!({
                    "error": format!("body exceeds {limit} bytes (--max-ingest-body): send smaller batches"),
                })),
            )
                .into_response(),
            Refusal::UnsupportedType(t) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Json(json!({
                    "error": format!("content type {t:?}: send application/json (an array of \
                                      fixes) or application/x-ndjson (one fix a line)"),
                })),
            )
                .into_response(),
            Refusal::Malformed(e) => (StatusCode::BAD_REQUEST, Json(e.to_json(None))).into_response(),
            Refusal::Unavailable(Unavailable(why)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                Json(json!({
                    "error": format!("{why}; nothing was applied"),
                    "retry_after_ms": 1000,
                })),
            )
                .into_response(),
        }
    }
}

/// Malformed JSON: what broke and where (1-based line and column of the whole body).
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// What the JSON parser said.
    pub message: String,
    /// Line of the body, from 1.
    pub line: usize,
    /// Column in that line, from 1.
    pub column: usize,
}

impl ParseError {
    fn to_json(&self, batch: Option<u64>) -> Value {
        let mut v = json!({
            "error": format!("malformed JSON at line {} column {}: {}; nothing was applied",
                             self.line, self.column, self.message),
            "line": self.line,
            "column": self.column,
        });
        if let Some(b) = batch {
            v["batch"] = b.into();
        }
        v
    }
}

/// How a batch's fixes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON array of fixes, or one fix object.
    Json,
    /// One fix object per line; blank lines are skipped.
    Ndjson,
}

/// One fix of a batch, as parsed JSON, with the body line it started on.
#[derive(Debug)]
pub struct Item {
    /// 1-based line of the body (NDJSON only).
    pub line: Option<usize>,
    /// The fix as JSON.
    pub value: Value,
}

/// Splits a body into fixes. Any syntax error rejects the whole body.
pub fn parse_batch(body: &[u8], format: Format) -> Result<Vec<Item>, ParseError> {
    let syntax = |e: serde_json::Error, line_offset: usize| ParseError {
        message: strip_position(&e.to_string()),
        line: e.line() + line_offset,
        column: e.column(),
    };
    match format {
        Format::Json => {
            let value: Value = serde_json::from_slice(body).map_err(|e| syntax(e, 0))?;
            match value {
                Value::Array(items) => Ok(items
                    .into_iter()
                    .map(|value| Item { line: None, value })
                    .collect()),
                value @ Value::Object(_) => Ok(vec![Item { line: None, value }]),
                _ => Err(ParseError {
                    message: "expected an array of fixes or one fix object".into(),
                    line: 1,
                    column: 1,
                }),
            }
        }
        Format::Ndjson => {
            let mut items = Vec::new();
            for (n, line) in body.split(|&b| b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let value: Value = serde_json::from_slice(line).map_err(|e| syntax(e, n))?;
                items.push(Item {
                    line: Some(n + 1),
                    value,
                });
            }
            Ok(items)
        }
    }
}

/// serde_json's message without its " at line L column C" tail (we report those as fields).
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// A rejected fix in a reply.
#[derive(Debug, Serialize)]
struct Rejected {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    error: String,
}

/// The reply to a batch.
#[derive(Debug, Serialize)]
struct Outcome {
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<u64>,
    accepted: usize,
    rejected: Vec<Rejected>,
}

/// Validates every fix, then has the valid ones applied in order, at once: on this node's
/// fleet, or by the cluster's ticker (which owns the fleet in a cluster).
async fn apply_batch(shared: &Shared, items: Vec<Item>) -> Result<Outcome, Unavailable> {
    let area = shared.area;
    let mut lines = Vec::with_capacity(items.len());
    let mut fixes = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let id = item
            .value
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string);
        match fix_from_json(item.value, &area) {
            Ok(fix) => fixes.push((index, fix)),
            Err(e) => rejected.push(Rejected {
                index,
                line: item.line,
                id: id.clone(),
                error: e.to_string(),
            }),
        }
        lines.push((item.line, id));
    }
    let mut accepted = 0;
    if !fixes.is_empty() {
        match fleet_op(shared, FleetOp::Apply { fixes }).await? {
            FleetReply::Applied {
                accepted: n,
                rejected: refused,
            } => {
                accepted = n;
                for (index, error) in refused {
                    let (line, id) = lines.get(index).cloned().unwrap_or((None, None));
                    rejected.push(Rejected {
                        index,
                        line,
                        id,
                        error,
                    });
                }
            }
            other => return Err(Unavailable::unexpected(&other)),
        }
    }
    rejected.sort_by_key(|r| r.index);
    let outcome = Outcome {
        batch: None,
        accepted,
        rejected,
    };
    let stats = &shared.stats;
    Stats::inc(&stats.ingest_batches);
    Stats::add(&stats.ingest_fixes_accepted, outcome.accepted as u64);
    Stats::add(&stats.ingest_fixes_rejected, outcome.rejected.len() as u64);
    Ok(outcome)
}

/// Finds the publisher whose token this is, comparing against every token in constant time.
fn publisher<'a>(shared: &'a Shared, token: Option<&str>) -> Result<&'a Publisher, Refusal> {
    let Some(token) = token else {
        return Err(Refusal::Unauthorized(
            "missing publisher token: send Authorization: Bearer TOKEN",
        ));
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut found = None;
    for p in &shared.publishers {
        if bool::from(p.digest.ct_eq(&digest)) {
            found = Some(p);
        }
    }
    found.ok_or(Refusal::Unauthorized("publisher token not accepted"))
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Checks that ingest is on, the token and its rate limit.
fn admit<'a>(shared: &'a Shared, token: Option<&str>) -> Result<&'a Publisher, Refusal> {
    if shared.publishers.is_empty() {
        return Err(Refusal::Off);
    }
    let publisher = publisher(shared, token).inspect_err(|_| {
        Stats::inc(&shared.stats.ingest_refused_unauthorized);
    })?;
    let rate = f64::from(shared.args.ingest.ingest_rate);
    let taken = publisher
        .bucket
        .lock()
        .expect("bucket lock poisoned")
        .take(rate, Instant::now());
    taken.map_err(|wait| {
        Stats::inc(&shared.stats.ingest_refused_rate);
        Refusal::RateLimited(wait)
    })?;
    Ok(publisher)
}

/// The body's format from its content type.
fn format_of(headers: &HeaderMap) -> Result<Format, Refusal> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Format::Json);
    };
    let text = value.to_str().unwrap_or("");
    let mime = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" | "" => Ok(Format::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines" => Ok(Format::Ndjson),
        _ => Err(Refusal::UnsupportedType(text.to_string())),
    }
}

/// `POST /v1/positions`.
pub(crate) async fn post_positions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match post_positions_impl(&shared, &headers, body).await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(refusal) => {
            debug!(?refusal, "ingest request refused");
            refusal.into_response()
        }
    }
}

async fn post_positions_impl(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<Outcome, Refusal> {
    admit(shared, bearer(headers))?;
    let format = format_of(headers)?;
    let limit = shared.args.ingest.max_ingest_body;
    let too_large = || {
        Stats::inc(&shared.stats.ingest_refused_too_large);
        Refusal::TooLarge(limit)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;
    let items = parse_batch(&bytes, format).map_err(|e| {
        Stats::inc(&shared.stats.ingest_refused_malformed);
        Refusal::Malformed(e)
    })?;
    apply_batch(shared, items).await.map_err(|e| {
        Stats::inc(&shared.stats.ingest_refused_unavailable);
        Refusal::Unavailable(e)
    })
}

/// `GET /v1/cars`: every car as the fleet state holds it.
pub(crate) async fn list_cars(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = admit(&shared, bearer(&headers)) {
        return refusal.into_response();
    }
    // A page at a time: in a cluster each page is one NATS reply, which must stay under NATS's
    // message size limit (1 MB by default) whatever the size of the fleet.
    let mut cars = Vec::new();
    let mut after = None;
    loop {
        let op = FleetOp::List {
            after,
            limit: LIST_PAGE,
        };
        match fleet_op(&shared, op).await {
            Ok(FleetReply::Cars { cars: page, more }) => {
                let next = page.last().map(|c| c.wire_id);
                cars.extend(page);
                if !more {
                    break;
                }
                // A page must move on, or a wrong answer would keep this loop going forever.
                if next.is_none() || next <= after {
                    let why = "the ticker's car list did not move on from one page to the next";
                    return unavailable(&shared, Unavailable(why.into()));
                }
                after = next;
            }
            Ok(other) => return unavailable(&shared, Unavailable::unexpected(&other)),
            Err(e) => return unavailable(&shared, e),
        }
    }
    let cars: Vec<Value> = cars
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "lat": c.lat,
                "lon": c.lon,
                "heading_deg": c.heading_deg,
                "speed_mps": c.speed_mps,
                "time": format_time(c.fix_time_us),
                "label": c.label,
                "last_heard": format_time(c.last_heard_us),
                "wire_id": c.wire_id,
                "source": match c.source {
                    Source::Simulator => "sim",
                    Source::Publisher => "publisher",
                },
            })
        })
        .collect();
    Json(cars).into_response()
}

/// `DELETE /v1/cars/{id}`: the car leaves the fleet (viewers get `CarsRemoved`).
pub(crate) async fn delete_car(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refusal) = admit(&shared, bearer(&headers)) {
        return refusal.into_response();
    }
    match fleet_op(&shared, FleetOp::Delete { id: id.clone() }).await {
        Ok(FleetReply::NotFound) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no car with id {id:?}") })),
        )
            .into_response(),
        Ok(FleetReply::NotYours) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": format!("car {id:?} belongs to the simulator") })),
        )
            .into_response(),
        Ok(FleetReply::Deleted { wire_id }) => {
            Stats::inc(&shared.stats.ingest_cars_removed);
            info!(car = %id, "car removed by a publisher");
            Json(json!({ "removed": id, "wire_id": wire_id })).into_response()
        }
        Ok(other) => unavailable(&shared, Unavailable::unexpected(&other)),
        Err(e) => unavailable(&shared, e),
    }
}

/// 503 for a request the cluster cannot serve right now.
fn unavailable(shared: &Shared, e: Unavailable) -> Response {
    Stats::inc(&shared.stats.ingest_refused_unavailable);
    Refusal::Unavailable(e).into_response()
}

/// Query parameters of the streaming endpoint.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct StreamQuery {
    token: Option<String>,
}

/// `GET /v1/publish.ws`: authenticates, then upgrades to a streaming publisher session.
pub(crate) async fn stream(
    State(state): State<WsState>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let shared = state.shared.clone();
    if shared.publishers.is_empty() {
        return Refusal::Off.into_response();
    }
    let token = bearer(&headers).or(query.token.as_deref());
    let index = match publisher(&shared, token) {
        Ok(p) => shared
            .publishers
            .iter()
            .position(|q| std::ptr::eq(p, q))
            .unwrap_or(0),
        Err(refusal) => {
            Stats::inc(&shared.stats.ingest_refused_unauthorized);
            return refusal.into_response();
        }
    };
    if state.token.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n").into_response();
    }
    Stats::inc(&shared.stats.ingest_streams_accepted);
    let limit = shared.args.ingest.max_ingest_body;
    let tasks = state.tasks.clone();
    let mut response = ws
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("publisher_stream", publisher = index);
            tasks.track_future(run_stream(socket, state, index).instrument(span))
        });
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// One streaming publisher: each text message is a batch, answered in order.
async fn run_stream(socket: WebSocket, state: WsState, index: usize) {
    let shared = state.shared;
    let publisher = &shared.publishers[index];
    let rate = f64::from(shared.args.ingest.ingest_rate);
    let (mut sink, mut incoming) = socket.split();
    let mut batch: u64 = 0;
    debug!("opened");
    let close = loop {
        let message = tokio::select! {
            _ = state.token.cancelled() => break Some((WS_GOING_AWAY, "server shutting down")),
            m = incoming.next() => m,
        };
        let text = match message {
            None | Some(Ok(Message::Close(_))) => break None,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => {
                break Some((WS_UNSUPPORTED_DATA, "send fixes as text messages"));
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Err(e)) => {
                debug!("publisher stream failed: {e}");
                break None;
            }
        };
        batch += 1;
        // The rate limit pushes back instead of refusing: the batch waits, nothing is lost.
        loop {
            let taken = publisher
                .bucket
                .lock()
                .expect("bucket lock poisoned")
                .take(rate, Instant::now());
            match taken {
                Ok(()) => break,
                Err(wait) => {
                    Stats::inc(&shared.stats.ingest_refused_rate);
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let format = if text.trim_start().starts_with('[') {
            Format::Json
        } else {
            Format::Ndjson
        };
        let reply = match parse_batch(text.as_bytes(), format) {
            Ok(items) => match apply_batch(&shared, items).await {
                Ok(mut outcome) => {
                    outcome.batch = Some(batch);
                    serde_json::to_string(&outcome)
                }
                Err(Unavailable(why)) => {
                    Stats::inc(&shared.stats.ingest_refused_unavailable);
                    serde_json::to_string(&json!({
                        "batch": batch,
                        "error": format!("{why}; nothing was applied: send the batch again"),
                        "retry_after_ms": 1000,
                    }))
                }
            },
            Err(e) => {
                Stats::inc(&shared.stats.ingest_refused_malformed);
                serde_json::to_string(&e.to_json(Some(batch)))
            }
        };
        // Invariant: both replies are plain JSON values, which always serialise.
        let reply = reply.expect("reply serialises");
        let sent = tokio::time::timeout(
            shared.args.write_timeout,
            sink.send(Message::Text(reply.into())),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            debug!("publisher stopped reading replies");
            break None;
        }
    };
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame)).await;
    }
    debug!(batches = batch, "closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_batch_json_array_object_and_wrong_top_level() {
        let items = parse_batch(br#"[{"id":"a"},{"id":"b"}]"#, Format::Json).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            parse_batch(br#"{"id":"a"}"#, Format::Json).unwrap().len(),
            1
        );
        let e = parse_batch(b"42", Format::Json).unwrap_err();
        assert!(e.message.contains("expected an array"), "{e:?}");
    }

    #[test]
    fn parse_batch_reports_line_and_column_of_a_syntax_error() {
        let e = parse_batch(
            b"[\n  {\"id\": \"a\",\n   \"lat\": 52.3.1}\n]",
            Format::Json,
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (3, 15), "{e:?}");
        let body = b"{\"id\":\"a\"}\n\n{\"id\":\"b\"}\r\n{\"id\": \"c\" oops}\n";
        let e = parse_batch(body, Format::Ndjson).unwrap_err();
        assert_eq!((e.line, e.column), (4, 12), "{e:?}");
        assert!(
            !e.message.contains(" at line "),
            "position is in fields: {e:?}"
        );
    }

    #[test]
    fn parse_batch_ndjson_skips_blank_lines_and_keeps_line_numbers() {
        let items = parse_batch(b"\n{\"id\":\"a\"}\n  \n{\"id\":\"b\"}", Format::Ndjson).unwrap();
        let lines: Vec<_> = items.iter().map(|i| i.line).collect();
        assert_eq!(lines, vec![Some(2), Some(4)]);
    }

    #[test]
    fn bearer_parses_scheme_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
