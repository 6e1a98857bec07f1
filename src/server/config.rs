//! Options of `fleetcast serve`: every limit is a flag with an environment variable and a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::fleet::Area;
use crate::token::Secret;

/// The largest `--datagram-budget` a QUIC datagram can carry on any path.
///
/// quinn probes the path MTU up to 1,452-byte UDP payloads (its default upper bound, which
/// fleetcast keeps). A 1-RTT packet spends 1 byte of flags, the peer's connection ID (0 to 20
/// bytes), the 4 bytes quinn reserves for the packet number and a 16-byte AEAD tag; the datagram
/// frame reserves 9 more (`Datagram::SIZE_BOUND`), and the WebTransport header at least 1:
/// 1452 - 1 - 0 - 4 - 16 - 9 - 1 = 1421. A larger budget could never be sent whole, so every
/// tick would be encoded twice. (quinn's `max_datagram_size()` read 1,421 on loopback.)
pub const MAX_DATAGRAM_BUDGET: usize = 1421;

/// Longest WebTransport datagram header (a quarter stream id as a QUIC varint).
const MAX_WEBTRANSPORT_HEADER: usize = 8;

/// Shortest `--idle-timeout`.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest timeout of any kind: beyond it a client or an orchestrator has long given up, and a
/// deadline of "now + timeout" stays far from overflowing.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Parses durations such as `500ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 500ms, 5s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("unknown unit in '{s}' (use ms, s, m, h or d)")),
    };
    // `try_from`: a huge number must be an error, not a panic.
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is not a valid duration"))
}

