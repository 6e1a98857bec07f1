//! Native WebTransport client: connects, reads the reliable stream, receives datagrams.
//!
//! A thin shell over wtransport; what the bytes mean is decided by [`crate::proto`]. Used by
//! `fleetcast watch`, the load generator and the tests.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use wtransport::endpoint::endpoint_side;
use wtransport::endpoint::ConnectOptions;
use wtransport::error::{ConnectingError, ConnectionError};
use wtransport::tls::{Sha256Digest, Sha256DigestFmt};
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, VarInt};

use crate::proto::wire::{CloseCode, DecodeError, FrameDecoder, StreamMessage, PROTOCOL_VERSION};

/// How the client trusts the server's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Accept only certificates with one of these SHA-256 hashes (self-signed, <= 14 days).
    Hashes(Vec<Sha256Digest>),
    /// Verify against the system's root certificates.
    SystemRoots,
}

/// Where the server is and how to trust it: the options `watch` and `swarm` share.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Session URL.
    #[arg(
        long,
        env = "FLEETCAST_URL",
        default_value = "https://localhost:4433/positions"
    )]
    pub url: String,

    /// Instead of --url: the HTTP base URL of a fleetcast node (`http://HOST:8080`;
    /// comma-separated or repeated for several nodes). The session URL and certificate hashes
    /// come from its `/config.json` and `/certificate.sha256`, the nodes its `/config.json`
    /// lists under `servers` join the list, and each new connection goes to the next node, so
    /// a client whose node dies moves on.
    #[arg(
        long,
        env = "FLEETCAST_SERVER",
        value_delimiter = ',',
        conflicts_with = "url"
    )]
    pub server: Vec<String>,

    /// Trust a self-signed certificate with this SHA-256 (hex). Overrides --cert-hash-url.
    #[arg(long, env = "FLEETCAST_CERT_HASH")]
    pub cert_hash: Option<String>,

    /// Where to fetch the certificate hash; default `http://HOST:8080/certificate.sha256` for
    /// the URL's host. A 404 there means a CA-issued certificate: the system roots are used;
    /// `none` uses them without asking (a server whose HTTP side speaks HTTPS).
    #[arg(long, env = "FLEETCAST_CERT_HASH_URL")]
    pub cert_hash_url: Option<String>,

    /// Origin header to send (browsers always send one; native clients need not).
    #[arg(long, env = "FLEETCAST_ORIGIN")]
    pub origin: Option<String>,

    /// Subscriber token for a server started with --subscribe-secret (see `fleetcast token`);
    /// added to the session URL as `?token=...`.
    #[arg(long, env = "FLEETCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ConnectArgs {
    /// Options for `url` with every other field at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            server: Vec::new(),
            cert_hash: None,
            cert_hash_url: None,
            origin: None,
            token: None,
        }
    }

    /// The session URL to connect to: `--url` with `?token=...` when a token is given.
    pub fn session_url(&self) -> String {
        with_token(&self.url, self.token.as_deref())
    }

    /// The certificate hash URL: the one given, else `http://HOST:8080/certificate.sha256`
    /// for the session URL's host.
    pub fn hash_url(&self) -> String {
        if let Some(u) = &self.cert_hash_url {
            return u.clone();
        }
        let host = host(&self.url).unwrap_or("localhost");
        format!("http://{host}:8080/certificate.sha256")
    }

    /// `host:port` of the server's HTTP side: the first `--server`'s, else the certificate
    /// hash URL's.
    pub fn http_authority(&self) -> String {
        if let Some(authority) = self.server.first().and_then(|s| authority(s)) {
            return authority.to_string();
        }
        authority(&self.hash_url())
            .unwrap_or("localhost:8080")
            .to_string()
    }

    /// How to trust the server for one connection attempt: the given hash, else the hashes
    /// the server publishes, else (404 there) the system roots.
    pub async fn trust(&self) -> Result<Trust> {
        if let Some(h) = &self.cert_hash {
            return Ok(Trust::Hashes(vec![parse_hash(h)?]));
        }
        if self.cert_hash_url.as_deref() == Some("none") {
            return Ok(Trust::SystemRoots); // a CA-issued certificate, nothing to fetch
        }
        Ok(match fetch_cert_hashes(&self.hash_url()).await? {
            Some(hashes) => Trust::Hashes(hashes),
            None => Trust::SystemRoots,
        })
    }
}

