//! The pure core of publishing: which fixes go into the next request and when, what the
//! server's answer means, and the running tally. No clock and no sockets: the caller passes the
//! time since the start in and does the waiting and the sending.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::input::Record;
use crate::fleet::{format_time, parse_time};

/// Rejections kept for the summary; the rest are only counted.
pub const SHOWN_REJECTIONS: usize = 10;

/// A fix due to be sent: its index in the input, and for a replayed fix the offset from the
/// start (µs) whose wall-clock moment becomes its new `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Index into the records.
    pub index: usize,
    /// µs after the start that this fix represents; `None`: send it unchanged.
    pub offset_us: Option<u64>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these fixes in one request.
    Send(Vec<Planned>),
    /// Nothing is due yet: come back after this long.
    Wait(Duration),
    /// Every fix has been handed out.
    Done,
}

/// The order and pace in which fixes are sent.
#[derive(Debug, Clone)]
pub struct Plan {
    queue: Vec<Planned>,
    next: usize,
    batch: usize,
}

impl Plan {
    /// As fast as the server allows: input order, batches of `batch`, everything due at once.
    pub fn immediate(len: usize, batch: usize) -> Plan {
        Plan {
            queue: (0..len)
                .map(|index| Planned {
                    index,
                    offset_us: None,
                })
                .collect(),
            next: 0,
            batch: batch.max(1),
        }
    }

    /// At the recorded pace divided by `speed`: a fix recorded at `t` is due `(t - t0) / speed`
    /// after the start, `t0` being the earliest recorded time, and its `time` is rewritten to
    /// that moment. Fixes without a readable `time` are due at once and sent unchanged (the
    /// server then applies its own rules to them). Fixes due together share a request, up to
    /// `batch` per request.
    pub fn replay(records: &[Record], speed: f64, batch: usize) -> Plan {
        let times: Vec<Option<u64>> = records.iter().map(recorded_time).collect();
        let t0 = times.iter().flatten().min().copied().unwrap_or(0);
        let mut queue: Vec<Planned> = times
            .iter()
            .enumerate()
            .map(|(index, t)| Planned {
                index,
                offset_us: t.map(|t| ((t - t0) as f64 / speed).round() as u64),
            })
            .collect();
        // Stable: fixes due at the same moment keep their input order.
        queue.sort_by_key(|p| p.offset_us.unwrap_or(0));
        Plan {
            queue,
            next: 0,
            batch: batch.max(1),
        }
    }

    /// The fixes due `elapsed` after the start (at most one batch), or how long until the next
    /// one is due.
    pub fn next(&mut self, elapsed: Duration) -> Step {
        let Some(first) = self.queue.get(self.next) else {
            return Step::Done;
        };
        let now_us = elapsed.as_micros() as u64;
        let due = |p: &Planned| p.offset_us.unwrap_or(0) <= now_us;
        if !due(first) {
            return Step::Wait(Duration::from_micros(first.offset_us.unwrap_or(0) - now_us));
        }
        let end = (self.next + self.batch).min(self.queue.len());
        let count = self.queue[self.next..end]
            .iter()
            .take_while(|p| due(p))
            .count();
        let out = self.queue[self.next..self.next + count].to_vec();
        self.next += count;
        Step::Send(out)
    }

    /// Fixes not handed out yet.
    pub fn remaining(&self) -> usize {
        self.queue.len() - self.next
    }
}

/// A record's `time`, if it has one the server would read.
fn recorded_time(record: &Record) -> Option<u64> {
    record
        .fix
        .get("time")
        .and_then(Value::as_str)
        .and_then(|t| parse_time(t).ok())
}

/// The fix as it is sent: unchanged, or with `time` set to `start_us + offset_us` (µs since
/// the Unix epoch).
pub fn fix_to_send(record: &Record, planned: Planned, start_us: u64) -> Map<String, Value> {
    let mut fix = record.fix.clone();
    if let Some(offset) = planned.offset_us {
        fix.insert("time".into(), Value::String(format_time(start_us + offset)));
    }
    fix
}

/// Fixes as an NDJSON body, one object a line.
pub fn ndjson_body<'a>(fixes: impl IntoIterator<Item = &'a Map<String, Value>>) -> Vec<u8> {
    let mut body = Vec::new();
    for fix in fixes {
        // Invariant: a JSON map with string keys always serialises.
        serde_json::to_writer(&mut body, fix).expect("a JSON object serialises");
        body.push(b'\n');
    }
    body
}