/// Parses byte sizes such as `4194304`, `64KiB`, `4MiB`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else if let Some(n) = s.strip_suffix('B') {
        (n, 1)
    } else {
        (s, 1)
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 65536, 64KiB or 4MiB"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// `fleetcast serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// UDP address for WebTransport (HTTP/3). `[::]` accepts IPv4 and IPv6.
    #[arg(long, env = "FLEETCAST_WT_LISTEN", default_value = "[::]:4433")]
    pub wt_listen: SocketAddr,

    /// TCP address for HTTP: web demo, certificate hash, health.
    #[arg(long, env = "FLEETCAST_HTTP_LISTEN", default_value = "[::]:8080")]
    pub http_listen: SocketAddr,

    /// Time between ticks, milliseconds.
    #[arg(long, env = "FLEETCAST_TICK_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(10..=60_000))]
    pub tick_ms: u32,

    /// Where cars come from: `sim` (the built-in simulator), `ingest` (publishers over HTTP and
    /// WebSocket, see `--publish-token`), or both: `sim,ingest`.
    #[arg(
        long,
        env = "FLEETCAST_FEED",
        value_delimiter = ',',
        default_value = "sim"
    )]
    pub feed: Vec<Feed>,

    #[command(flatten)]
    pub area: AreaArgs,

    #[command(flatten)]
    pub sim: SimArgs,

    #[command(flatten)]
    pub ingest: IngestArgs,

    #[command(flatten)]
    pub cluster: ClusterArgs,

    /// Largest datagram payload the server encodes a tick into, bytes. Below QUIC's guaranteed
    /// minimum so one encoding fits every session; smaller sessions get their own encoding.
    /// At most 1421, the most a QUIC datagram can carry.
    #[arg(long, env = "FLEETCAST_DATAGRAM_BUDGET", default_value_t = 1100,
          value_parser = clap::value_parser!(u32).range(64..=65_000))]
    pub datagram_budget: u32,

    /// Validity of each self-signed certificate (at most 14 days: browsers refuse longer ones
    /// by hash). A running server renews it: the next hash is published with half the validity
    /// left, new connections switch to it with a quarter left.
    #[arg(long, env = "FLEETCAST_CERT_VALIDITY", default_value = "13d",
          value_parser = parse_duration)]
    pub cert_validity: Duration,

    /// How often --cert and --key are checked for a change (they are also reloaded on SIGHUP).
    #[arg(long, env = "FLEETCAST_CERT_RELOAD_CHECK", default_value = "10s",
          value_parser = parse_duration)]
    pub cert_reload_check: Duration,

    /// Directory for the self-signed certificate and key.
    #[arg(long, env = "FLEETCAST_CERT_DIR", default_value = "certs")]
    pub cert_dir: PathBuf,

    /// Extra DNS names or IP addresses for the self-signed certificate (localhost, 127.0.0.1
    /// and ::1 are always included).
    #[arg(
        long = "cert-name",
        env = "FLEETCAST_CERT_NAMES",
        value_delimiter = ','
    )]
    pub cert_name: Vec<String>,

    /// PEM certificate chain issued by a CA (instead of the self-signed one). Needs --key.
    #[arg(long, env = "FLEETCAST_CERT", requires = "key")]
    pub cert: Option<PathBuf>,

    /// PEM private key for --cert.
    #[arg(long, env = "FLEETCAST_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Extra allowed Origin for WebTransport sessions, e.g. https://fleet.example; `*` allows
    /// any origin. The server's own HTTP origins on localhost are always allowed.
    #[arg(long, env = "FLEETCAST_ALLOW_ORIGIN", value_delimiter = ',')]
    pub allow_origin: Vec<String>,

    /// Most WebTransport sessions open at once; more get 429.
    #[arg(long, env = "FLEETCAST_MAX_SESSIONS", default_value_t = 50_000)]
    pub max_sessions: usize,

    /// Most sessions (both transports) one client address may hold; more get 429. An IPv6
    /// client counts by its /64. Raise it when many screens share one NAT address.
    #[arg(long, env = "FLEETCAST_MAX_SESSIONS_PER_IP", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions_per_ip: u32,

    /// QUIC handshakes one client address may start per second (bursts of one second's worth);
    /// more are refused, or asked to validate their address first.
    #[arg(long, env = "FLEETCAST_HANDSHAKES_PER_IP", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub handshakes_per_ip: u32,

    /// Apply the per-address limits (sessions, handshakes, HTTP connections) to loopback
    /// clients too (off: local tools and a reverse proxy on this machine all come from
    /// loopback).
    #[arg(long, env = "FLEETCAST_LIMIT_LOOPBACK")]
    pub limit_loopback: bool,

    /// With more handshakes than this in progress, a new client must first prove its address
    /// with a QUIC Retry (one extra round trip), so spoofed sources cost no handshake work.
    /// 0: always.
    #[arg(long, env = "FLEETCAST_VALIDATE_ABOVE", default_value_t = 1024)]
    pub validate_above: usize,

    /// Most QUIC handshakes in progress at once (at least 1); further connection attempts are
    /// refused.
    #[arg(long, env = "FLEETCAST_MAX_HANDSHAKES", default_value_t = 4096)]
    pub max_handshakes: usize,

    /// Longest time from a client's first packet to its WebTransport CONNECT request.
    #[arg(long, env = "FLEETCAST_HANDSHAKE_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A session with no packets from the client for this long is closed.
    #[arg(long, env = "FLEETCAST_IDLE_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Longest time a write on a session's reliable stream may wait for the client, and longest
    /// time the answer to a session request (accept, 401, 403, 404, 429) may wait for it.
    #[arg(long, env = "FLEETCAST_WRITE_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Longest time shutdown waits for sessions and HTTP connections to finish, whatever the
    /// clients do; then they are dropped (closing the QUIC endpoint takes at most 1 s more).
    #[arg(long, env = "FLEETCAST_SHUTDOWN_TIMEOUT", default_value = "5s",
          value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Longest time an HTTP client may take to send a request's headers, and longest time a
    /// kept-alive HTTP connection may sit idle between requests (WebSocket handshakes included).
    #[arg(long, env = "FLEETCAST_HTTP_HEADER_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Most TCP connections open at once from one client address (IPv4, or IPv6 /64) on the
    /// HTTP port (WebSocket sessions included); more are answered 429 and closed.
    #[arg(long, env = "FLEETCAST_MAX_HTTP_CONNS_PER_IP", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_http_conns_per_ip: u32,

    /// For tests: set the soft limit of open files to N at start-up instead of raising it to
    /// the hard limit.
    #[arg(long, env = "FLEETCAST_DANGER_MAX_OPEN_FILES", hide = true)]
    pub danger_max_open_files: Option<u64>,

    /// UDP socket send and receive buffer to ask the kernel for (per socket: per shard with
    /// `--engine proto`).
    #[arg(long, env = "FLEETCAST_UDP_BUFFER", default_value = "4MiB", value_parser = parse_bytes)]
    pub udp_buffer: usize,

    /// The WebTransport server: `proto`, fleetcast's own engine on quinn-proto (shards with
    /// batched sends, CLOSE_WEBTRANSPORT_SESSION), or `quinn`, the wtransport server with one
    /// task per connection.
    #[arg(long, env = "FLEETCAST_ENGINE", value_enum, default_value_t = Engine::Proto)]
    pub engine: Engine,

    /// Shards of `--engine proto`: event loops, each on its own thread with its own UDP socket
    /// (default: one per core).
    #[arg(long, env = "FLEETCAST_SHARDS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub shards: Option<u16>,

    /// Per-session QUIC datagram send queue; when full the oldest datagram is dropped.
    #[arg(long, env = "FLEETCAST_DATAGRAM_SEND_BUFFER", default_value = "32KiB",
          value_parser = parse_bytes)]
    pub datagram_send_buffer: usize,

    /// Per-session QUIC datagram receive buffer (clients send none in protocol v1).
    #[arg(long, env = "FLEETCAST_DATAGRAM_RECV_BUFFER", default_value = "8KiB",
          value_parser = parse_bytes)]
    pub datagram_recv_buffer: usize,

    /// Read buffer of each WebSocket session (clients send at most 4 KiB messages in v1; the
    /// library's default, 128 KiB, made every idle session cost ~130 KB).
    #[arg(long, env = "FLEETCAST_WS_READ_BUFFER", default_value = "4KiB",
          value_parser = parse_bytes)]
    pub ws_read_buffer: usize,

    /// Write buffer of each WebSocket session before it writes to the socket (every message is
    /// flushed at once anyway; 0 writes each message eagerly).
    #[arg(long, env = "FLEETCAST_WS_WRITE_BUFFER", default_value = "0", value_parser = parse_bytes)]
    pub ws_write_buffer: usize,

    /// Require a subscriber token (`?token=JWT`, HS256) signed with this secret (at least 32
    /// bytes) on both transports; without one (and without --subscribe-secret-file) no token is
    /// needed. Mint tokens with `fleetcast token`.
    #[arg(long, env = "FLEETCAST_SUBSCRIBE_SECRET", hide_env_values = true,
          value_parser = QuietParser::<Secret>::new())]
    pub subscribe_secret: Option<Secret>,

    /// Like --subscribe-secret, with the secret on the first line of this file (trimmed); wins
    /// over --subscribe-secret.
    #[arg(long, env = "FLEETCAST_SUBSCRIBE_SECRET_FILE")]
    pub subscribe_secret_file: Option<PathBuf>,

    /// Directory of static files served over HTTP.
    #[arg(long, env = "FLEETCAST_WEB_ROOT", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/web-demo"))]
    pub web_root: PathBuf,
}