/// Where one connection attempt goes: the session URL (with the token) and how to trust it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Session URL, with `?token=` when a token is given.
    pub url: String,
    /// How to trust its certificate.
    pub trust: Trust,
    /// The node's URL without any token, for messages.
    pub shown: String,
}

/// The nodes a client moves between (`--server`), in turn.
#[derive(Debug, Default, Clone)]
pub struct Nodes {
    list: Vec<String>,
    next: usize,
}

impl Nodes {
    /// Every node known so far: the given ones, then the ones they listed.
    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// Adds a node unless it is known.
    fn learn(&mut self, base: &str) {
        let base = base.trim_end_matches('/').to_string();
        if !base.is_empty() && !self.list.contains(&base) {
            self.list.push(base);
        }
    }
}

/// What a node's `/config.json` says about where its sessions are.
#[derive(Debug, serde::Deserialize)]
struct PageConfig {
    webtransport_port: u16,
    session_path: String,
    #[serde(default)]
    servers: Vec<String>,
}

impl ConnectArgs {
    /// Where the next connection attempt goes: `--url`, or the next of the `--server` nodes.
    pub async fn target(&self, nodes: &mut Nodes) -> Result<Target> {
        if self.server.is_empty() {
            return Ok(Target {
                url: self.session_url(),
                trust: self.trust().await?,
                shown: self.url.clone(),
            });
        }
        for base in &self.server {
            nodes.learn(base);
        }
        let base = nodes.list[nodes.next % nodes.list.len()].clone();
        nodes.next += 1;
        let config_url = format!("{base}/config.json");
        let response = reqwest::get(&config_url)
            .await
            .with_context(|| format!("fetching {config_url}"))?;
        if !response.status().is_success() {
            bail!("{config_url}: HTTP {}", response.status());
        }
        let body = response
            .bytes()
            .await
            .with_context(|| format!("reading {config_url}"))?;
        let config: PageConfig = serde_json::from_slice(&body)
            .with_context(|| format!("{config_url} is not a fleetcast page configuration"))?;
        for other in &config.servers {
            nodes.learn(other);
        }
        let host = host(&base).with_context(|| format!("--server {base:?} has no host"))?;
        let url = format!(
            "https://{host}:{}{}",
            config.webtransport_port, config.session_path
        );
        let trust = match &self.cert_hash {
            Some(h) => Trust::Hashes(vec![parse_hash(h)?]),
            None => match fetch_cert_hashes(&format!("{base}/certificate.sha256")).await? {
                Some(hashes) => Trust::Hashes(hashes),
                None => Trust::SystemRoots,
            },
        };
        Ok(Target {
            url: with_token(&url, self.token.as_deref()),
            trust,
            shown: url,
        })
    }
}

/// Every node a client can reach: `--url` alone, or each `--server` node and every node they
/// list, resolved once. Their certificate hashes are merged (each node has its own
/// self-signed certificate), so one client configuration trusts them all.
pub async fn every_target(args: &ConnectArgs) -> Result<(Vec<String>, Trust)> {
    let mut nodes = Nodes::default();
    let mut urls = Vec::new();
    let mut hashes = Vec::new();
    let mut roots = false;
    loop {
        let target = args.target(&mut nodes).await?;
        urls.push(target.url);
        match target.trust {
            Trust::Hashes(h) => hashes.extend(h),
            Trust::SystemRoots => roots = true,
        }
        if args.server.is_empty() || urls.len() >= nodes.list().len() {
            break;
        }
    }
    let trust = match (roots, hashes.is_empty()) {
        (false, _) => Trust::Hashes(hashes),
        (true, true) => Trust::SystemRoots,
        (true, false) => {
            bail!("some servers use CA-issued certificates and some self-signed ones: use one kind")
        }
    };
    Ok((urls, trust))
}