/// One rejected fix as the server reports it (`index` into the batch).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerRejection {
    /// Index of the fix in the request.
    pub index: usize,
    /// The fix's id, if it had a readable one.
    #[serde(default)]
    pub id: Option<String>,
    /// Why.
    pub error: String,
}

/// The server's answer to an accepted request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Outcome {
    /// Fixes applied.
    pub accepted: usize,
    /// Fixes refused, each with its reason.
    pub rejected: Vec<ServerRejection>,
}

/// What an HTTP answer means for the batch that was sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The server looked at every fix.
    Applied(Outcome),
    /// 429: send the same batch again after this long.
    RateLimited(Duration),
    /// 5xx: maybe transient; send the same batch again after a backoff.
    Transient(String),
    /// Anything else: stop and tell the user this.
    Fatal(String),
}

/// The `error` text of a JSON error body, else the body as text (shortened).
fn server_message(body: &[u8]) -> String {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(msg) = json
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
    {
        return msg.to_string();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(no message)".into();
    }
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// Reads an HTTP answer to a batch of `lines.len()` fixes (`lines`: each fix's input line).
/// `retry_after` is the Retry-After header.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    lines: &[Option<usize>],
) -> Reply {
    let n = lines.len();
    match status {
        200..=299 => match serde_json::from_slice::<Outcome>(body) {
            Ok(o)
                if o.accepted + o.rejected.len() == n && o.rejected.iter().all(|r| r.index < n) =>
            {
                Reply::Applied(o)
            }
            Ok(o) => Reply::Fatal(format!(
                "the server's answer does not add up: {} accepted and {} rejected of {n} fixes \
                 sent",
                o.accepted,
                o.rejected.len()
            )),
            Err(e) => Reply::Fatal(format!(
                "HTTP {status} with an answer that is not an ingest reply ({e}): {}; is the \
                 URL a fleetcast server?",
                server_message(body)
            )),
        },
        429 => {
            let json: Option<Value> = serde_json::from_slice(body).ok();
            let ms = json
                .as_ref()
                .and_then(|v| v.get("retry_after_ms"))
                .and_then(Value::as_u64);
            let wait = match (ms, retry_after.and_then(|s| s.trim().parse::<u64>().ok())) {
                (Some(ms), _) => Duration::from_millis(ms),
                (None, Some(secs)) => Duration::from_secs(secs),
                (None, None) => Duration::from_secs(1),
            };
            Reply::RateLimited(wait)
        }
        400 => {
            let json: Option<Value> = serde_json::from_slice(body).ok();
            let line = json
                .as_ref()
                .and_then(|v| v.get("line"))
                .and_then(Value::as_u64)
                .and_then(|l| usize::try_from(l).ok());
            // The body is NDJSON, one fix a line: body line L is the batch's fix L - 1.
            let input_line = line
                .and_then(|l| l.checked_sub(1))
                .and_then(|i| lines.get(i).copied().flatten());
            let at = input_line.map_or(String::new(), |l| format!(" (input line {l})"));
            Reply::Fatal(format!(
                "the server refused a batch as malformed (400){at}: {}",
                server_message(body)
            ))
        }
        401 => Reply::Fatal(format!(
            "the server did not accept the token (401): {}; check --token or \
             FLEETCAST_PUBLISH_TOKEN against the server's --publish-token",
            server_message(body)
        )),
        404 => Reply::Fatal(format!(
            "404: {}; is ingest on (serve --feed ingest) and is the URL the server's HTTP \
             port?",
            server_message(body)
        )),
        413 => Reply::Fatal(format!(
            "413: {}; try a smaller --batch (this request had {n} fixes)",
            server_message(body)
        )),
        415 => Reply::Fatal(format!("415: {}", server_message(body))),
        500..=599 => Reply::Transient(format!("HTTP {status}: {}", server_message(body))),
        _ => Reply::Fatal(format!("HTTP {status}: {}", server_message(body))),
    }
}

/// How long to wait before retry number `attempt` (from 1) after a transient failure.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 250u64.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    Duration::from_millis(ms.min(8_000))
}