impl ServeArgs {
    /// Checks option combinations that each option alone cannot; returns the served area and
    /// the publisher tokens.
    pub fn check(&self) -> Result<(Area, Vec<PublishToken>), String> {
        let area = self.area.area()?;
        let tokens = self.ingest.tokens()?;
        if self.feed.is_empty() {
            return Err("--feed needs sim, ingest or both".into());
        }
        let ingest = self.feed.contains(&Feed::Ingest);
        if ingest && tokens.is_empty() {
            return Err("--feed ingest needs at least one --publish-token (or \
                        FLEETCAST_PUBLISH_TOKEN, or --publish-token-file)"
                .into());
        }
        if self.sim.churn_ticks > 0 && !self.feed.contains(&Feed::Sim) {
            return Err("--churn-ticks needs the simulator (--feed sim)".into());
        }
        if self.feed.contains(&Feed::Sim) && self.sim.churn_ticks > 0 && self.sim.cars == 0 {
            return Err("--churn-ticks needs at least one simulated car (--cars)".into());
        }
        self.check_limits()?;
        let cluster = &self.cluster;
        if cluster.enabled() && cluster.lease < Duration::from_millis(500) {
            return Err("--lease must be at least 500ms".into());
        }
        for url in &cluster.servers {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "--servers {url:?}: give base URLs like https://HOST:PORT"
                ));
            }
        }
        if !ingest && !tokens.is_empty() {
            // FLEETCAST_PUBLISH_TOKEN may be exported for `fleetcast publish` on this machine:
            // not an error, but ingest stays off.
            tracing::warn!("publisher tokens given, but --feed has no ingest: ingest is off");
            return Ok((area, Vec::new()));
        }
        Ok((area, tokens))
    }

    /// Limits that no server could work with.
    fn check_limits(&self) -> Result<(), String> {
        if self.datagram_budget as usize > MAX_DATAGRAM_BUDGET {
            return Err(format!(
                "--datagram-budget {} is more than a QUIC datagram can carry ({MAX_DATAGRAM_BUDGET})",
                self.datagram_budget
            ));
        }
        // Each session's send queue must hold at least one whole datagram, or every tick is
        // dropped before it is sent.
        let datagram = self.datagram_budget as usize + MAX_WEBTRANSPORT_HEADER;
        if self.datagram_send_buffer < datagram {
            return Err(format!(
                "--datagram-send-buffer {} B cannot hold one datagram of --datagram-budget {} B \
                 (needs at least {datagram} B)",
                self.datagram_send_buffer, self.datagram_budget
            ));
        }
        if self.max_sessions == 0 {
            return Err("--max-sessions 0 would refuse every session".into());
        }
        if self.max_handshakes == 0 {
            return Err("--max-handshakes 0 would refuse every connection".into());
        }
        if self.cert_validity > crate::certs::MAX_VALIDITY
            || self.cert_validity < Duration::from_secs(4)
        {
            return Err(format!(
                "--cert-validity {:?} must be between 4s and 14d (browsers refuse longer \
                 certificates by hash)",
                self.cert_validity
            ));
        }
        let nonzero = [
            ("--handshake-timeout", self.handshake_timeout),
            ("--write-timeout", self.write_timeout),
            ("--http-header-timeout", self.http_header_timeout),
        ];
        for (name, value) in nonzero {
            if value.is_zero() {
                return Err(format!("{name} 0 would fail every client"));
            }
        }
        // quinn reads an idle timeout of 0 as "never"; below a second the keep-alives needed
        // between slow ticks (a third of it) would cost more than the sessions.
        if self.idle_timeout < MIN_IDLE_TIMEOUT {
            return Err(format!(
                "--idle-timeout must be at least {MIN_IDLE_TIMEOUT:?} (0 would mean never)"
            ));
        }
        let bounded = [
            ("--handshake-timeout", self.handshake_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--write-timeout", self.write_timeout),
            ("--http-header-timeout", self.http_header_timeout),
            ("--shutdown-timeout", self.shutdown_timeout),
        ];
        for (name, value) in bounded {
            if value > MAX_TIMEOUT {
                return Err(format!(
                    "{name} {value:?} is longer than {MAX_TIMEOUT:?}: clients and orchestrators \
                     give up long before"
                ));
            }
        }
        if self.danger_max_open_files == Some(0) {
            return Err("--danger-max-open-files 0 leaves no file for the listeners".into());
        }
        Ok(())
    }

    /// Names the self-signed certificate must cover.
    pub fn cert_names(&self) -> Vec<String> {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for n in &self.cert_name {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    /// Reads --subscribe-secret-file, if given, into `subscribe_secret`, so the rest of the
    /// server finds the secret in one place.
    pub fn resolve_subscribe_secret(mut self) -> anyhow::Result<Self> {
        if let Some(path) = &self.subscribe_secret_file {
            self.subscribe_secret = Some(read_secret_file(path)?);
        }
        Ok(self)
    }

    /// Defaults for tests and embedding: ephemeral ports on loopback.
    pub fn ephemeral(cert_dir: PathBuf) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ServeArgs,
        }
        let mut args = Wrapper::parse_from(["fleetcast"]).args;
        args.wt_listen = "[::1]:0".parse().expect("literal address");
        args.http_listen = "127.0.0.1:0".parse().expect("literal address");
        args.cert_dir = cert_dir;
        args
    }
}