/// `url` with `token` (if any) as its `token` query parameter.
pub fn with_token(url: &str, token: Option<&str>) -> String {
    match token {
        Some(token) => crate::token::add_to_url(url, token),
        None => url.to_string(),
    }
}

/// `url` without its query string, which may hold a token: for messages and logs.
pub fn without_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(base, _)| base)
}

/// The host of a URL, without its port (IPv6 addresses keep their brackets).
fn host(url: &str) -> Option<&str> {
    authority(url).map(|authority| match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    })
}

/// The `host[:port]` part of a URL.
fn authority(url: &str) -> Option<&str> {
    url.split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
}

/// Client endpoint settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Certificate trust.
    pub trust: Trust,
    /// Datagrams buffered by QUIC before the application reads them, bytes.
    pub datagram_buffer: usize,
    /// Idle timeout of the QUIC connection.
    pub idle_timeout: Duration,
    /// Bind the endpoint's UDP socket with this much kernel buffer (default: the kernel's).
    pub udp_buffer: Option<usize>,
    /// Send a QUIC PING after this long without any packet from the server (default: never,
    /// like a browser). With a short idle timeout it tells a dead server (nothing comes back:
    /// the idle timeout ends the session) from a live one that has no ticks to send.
    pub keep_alive: Option<Duration>,
}

impl ClientOptions {
    /// Defaults with the given trust.
    pub fn new(trust: Trust) -> Self {
        Self {
            trust,
            datagram_buffer: 1 << 20,
            idle_timeout: Duration::from_secs(30),
            udp_buffer: None,
            keep_alive: None,
        }
    }
}

/// Parses a lowercase or uppercase hex SHA-256 (colons allowed).
pub fn parse_hash(hex: &str) -> Result<Sha256Digest> {
    let clean: String = hex.trim().chars().filter(|c| *c != ':').collect();
    Sha256Digest::from_str_fmt(&clean, Sha256DigestFmt::BytesArray)
        .or_else(|_| {
            let bytes = hex::decode(&clean)?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("a SHA-256 hash has 32 bytes"))?;
            Ok::<_, anyhow::Error>(Sha256Digest::new(arr))
        })
        .with_context(|| format!("'{hex}' is not a SHA-256 hash in hex"))
}

/// Fetches certificate hashes (one hex hash per line) over HTTP.
///
/// Returns `Ok(None)` on 404, which a server with a CA-issued certificate answers.
pub async fn fetch_cert_hashes(url: &str) -> Result<Option<Vec<Sha256Digest>>> {
    let response = reqwest::get(url)
        .await
        .with_context(|| format!("fetching {url}"))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let text = response.error_for_status()?.text().await?;
    let hashes = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_hash)
        .collect::<Result<Vec<_>>>()?;
    if hashes.is_empty() {
        bail!("{url} listed no certificate hash");
    }
    Ok(Some(hashes))
}

/// A client endpoint (one UDP socket) that can hold many sessions.
pub fn endpoint(options: &ClientOptions) -> Result<Endpoint<endpoint_side::Client>> {
    let builder = match options.udp_buffer {
        Some(size) => {
            let any: std::net::SocketAddr = "[::]:0".parse().expect("literal address");
            ClientConfig::builder().with_bind_socket(crate::udp::bind_udp(any, size)?)
        }
        None => ClientConfig::builder().with_bind_default(),
    };
    let mut config = match &options.trust {
        Trust::Hashes(hashes) => builder.with_server_certificate_hashes(hashes.clone()),
        Trust::SystemRoots => builder.with_native_certs(),
    }
    .build();
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(options.idle_timeout)?));
    // By default, like a browser, send no keep-alives: acknowledging the server's datagrams
    // keeps the connection alive, and a silent server is noticed by the idle timeout.
    transport.keep_alive_interval(options.keep_alive);
    transport.datagram_receive_buffer_size(Some(options.datagram_buffer));
    transport.datagram_send_buffer_size(4096);
    config
        .quic_config_mut()
        .transport_config(Arc::new(transport));
    Ok(Endpoint::client(config)?)
}