/// A rejected fix, located in the input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    /// 1-based input line of the fix (absent for generated fixes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The fix's id, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The server's reason.
    pub error: String,
}

/// Counts so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Fixes read (or generated).
    pub read: usize,
    /// Fixes the server answered for.
    pub sent: usize,
    /// Fixes applied.
    pub accepted: usize,
    /// Fixes refused.
    pub rejected: usize,
    /// Requests the server answered with 200.
    pub requests: usize,
    /// 429 answers waited out.
    pub rate_limited: usize,
    /// Requests sent again after a 5xx or a connection error.
    pub retries: usize,
    /// The first [`SHOWN_REJECTIONS`] rejections.
    pub rejections: Vec<Rejection>,
}

impl Tally {
    /// Counts the answer to a batch whose fixes came from input `lines`.
    pub fn add(&mut self, lines: &[Option<usize>], outcome: &Outcome) {
        self.requests += 1;
        self.sent += lines.len();
        self.accepted += outcome.accepted;
        self.rejected += outcome.rejected.len();
        for r in &outcome.rejected {
            if self.rejections.len() >= SHOWN_REJECTIONS {
                break;
            }
            self.rejections.push(Rejection {
                line: lines.get(r.index).copied().flatten(),
                id: r.id.clone(),
                error: r.error.clone(),
            });
        }
    }

    /// The live status: counts and rate, with a note (such as a wait) if any.
    pub fn progress_line(&self, elapsed: Duration, note: Option<&str>) -> String {
        let mut line = format!(
            "sent {} of {} fixes: {} accepted, {} rejected, {:.0} fixes/s",
            self.sent,
            self.read,
            self.accepted,
            self.rejected,
            rate(self.sent, elapsed)
        );
        if let Some(note) = note {
            line.push_str(" (");
            line.push_str(note);
            line.push(')');
        }
        line
    }
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// The end-of-run report (`--json` prints it as one object).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Fixes read from the input (or generated by the simulator).
    pub read: usize,
    /// Fixes the server answered for.
    pub sent: usize,
    /// Fixes applied.
    pub accepted: usize,
    /// Fixes refused.
    pub rejected: usize,
    /// Fixes never sent (the run stopped early).
    pub unsent: usize,
    /// Requests answered with 200.
    pub requests: usize,
    /// 429 answers waited out.
    pub rate_limited: usize,
    /// Requests sent again after a 5xx or a connection error.
    pub retries: usize,
    /// Wall-clock seconds from the first request to the end.
    pub elapsed_s: f64,
    /// Fixes sent per second.
    pub fixes_per_s: f64,
    /// The first rejections, with input line and reason.
    pub rejections: Vec<Rejection>,
}

impl Summary {
    /// The summary of `tally` after `elapsed`.
    pub fn new(tally: &Tally, elapsed: Duration) -> Summary {
        Summary {
            read: tally.read,
            sent: tally.sent,
            accepted: tally.accepted,
            rejected: tally.rejected,
            unsent: tally.read.saturating_sub(tally.sent),
            requests: tally.requests,
            rate_limited: tally.rate_limited,
            retries: tally.retries,
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            fixes_per_s: rate(tally.sent, elapsed).round(),
            rejections: tally.rejections.clone(),
        }
    }