/// Which WebTransport server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// fleetcast's own QUIC, HTTP/3 and WebTransport server on quinn-proto.
    Proto,
    /// wtransport on quinn: one task per connection. (`wtransport` is accepted too, as in
    /// `swarm --engine`.)
    #[value(alias = "wtransport")]
    Quinn,
}

/// Which sources fill the fleet state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Feed {
    /// The built-in simulator drives `--cars` cars on a grid of streets.
    Sim,
    /// Publishers send real positions to `/v1/positions` and `/v1/publish.ws`.
    Ingest,
}

/// The served area: a square from an origin, or a bounding box. Shared by `serve` and `sim`.
#[derive(Debug, Clone, Args)]
pub struct AreaArgs {
    /// Latitude of the served area's south-west corner, degrees.
    #[arg(
        long,
        env = "FLEETCAST_ORIGIN_LAT",
        default_value_t = 52.35,
        allow_negative_numbers = true
    )]
    pub origin_lat: f64,

    /// Longitude of the served area's south-west corner, degrees.
    #[arg(
        long,
        env = "FLEETCAST_ORIGIN_LON",
        default_value_t = 4.86,
        allow_negative_numbers = true
    )]
    pub origin_lon: f64,

    /// Side of the square served area, metres. Position steps are side / 65535, rounded up to
    /// whole centimetres (4 km: 7 cm).
    #[arg(long, env = "FLEETCAST_AREA_M", default_value_t = 4000.0)]
    pub area_m: f64,

    /// The served area as `south,west,north,east` degrees, instead of --origin-lat,
    /// --origin-lon and --area-m. Fixes outside it are rejected.
    #[arg(long, env = "FLEETCAST_BBOX", value_parser = parse_bbox, allow_hyphen_values = true,
          conflicts_with_all = ["origin_lat", "origin_lon", "area_m"])]
    pub bbox: Option<Bbox>,
}