/// How a session ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Application close code: the server's, or this client's when `by_client`.
    pub code: Option<u64>,
    /// Close reason or error text.
    pub reason: String,
    /// The `Goodbye` frame, if the server sent one first.
    pub goodbye: Option<(u32, String)>,
    /// This client closed the session: the server's bytes did not decode (code 2) or it speaks
    /// a protocol version this client does not (code 5).
    pub by_client: bool,
}

impl Ended {
    /// The close code as a [`CloseCode`], when it is one.
    pub fn close_code(&self) -> Option<CloseCode> {
        self.code.and_then(CloseCode::from_code)
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, &self.goodbye) {
            (Some(code), _) if self.by_client => {
                write!(f, "closed by this client with code {code}: {}", self.reason)
            }
            (_, Some((code, reason))) => write!(f, "server said goodbye ({code}): {reason}"),
            (Some(code), None) => write!(f, "closed with code {code}: {}", self.reason),
            (None, None) => write!(f, "{}", self.reason),
        }
    }
}

/// Something that arrived on a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A message from the reliable stream.
    Message(StreamMessage),
    /// A datagram payload (WebTransport header removed).
    Datagram(Bytes),
}

/// One open session.
pub struct Session {
    conn: Connection,
    stream: Option<RecvStream>,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    goodbye: Option<(u32, String)>,
}

/// The server answered the session request with an error status instead of opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session refused: {}", describe_status(*.status))]
pub struct Refused {
    /// HTTP status of the answer (401 token, 403 origin, 404 path, 429 full), when it sent one.
    pub status: Option<u16>,
}

/// `401 Unauthorized`, or `no status` when there is none.
fn describe_status(status: Option<u16>) -> String {
    match status {
        None => "no status".to_string(),
        Some(code) => {
            let reason = reqwest::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason());
            match reason {
                Some(reason) => format!("{code} {reason}"),
                None => code.to_string(),
            }
        }
    }
}

/// Opens a session at `url`, optionally sending an `Origin` header.
///
/// A refusal by the server is a [`Refused`] error (reach it with `downcast_ref`) carrying the
/// status, e.g. "session refused: 401 Unauthorized". Error messages leave out the URL's query
/// string, which may hold a token.
pub async fn open(
    endpoint: &Endpoint<endpoint_side::Client>,
    url: &str,
    origin: Option<&str>,
) -> Result<Session> {
    let mut options = ConnectOptions::builder(url);
    if let Some(origin) = origin {
        options = options.add_header("origin", origin);
    }
    let context = || format!("opening a WebTransport session at {}", without_query(url));
    let conn = match endpoint.connect(options.build()).await {
        Ok(conn) => conn,
        Err(ConnectingError::SessionRejected { status }) => {
            return Err(anyhow::Error::new(Refused { status }).context(context()));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(context())),
    };
    Ok(Session {
        conn,
        stream: None,
        decoder: FrameDecoder::new(),
        buf: vec![0; 16 * 1024],
        goodbye: None,
    })
}