    /// The human-readable report, several lines.
    pub fn text(&self) -> String {
        let mut out = format!(
            "read {} fixes, sent {} in {} requests: {} accepted, {} rejected; {:.1} s, {:.0} \
             fixes/s",
            self.read,
            self.sent,
            self.requests,
            self.accepted,
            self.rejected,
            self.elapsed_s,
            self.fixes_per_s
        );
        if self.rate_limited > 0 || self.retries > 0 {
            out.push_str(&format!(
                "; waited out {} rate limits, retried {} requests",
                self.rate_limited, self.retries
            ));
        }
        if self.unsent > 0 {
            out.push_str(&format!("\nNOT SENT: {} fixes", self.unsent));
        }
        if !self.rejections.is_empty() {
            out.push_str("\nrejected:");
            for r in &self.rejections {
                out.push_str("\n  ");
                if let Some(line) = r.line {
                    out.push_str(&format!("line {line}: "));
                }
                if let Some(id) = &r.id {
                    out.push_str(&format!("{id}: "));
                }
                out.push_str(&r.error);
            }
            let more = self.rejected.saturating_sub(self.rejections.len());
            if more > 0 {
                out.push_str(&format!("\n  ... and {more} more"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(line: usize, v: Value) -> Record {
        let Value::Object(fix) = v else {
            panic!("not an object")
        };
        Record {
            line: Some(line),
            fix,
        }
    }

    fn indices(step: Step) -> Vec<usize> {
        match step {
            Step::Send(p) => p.iter().map(|p| p.index).collect(),
            other => panic!("expected Send, got {other:?}"),
        }
    }

    #[test]
    fn plan_immediate_sends_input_order_in_batches() {
        let mut p = Plan::immediate(5, 2);
        let zero = Duration::ZERO;
        assert_eq!(indices(p.next(zero)), vec![0, 1]);
        assert_eq!(indices(p.next(zero)), vec![2, 3]);
        assert_eq!(p.remaining(), 1);
        assert_eq!(indices(p.next(zero)), vec![4]);
        assert_eq!(p.next(zero), Step::Done);
        assert_eq!(Plan::immediate(0, 500).next(zero), Step::Done);
    }

    #[test]
    fn plan_replay_paces_by_recorded_time_and_groups_due_fixes() {
        let t = |s: &str| format!("2026-11-22T10:00:{s}Z");
        let records = vec![
            record(1, json!({"id": "a", "time": t("02")})),
            record(2, json!({"id": "b", "time": t("00")})),
            record(3, json!({"id": "c"})),
            record(4, json!({"id": "a", "time": t("04")})),
            record(5, json!({"id": "b", "time": t("02.5")})),
            record(6, json!({"id": "d", "time": "not a time"})),
        ];
        let mut p = Plan::replay(&records, 2.0, 10);
        // At the start: the earliest fix and those without a usable time.
        match p.next(Duration::ZERO) {
            Step::Send(planned) => assert_eq!(
                planned,
                vec![
                    Planned {
                        index: 1,
                        offset_us: Some(0)
                    },
                    Planned {
                        index: 2,
                        offset_us: None
                    },
                    Planned {
                        index: 5,
                        offset_us: None
                    },
                ]
            ),
            other => panic!("{other:?}"),
        }
        // 2 s recorded at speed 2 is due after 1 s.
        assert_eq!(
            p.next(Duration::from_millis(400)),
            Step::Wait(Duration::from_millis(600))
        );
        assert_eq!(indices(p.next(Duration::from_millis(1300))), vec![0, 4]);
        assert_eq!(
            p.next(Duration::from_millis(1300)),
            Step::Wait(Duration::from_millis(700))
        );
        assert_eq!(indices(p.next(Duration::from_secs(5))), vec![3]);
        assert_eq!(p.next(Duration::from_secs(5)), Step::Done);
    }

    #[test]
    fn plan_replay_respects_the_batch_size_among_due_fixes() {
        let records: Vec<Record> = (0..5)
            .map(|i| {
                record(
                    i + 1,
                    json!({"id": i.to_string(), "time": "2026-11-22T10:00:00Z"}),
                )
            })
            .collect();
        let mut p = Plan::replay(&records, 1.0, 2);
        assert_eq!(indices(p.next(Duration::ZERO)), vec![0, 1]);
        assert_eq!(indices(p.next(Duration::ZERO)), vec![2, 3]);
        assert_eq!(indices(p.next(Duration::ZERO)), vec![4]);
    }

    #[test]
    fn fix_to_send_rewrites_only_replayed_times() {
        let r = record(
            1,
            json!({"id": "a", "time": "2026-11-22T10:00:02Z", "lat": 1.0}),
        );
        let start = crate::fleet::parse_time("2026-11-29T14:00:00Z").unwrap();
        let same = fix_to_send(
            &r,
            Planned {
                index: 0,
                offset_us: None,
            },
            start,
        );
        assert_eq!(same, r.fix);
        let moved = fix_to_send(
            &r,
            Planned {
                index: 0,
                offset_us: Some(1_234_567),
            },
            start,
        );
        assert_eq!(moved["time"], "2026-11-29T14:00:01.234567Z");
        assert_eq!(moved["lat"], 1.0);
        let body = ndjson_body([&r.fix, &moved]);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn classify_reads_each_status() {
        let lines = [Some(10), Some(11), Some(12)];
        let ok = br#"{"accepted":2,"rejected":[{"index":1,"line":2,"id":"b","error":"bad"}]}"#;
        match classify(200, None, ok, &lines) {
            Reply::Applied(o) => {
                assert_eq!(o.accepted, 2);
                assert_eq!(o.rejected[0].index, 1);
            }
            other => panic!("{other:?}"),
        }
        let short = br#"{"accepted":1,"rejected":[]}"#;
        assert!(
            matches!(classify(200, None, short, &lines), Reply::Fatal(m) if m.contains("does not add up"))
        );
        assert!(
            matches!(classify(200, None, b"<html>", &lines), Reply::Fatal(m) if m.contains("not an ingest reply"))
        );
        let limited = br#"{"error":"slow down","retry_after_ms":250}"#;
        assert_eq!(
            classify(429, Some("1"), limited, &lines),
            Reply::RateLimited(Duration::from_millis(250))
        );
        assert_eq!(
            classify(429, Some("2"), b"", &lines),
            Reply::RateLimited(Duration::from_secs(2))
        );
        assert_eq!(
            classify(429, None, b"", &lines),
            Reply::RateLimited(Duration::from_secs(1))
        );
        let malformed = br#"{"error":"malformed JSON at line 2 column 3","line":2,"column":3}"#;
        assert!(matches!(classify(400, None, malformed, &lines),
            Reply::Fatal(m) if m.contains("(input line 11)") && m.contains("malformed JSON at line 2")));
        assert!(
            matches!(classify(401, None, br#"{"error":"publisher token not accepted"}"#, &lines),
            Reply::Fatal(m) if m.contains("(401): publisher token not accepted"))
        );
        assert!(
            matches!(classify(404, None, b"", &lines), Reply::Fatal(m) if m.contains("--feed ingest"))
        );
        assert!(
            matches!(classify(413, None, br#"{"error":"too big"}"#, &lines),
            Reply::Fatal(m) if m.contains("too big") && m.contains("smaller --batch"))
        );
        assert!(
            matches!(classify(415, None, br#"{"error":"type"}"#, &lines), Reply::Fatal(m) if m == "415: type")
        );
        assert!(
            matches!(classify(503, None, b"busy", &lines), Reply::Transient(m) if m == "HTTP 503: busy")
        );
        assert!(matches!(classify(302, None, b"", &lines), Reply::Fatal(m) if m.contains("302")));
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(5), Duration::from_secs(4));
        assert_eq!(backoff(6), Duration::from_secs(8));
        assert_eq!(backoff(60), Duration::from_secs(8));
    }

    #[test]
    fn tally_locates_rejections_and_keeps_the_first_ten() {
        let mut t = Tally {
            read: 30,
            ..Tally::default()
        };
        let lines: Vec<Option<usize>> = (1..=15).map(Some).collect();
        let outcome = Outcome {
            accepted: 3,
            rejected: (0..12)
                .map(|i| ServerRejection {
                    index: i + 3,
                    id: Some(format!("car-{i}")),
                    error: "outside".into(),
                })
                .collect(),
        };
        t.add(&lines, &outcome);
        assert_eq!((t.sent, t.accepted, t.rejected, t.requests), (15, 3, 12, 1));
        assert_eq!(t.rejections.len(), SHOWN_REJECTIONS);
        assert_eq!(t.rejections[0].line, Some(4));
        let s = Summary::new(&t, Duration::from_secs(3));
        assert_eq!((s.unsent, s.fixes_per_s), (15, 5.0));
        let text = s.text();
        assert!(
            text.starts_with("read 30 fixes, sent 15 in 1 requests: 3 accepted, 12 rejected"),
            "{text}"
        );
        assert!(text.contains("\n  line 4: car-0: outside"), "{text}");
        assert!(text.contains("and 2 more"), "{text}");
        assert!(text.contains("NOT SENT: 15 fixes"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["rejections"][0],
            json!({"line": 4, "id": "car-0", "error": "outside"})
        );
        assert!(t
            .progress_line(Duration::from_secs(3), Some("rate limited"))
            .ends_with("5 fixes/s (rate limited)"));
    }
}