/// A bounding box, degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bbox {
    /// Southern edge.
    pub south: f64,
    /// Western edge.
    pub west: f64,
    /// Northern edge.
    pub north: f64,
    /// Eastern edge.
    pub east: f64,
}

/// Parses `south,west,north,east`.
pub fn parse_bbox(s: &str) -> Result<Bbox, String> {
    let parts: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}' is not south,west,north,east in degrees"))?;
    let [south, west, north, east] = parts[..] else {
        return Err(format!("'{s}' needs four numbers: south,west,north,east"));
    };
    let bbox = Bbox {
        south,
        west,
        north,
        east,
    };
    Area::bbox(south, west, north, east)?;
    Ok(bbox)
}

impl AreaArgs {
    /// The area these options describe.
    pub fn area(&self) -> Result<Area, String> {
        match self.bbox {
            Some(b) => Area::bbox(b.south, b.west, b.north, b.east),
            None => Area::square(self.origin_lat, self.origin_lon, self.area_m),
        }
    }
}

/// The built-in simulator. Shared by `serve --feed sim` and `fleetcast sim`.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Number of simulated cars.
    #[arg(long, env = "FLEETCAST_CARS", default_value_t = 100)]
    pub cars: u32,

    /// Distance between parallel streets in the simulated grid, metres.
    #[arg(long, env = "FLEETCAST_BLOCK_M", default_value_t = 400.0)]
    pub block_m: f64,

    /// Seed of the simulator.
    #[arg(long, env = "FLEETCAST_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Every this many ticks one car leaves the fleet and a new one joins (0: never). Exercises
    /// the reliable roster events.
    #[arg(long, env = "FLEETCAST_CHURN_TICKS", default_value_t = 0)]
    pub churn_ticks: u64,
}