impl Session {
    /// The underlying connection (for tests that misbehave on purpose).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Waits for the next message or datagram; `Err` once the session has ended.
    pub async fn next(&mut self) -> Result<Event, Ended> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(msg)) => {
                    match &msg {
                        StreamMessage::Goodbye { code, reason } => {
                            self.goodbye = Some((*code, reason.clone()));
                        }
                        StreamMessage::Hello(hello) if !hello.version_supported() => {
                            let reason = format!(
                                "the server speaks protocol version {}; this client speaks \
                                 {PROTOCOL_VERSION}",
                                hello.version
                            );
                            return Err(self.close_with(CloseCode::UnsupportedVersion, reason));
                        }
                        _ => {}
                    }
                    return Ok(Event::Message(msg));
                }
                Ok(None) => {}
                Err(e) => return Err(self.violation(e)),
            }
            // The stream first: what has arrived on it (a car's CarsAdded) is applied before a
            // datagram that arrived with it (the car's first sample), in the order the server
            // sent them.
            tokio::select! {
                biased;
                stream = self.conn.accept_uni(), if self.stream.is_none() => {
                    match stream {
                        Ok(s) => self.stream = Some(s),
                        Err(e) => return Err(self.ended(e).await),
                    }
                }
                read = read_some(&mut self.stream, &mut self.buf), if self.stream.is_some() => {
                    match read {
                        Ok(Some(n)) => self.decoder.push(&self.buf[..n]),
                        // The server finished the stream (after a goodbye): datagrams may
                        // still follow until the close.
                        Ok(None) => self.stream = None,
                        Err(_) => {
                            let e = self.conn.closed().await;
                            return Err(self.ended(e).await);
                        }
                    }
                }
                datagram = self.conn.receive_datagram() => {
                    return match datagram {
                        Ok(d) => Ok(Event::Datagram(d.payload())),
                        Err(e) => Err(self.ended(e).await),
                    };
                }
            }
        }
    }

    fn violation(&mut self, e: DecodeError) -> Ended {
        let reason = format!("server sent an undecodable frame: {e}");
        self.close_with(CloseCode::ProtocolViolation, reason)
    }

    /// Ends the session from this side: no further event is read from it.
    fn close_with(&mut self, code: CloseCode, reason: String) -> Ended {
        self.conn
            .close(VarInt::from_u32(code.code()), reason.as_bytes());
        self.stream = None;
        Ended {
            code: Some(code.code().into()),
            reason,
            goodbye: self.goodbye.clone(),
            by_client: true,
        }
    }

    async fn ended(&mut self, e: ConnectionError) -> Ended {
        let (code, reason) = match e {
            ConnectionError::ApplicationClosed(close) => (
                Some(close.code().into_inner()),
                String::from_utf8_lossy(close.reason()).into_owned(),
            ),
            other => (None, other.to_string()),
        };
        Ended {
            code,
            reason,
            goodbye: self.goodbye.clone(),
            by_client: false,
        }
    }

    /// Closes the session normally.
    pub fn close(&self) {
        self.conn
            .close(VarInt::from_u32(CloseCode::Normal.code()), b"client done");
    }
}

async fn read_some(
    stream: &mut Option<RecvStream>,
    buf: &mut [u8],
) -> Result<Option<usize>, wtransport::error::StreamReadError> {
    match stream {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_url_follows_the_session_host() {
        let h = |url: &str| ConnectArgs::new(url).hash_url();
        assert_eq!(
            h("https://localhost:4433/positions"),
            "http://localhost:8080/certificate.sha256"
        );
        assert_eq!(
            h("https://[::1]:4433/positions"),
            "http://[::1]:8080/certificate.sha256"
        );
        assert_eq!(
            h("https://fleet.example/positions"),
            "http://fleet.example:8080/certificate.sha256"
        );
        let mut a = ConnectArgs::new("https://x:1/positions");
        a.cert_hash_url = Some("http://127.0.0.1:9/certificate.sha256".into());
        assert_eq!(a.http_authority(), "127.0.0.1:9");
    }

    #[test]
    fn session_url_adds_the_token_and_messages_drop_it() {
        let mut a = ConnectArgs::new("https://h:1/positions");
        assert_eq!(a.session_url(), "https://h:1/positions");
        a.token = Some("a.b.c".into());
        assert_eq!(a.session_url(), "https://h:1/positions?token=a.b.c");
        assert_eq!(without_query(&a.session_url()), "https://h:1/positions");
    }

    #[test]
    fn without_query_drops_the_query_string() {
        assert_eq!(without_query("https://h:1/p?token=x&v=1"), "https://h:1/p");
        assert_eq!(without_query("https://h:1/p"), "https://h:1/p");
    }

    #[test]
    fn refused_names_the_status() {
        let r = |status| Refused { status }.to_string();
        assert_eq!(r(Some(401)), "session refused: 401 Unauthorized");
        assert_eq!(r(Some(429)), "session refused: 429 Too Many Requests");
        assert_eq!(r(Some(499)), "session refused: 499");
        assert_eq!(r(None), "session refused: no status");
    }

    #[test]
    fn parse_hash_accepts_hex_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_hash(&hex).unwrap(), parse_hash(&colons).unwrap());
        assert!(parse_hash("abcd").is_err());
    }
}