impl SimArgs {
    /// The simulator's configuration over a square of `side_m` metres.
    pub fn config(&self, side_m: f64) -> crate::sim::SimConfig {
        crate::sim::SimConfig {
            cars: self.cars,
            area_m: side_m,
            block_m: self.block_m,
            seed: self.seed,
        }
    }
}

/// A publisher token: compared in constant time, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PublishToken(String);

impl PublishToken {
    /// Wraps a token.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the few places that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PublishToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for PublishToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() < 16 {
            return Err("a token must be at least 16 characters".into());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a token must not contain spaces or control characters".into());
        }
        Ok(PublishToken(s.to_string()))
    }
}

/// Many nodes joined by NATS (`--nats`): see `docs/deploy.md`.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// NATS server URL(s) to join a cluster of fleetcast nodes through (comma-separated or
    /// repeated: the servers of one NATS cluster). Without it, this process is the whole
    /// deployment and nothing else is needed.
    #[arg(long, env = "FLEETCAST_NATS", value_delimiter = ',')]
    pub nats: Vec<String>,

    /// NATS authentication token.
    #[arg(long, env = "FLEETCAST_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,

    /// NATS user name (with --nats-password).
    #[arg(long, env = "FLEETCAST_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,

    /// NATS password (with --nats-user).
    #[arg(
        long,
        env = "FLEETCAST_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,

    /// NATS credentials file (JWT and NKey seed, as `nsc` writes it).
    #[arg(long, env = "FLEETCAST_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// Prefix of every NATS subject and bucket this deployment uses: nodes with the same
    /// prefix form one cluster; several deployments can share one NATS.
    #[arg(long, env = "FLEETCAST_NATS_PREFIX", default_value = "fleetcast",
          value_parser = parse_nats_prefix)]
    pub nats_prefix: String,

    /// JetStream replicas of the lease and fleet buckets: 1 on a single NATS server, 3 on a NATS
    /// cluster so the buckets survive a NATS server (only when the buckets are created).
    #[arg(long, env = "FLEETCAST_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,

    /// How long the ticker's lease lasts without renewal: after the ticker dies, another node
    /// ticks within this plus one tick interval. Renewed every third of it.
    #[arg(long, env = "FLEETCAST_LEASE", default_value = "3s", value_parser = parse_duration)]
    pub lease: Duration,

    /// This node's name in `/healthz`, `/metrics` and the ticker lease; default: host name and
    /// process id.
    #[arg(long, env = "FLEETCAST_NODE_NAME")]
    pub node_name: Option<String>,

    /// Base URLs of every node's HTTP side (comma-separated, e.g.
    /// `https://a.fleet.example:8080,https://b.fleet.example:8080`), listed in `/config.json`
    /// as `servers` so clients can move to another node when theirs goes away.
    #[arg(long, env = "FLEETCAST_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
}

impl ClusterArgs {
    /// Whether this node is part of a cluster.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// The node's name: `--node-name`, else host name and process id.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// A NATS subject token and bucket-name prefix: letters, digits, `-` and `_`.
fn parse_nats_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 32 {
        return Err("1-32 characters".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(
            "only letters, digits, '-' and '_' (it names NATS subjects and buckets)".into(),
        );
    }
    Ok(s.to_string())
}

/// Position ingest: publishers, their tokens and limits.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// A token publishers send as `Authorization: Bearer TOKEN` (repeatable; at least 16
    /// characters). Each token has its own rate limit.
    #[arg(long, env = "FLEETCAST_PUBLISH_TOKEN", value_delimiter = ',', hide_env_values = true,
          value_parser = QuietParser::<PublishToken>::new())]
    pub publish_token: Vec<PublishToken>,

    /// A file of publisher tokens, one per line (blank lines and `#` comments skipped).
    #[arg(long, env = "FLEETCAST_PUBLISH_TOKEN_FILE")]
    pub publish_token_file: Option<PathBuf>,

    /// Largest ingest request body (or streaming message), bytes; larger ones get 413.
    #[arg(long, env = "FLEETCAST_MAX_INGEST_BODY", default_value = "1MiB",
          value_parser = parse_bytes)]
    pub max_ingest_body: usize,

    /// Ingest requests (or streaming batches) per second per token; more get 429 with
    /// Retry-After. Bursts of up to one second's worth pass.
    #[arg(long, env = "FLEETCAST_INGEST_RATE", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ingest_rate: u32,

    /// A publisher's car that reports nothing for this long leaves the fleet.
    #[arg(long, env = "FLEETCAST_CAR_TIMEOUT", default_value = "5m",
          value_parser = parse_duration)]
    pub car_timeout: Duration,

    /// Most publishers' cars in the fleet; fixes for new cars beyond it are rejected.
    #[arg(long, env = "FLEETCAST_MAX_CARS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_cars: u32,
}

impl IngestArgs {
    /// Every publisher token: the options' and the token file's.
    pub fn tokens(&self) -> Result<Vec<PublishToken>, String> {
        let mut tokens = self.publish_token.clone();
        if let Some(path) = &self.publish_token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let token = line
                    .parse::<PublishToken>()
                    .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
                tokens.push(token);
            }
        }
        Ok(tokens)
    }
}

/// Parses a secret option (a signing secret, a token). Unlike clap's own parsers, its errors
/// never quote the value: even a rejected secret must not reach a terminal or a log.
#[derive(Debug)]
pub struct QuietParser<T>(std::marker::PhantomData<fn() -> T>);

impl<T> QuietParser<T> {
    /// A parser for `T`.
    pub fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T> Default for QuietParser<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for QuietParser<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> clap::builder::TypedValueParser for QuietParser<T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Display,
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        use clap::error::{Error, ErrorKind};
        let name = arg.map_or_else(|| "the secret".to_string(), |a| a.to_string());
        let text = value.to_str().ok_or_else(|| {
            Error::raw(ErrorKind::InvalidUtf8, format!("{name} is not UTF-8\n")).with_cmd(cmd)
        })?;
        text.parse::<T>().map_err(|e| {
            Error::raw(ErrorKind::ValueValidation, format!("{name}: {e}\n")).with_cmd(cmd)
        })
    }
}

/// Reads a secret from the first line of a file (trimmed).
pub fn read_secret_file(path: &std::path::Path) -> anyhow::Result<Secret> {
    let contents = std::fs::read_to_string(path)
        .with_context(|| format!("reading the secret file {}", path.display()))?;
    Secret::from_file_contents(&contents)
        .with_context(|| format!("the secret in {}", path.display()))
}

/// Normalised allowed origins: the server's own on localhost plus `extra`.
pub fn allowed_origins(extra: &[String], http_port: u16) -> Vec<String> {
    let mut out: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .flat_map(|host| {
            [
                normalise_origin(&format!("http://{host}:{http_port}")),
                normalise_origin(&format!("https://{host}:{http_port}")),
            ]
        })
        .collect();
    out.extend(extra.iter().map(|o| normalise_origin(o)));
    out
}

/// Lowercase, without a trailing slash, and without the scheme's default port (browsers omit
/// `:443` for https and `:80` for http in the Origin header).
pub fn normalise_origin(origin: &str) -> String {
    let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let default_port = if o.starts_with("https://") {
        ":443"
    } else if o.starts_with("http://") {
        ":80"
    } else {
        return o;
    };
    match o.strip_suffix(default_port) {
        Some(bare) => bare.to_string(),
        None => o,
    }
}

/// Whether a session request with this Origin header may open.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(o) => {
            let o = normalise_origin(o);
            allowed.iter().any(|a| a == "*" || *a == o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_duration_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        // Too large for a Duration: an error, not a panic.
        assert!(parse_duration("99999999999999999999999h").is_err());
    }

    fn args() -> ServeArgs {
        ServeArgs::ephemeral(PathBuf::from("unused"))
    }

    /// `check`'s error for `args` after `tweak`.
    fn refusal(tweak: impl FnOnce(&mut ServeArgs)) -> String {
        let mut a = args();
        tweak(&mut a);
        match a.check() {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn check_accepts_the_defaults_and_the_largest_budget() {
        assert!(args().check().is_ok());
        let mut a = args();
        a.datagram_budget = MAX_DATAGRAM_BUDGET as u32;
        a.idle_timeout = MIN_IDLE_TIMEOUT;
        a.shutdown_timeout = Duration::ZERO;
        assert!(a.check().is_ok());
    }

    #[test]
    fn check_refuses_impossible_combinations_naming_the_option() {
        type Tweak = Box<dyn FnOnce(&mut ServeArgs)>;
        let cases: Vec<(&str, Tweak)> = vec![
            ("--datagram-budget", Box::new(|a| a.datagram_budget = 1422)),
            (
                "--datagram-budget",
                Box::new(|a| a.datagram_budget = 65_000),
            ),
            (
                "--datagram-send-buffer",
                Box::new(|a| a.datagram_send_buffer = 1000),
            ),
            ("--max-sessions", Box::new(|a| a.max_sessions = 0)),
            ("--max-handshakes", Box::new(|a| a.max_handshakes = 0)),
            (
                "--handshake-timeout",
                Box::new(|a| a.handshake_timeout = Duration::ZERO),
            ),
            (
                "--write-timeout",
                Box::new(|a| a.write_timeout = Duration::ZERO),
            ),
            (
                "--http-header-timeout",
                Box::new(|a| a.http_header_timeout = Duration::ZERO),
            ),
            (
                "--idle-timeout",
                Box::new(|a| a.idle_timeout = Duration::ZERO),
            ),
            (
                "--idle-timeout",
                Box::new(|a| a.idle_timeout = Duration::from_millis(999)),
            ),
            (
                "--shutdown-timeout",
                Box::new(|a| a.shutdown_timeout = MAX_TIMEOUT + Duration::from_secs(1)),
            ),
            (
                "--idle-timeout",
                Box::new(|a| a.idle_timeout = Duration::from_secs(100_000)),
            ),
            (
                "--churn-ticks",
                Box::new(|a| {
                    a.sim.churn_ticks = 3;
                    a.sim.cars = 0;
                }),
            ),
            (
                "--churn-ticks",
                Box::new(|a| {
                    a.sim.churn_ticks = 3;
                    a.feed = vec![Feed::Ingest];
                    a.ingest.publish_token = vec![PublishToken::new("0123456789abcdef")];
                }),
            ),
            (
                "--danger-max-open-files",
                Box::new(|a| a.danger_max_open_files = Some(0)),
            ),
        ];
        for (option, tweak) in cases {
            let e = refusal(tweak);
            assert!(e.contains(option), "{option}: {e}");
        }
    }

    #[test]
    fn parse_bytes_units() {
        assert_eq!(parse_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn origin_rules() {
        let allowed = allowed_origins(&["https://Fleet.example/".into()], 8080);
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&allowed, Some("http://localhost:8080")));
        assert!(origin_allowed(&allowed, Some("http://[::1]:8080")));
        assert!(origin_allowed(&allowed, Some("https://fleet.example")));
        assert!(!origin_allowed(&allowed, Some("http://localhost:9999")));
        assert!(!origin_allowed(&allowed, Some("https://evil.example")));
        let any = allowed_origins(&["*".into()], 8080);
        assert!(origin_allowed(&any, Some("https://evil.example")));
    }

    #[test]
    fn origin_default_ports_match_origins_without_them() {
        // Browsers omit :443 and :80 from Origin: the server's own page on 443 must match.
        let own = allowed_origins(&[], 443);
        assert!(origin_allowed(&own, Some("https://localhost")));
        assert!(!origin_allowed(&own, Some("http://localhost")));
        let own = allowed_origins(&[], 80);
        assert!(origin_allowed(&own, Some("http://[::1]")));
        let extra = allowed_origins(
            &[
                "https://fleet.example:443".into(),
                "http://map.example".into(),
            ],
            8080,
        );
        assert!(origin_allowed(&extra, Some("https://fleet.example")));
        assert!(origin_allowed(&extra, Some("http://map.example:80")));
        assert!(!origin_allowed(&extra, Some("https://fleet.example:4430")));
        assert!(!origin_allowed(&extra, Some("http://fleet.example")));
    }
}
