//! The swarm's quinn-proto engine (`--engine proto`): one thread holds thousands of WebTransport
//! sessions.
//!
//! Each engine thread owns a few UDP sockets, each a client-side `quinn_proto::Endpoint`, and
//! drives every connection on them from one blocking loop: `poll(2)` with a timeout, incoming
//! packets read in batches with quinn-udp (recvmmsg, GRO segments split by their stride) and
//! handed straight to their connection, one timer heap for all connections (stale deadlines are
//! skipped), and outgoing packets sent in batches with `sendmmsg`. No channel, no task and no
//! wake-up per connection. The HTTP/3 side (SETTINGS, extended CONNECT, stream headers) is
//! [`super::h3`]; what a session records is the same [`Record`] the wtransport engine fills, so
//! every report works on both.
//!
//! Slots mirror the wtransport engine's session tasks: a slot opens a session, records what it
//! receives, and with `--reconnect` opens it again after the backoff; the churn closes the
//! oldest slot's session and opens a new one in its place.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::IoSliceMut;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ReadError,
    StreamEvent, StreamId, TransportConfig, VarInt,
};
use tracing::{debug, warn};
use wtransport_proto::datagram::Datagram;

use super::h3::{self, ResponseReader, UniHeaderReader, UniKind};
use super::{short, ConnectFailure, Outcome, Record, Run};
use crate::client::Trust;
use crate::proto::wire::{CloseCode, FrameDecoder, StreamMessage, TickHeader};
use crate::server::now_us;

/// Packets sent per `sendmmsg` call at most.
const SEND_BATCH: usize = 64;
/// Receive batches read from one socket before the loop turns to timers and the other sockets.
const RECV_BATCHES_PER_PASS: usize = 8;
/// Longest sleep in `poll(2)`: the stop flag and the churn are looked at this often.
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// Bytes per receive buffer: room for a full GRO batch.
const RECV_SLOT: usize = 64 * 1024;

/// What every engine thread shares: the QUIC client configuration and the servers.
struct Shared {
    config: ClientConfig,
    /// Where sessions go: slot `s` starts at target `s % len` and moves to the next one each
    /// time an attempt fails or its session is lost.
    targets: Vec<Target>,
    /// The control stream's bytes (type and SETTINGS).
    control: Vec<u8>,
}

/// One server (node) sessions connect to.
struct Target {
    remote: SocketAddr,
    server_name: String,
    /// The extended CONNECT request (one HEADERS frame).
    request: Vec<u8>,
}

impl Target {
    fn new(url: &str, origin: Option<&str>) -> Result<Target> {
        let parsed = reqwest::Url::parse(url).with_context(|| {
            format!(
                "parsing the session URL {}",
                crate::client::without_query(url)
            )
        })?;
        let Some(host) = parsed.host_str() else {
            bail!("the session URL has no host");
        };
        // An IPv6 host comes in brackets; TLS wants the bare address.
        let server_name = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = parsed.port_or_known_default().unwrap_or(443);
        let remote = (server_name.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {server_name}"))?
            .next()
            .with_context(|| format!("{server_name} has no address"))?;
        Ok(Target {
            remote,
            server_name,
            request: h3::connect_request(url, origin)?,
        })
    }
}

/// Starts the engine threads for `run`'s sessions. Each thread opens its share of the sessions
/// (at its share of the connect rate and concurrency) until `connect_deadline`, churns its share
/// through the window, and ends once `run.stop` is cancelled, having pushed every session's
/// record into `run.records`.
pub(super) fn spawn(
    run: &Arc<Run>,
    trust: Trust,
    connect_deadline: Instant,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let args = &run.args;
    let targets = run
        .targets
        .iter()
        .map(|url| Target::new(url, args.connect.origin.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let remote = targets[0].remote;
    if targets
        .iter()
        .any(|t| t.remote.is_ipv4() != remote.is_ipv4())
    {
        bail!("the servers mix IPv4 and IPv6 addresses: give them all in one family");
    }
    let shared = Arc::new(Shared {
        config: client_config(&trust)?,
        targets,
        control: h3::control_stream(),
    });
    let threads = args.engine_threads.clamp(1, args.sessions);
    let per_endpoint = args.sessions_per_endpoint().max(1);
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        // Contiguous shares, as even as they divide.
        let first = args.sessions * t / threads;
        let last = args.sessions * (t + 1) / threads;
        let count = last - first;
        let sockets = (0..count.div_ceil(per_endpoint))
            .map(|_| Socket::bind(remote, args.udp_buffer))
            .collect::<Result<Vec<_>>>()?;
        let mut engine = Engine::new(
            run.clone(),
            shared.clone(),
            sockets,
            count,
            per_endpoint,
            threads,
            connect_deadline,
        );
        handles.push(
            std::thread::Builder::new()
                .name(format!("swarm-engine-{t}"))
                .spawn(move || engine.run())
                .context("starting an engine thread")?,
        );
    }
    Ok(handles)
}

/// The QUIC client configuration: TLS 1.3 with ALPN `h3`, the server trusted by certificate
/// hash (or the system roots), datagrams on, no keep-alive (acknowledging the server's
/// datagrams keeps a session alive, as in a browser).
fn client_config(trust: &Trust) -> Result<ClientConfig> {
    use wtransport::tls::client::{build_default_tls_config, ServerHashVerification};
    let tls = match trust {
        Trust::Hashes(hashes) => build_default_tls_config(
            Arc::new(wtransport::tls::rustls::RootCertStore::empty()),
            Some(Arc::new(ServerHashVerification::new(hashes.clone()))),
        ),
        Trust::SystemRoots => {
            build_default_tls_config(Arc::new(wtransport::tls::build_native_cert_store()), None)
        }
    };
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .context("TLS configuration for QUIC")?;
    let mut transport = TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    // A receive buffer of None turns datagrams off altogether: keep a few ticks' worth.
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    transport.datagram_send_buffer_size(4096);
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One UDP socket and the QUIC endpoint on it, with its connections by handle.
struct Socket {
    udp: UdpSocket,
    state: quinn_udp::UdpSocketState,
    endpoint: Endpoint,
    conns: Vec<Option<Conn>>,
    /// Packets waiting for the next `sendmmsg`.
    out: Vec<(SocketAddr, Vec<u8>)>,
}

impl Socket {
    fn bind(remote: SocketAddr, buffer: usize) -> Result<Self> {
        let any: SocketAddr = if remote.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        let udp = crate::udp::bind_udp(any, buffer)?;
        let state = quinn_udp::UdpSocketState::new((&udp).into())?;
        let endpoint = Endpoint::new(
            Arc::new(EndpointConfig::default()),
            None,
            !state.may_fragment(),
            None,
        );
        Ok(Self {
            udp,
            state,
            endpoint,
            conns: Vec::new(),
            out: Vec::with_capacity(SEND_BATCH),
        })
    }
}

/// A connection and its session state.
struct Conn {
    qc: quinn_proto::Connection,
    /// The slot it serves; `None` once the slot gave it up (it is draining).
    slot: Option<usize>,
    /// The deadline last put on the timer heap.
    timer: Option<Instant>,
    /// On the dirty list.
    dirty: bool,
    /// The server it connects to (index into the targets).
    target: usize,
    app: App,
}

/// The HTTP/3 and fleetcast state of one session.
#[derive(Default)]
struct App {
    /// The QUIC handshake completed.
    handshaked: bool,
    /// The CONNECT stream.
    bidi: Option<StreamId>,
    response: ResponseReader,
    /// Server-opened unidirectional streams and what they turned out to be.
    uni: Vec<(StreamId, Uni)>,
    /// Bytes a stream did not take yet (flow control).
    pending: Vec<(StreamId, Vec<u8>)>,
    frames: FrameDecoder,
    /// The initial state arrived.
    up: bool,
    /// The attempt's end was reported to the slot.
    ended: bool,
}

enum Uni {
    Header(UniHeaderReader),
    Session,
    Ignored,
}

/// What one pass over a connection means for its slot.
#[derive(Default)]
struct Progress {
    up: bool,
    ended: Option<Outcome>,
}

/// One session slot (the wtransport engine's session task).
struct Slot {
    record: Record,
    /// Connected at least once.
    ever: bool,
    /// Opened by the churn.
    churned_in: bool,
    /// Holds one of the connect phase's concurrency permits (until connected or given up).
    permit: bool,
    /// Lost at this time and not back yet.
    down_since: Option<Instant>,
    /// Failed attempts since the last success (the backoff's exponent).
    attempt: u32,
    /// The server its next attempt goes to (index into the targets); set at the first.
    target: Option<usize>,
    state: SlotState,
}

#[derive(Clone, Copy, PartialEq)]
enum SlotState {
    /// Not started yet.
    Idle,
    /// A connection is open or opening; `deadline` ends an attempt that is not up by then.
    Active {
        conn: (usize, usize),
        deadline: Option<Instant>,
    },
    /// Waiting to reconnect.
    Backoff { until: Instant },
    /// Finished; its record is in the run's records.
    Done,
}

impl Slot {
    /// Moves the next attempt on to the next server.
    fn next_target(&mut self, targets: usize) {
        if let Some(t) = &mut self.target {
            *t = (*t + 1) % targets;
        }
    }

    fn new(churned_in: bool) -> Self {
        Self {
            record: Record::default(),
            ever: false,
            churned_in,
            permit: false,
            down_since: None,
            attempt: 0,
            target: None,
            state: SlotState::Idle,
        }
    }
}

/// One engine thread.
struct Engine {
    run: Arc<Run>,
    shared: Arc<Shared>,
    sockets: Vec<Socket>,
    slots: Vec<Slot>,
    per_endpoint: usize,
    /// Connection deadlines: (when, socket, handle). An entry whose time is not the
    /// connection's current deadline is stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, usize, usize)>>,
    /// Slot deadlines (backoff ends, attempt timeouts), checked against the slot's state.
    slot_timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Connections with something to process: (socket, handle).
    dirty: Vec<(usize, usize)>,
    /// Send buffers to reuse.
    spare: Vec<Vec<u8>>,
    live_conns: usize,
    // Connect phase.
    next_start: usize,
    next_start_at: Instant,
    start_every: Duration,
    concurrency: usize,
    inflight: usize,
    connect_deadline: Instant,
    // Churn.
    churn_every: Option<Duration>,
    churn_next: Option<Instant>,
    churned: u64,
    /// Packets dropped because a socket's send buffer was full.
    send_drops: u64,
    counts: Counts,
}

/// What the loop did, logged at the end (debug) to see where its time goes.
#[derive(Debug, Default)]
struct Counts {
    loops: u64,
    recv_calls: u64,
    packets_in: u64,
    packets_out: u64,
}

impl Engine {
    fn new(
        run: Arc<Run>,
        shared: Arc<Shared>,
        sockets: Vec<Socket>,
        count: usize,
        per_endpoint: usize,
        threads: usize,
        connect_deadline: Instant,
    ) -> Self {
        let args = &run.args;
        let rate = f64::from(args.connect_rate.max(1)) / threads as f64;
        let churn_every = (args.churn_per_s > 0.0)
            .then(|| Duration::from_secs_f64(threads as f64 / args.churn_per_s));
        Self {
            concurrency: args.connect_concurrency.max(1).div_ceil(threads),
            start_every: Duration::from_secs_f64(1.0 / rate),
            slots: (0..count).map(|_| Slot::new(false)).collect(),
            run: run.clone(),
            shared,
            sockets,
            per_endpoint,
            timers: BinaryHeap::new(),
            slot_timers: BinaryHeap::new(),
            dirty: Vec::new(),
            spare: Vec::new(),
            live_conns: 0,
            next_start: 0,
            next_start_at: Instant::now(),
            inflight: 0,
            connect_deadline,
            churn_every,
            churn_next: None,
            churned: 0,
            send_drops: 0,
            counts: Counts::default(),
        }
    }

    /// The event loop, until the run stops.
    fn run(&mut self) {
        let mut recv_buf = vec![0u8; RECV_SLOT * quinn_udp::BATCH_SIZE];
        let mut meta = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let mut response = Vec::new();
        let mut more = false;
        loop {
            let now = Instant::now();
            if self.run.stop.is_cancelled() {
                self.stop(now);
                break;
            }
            self.start_sessions(now);
            self.churn(now);
            self.expire_slots(now);
            self.expire_timers(now);
            self.drive_dirty();
            self.flush_all();

            let timeout = if more {
                Duration::ZERO
            } else {
                self.next_wakeup()
                    .map_or(MAX_SLEEP, |t| t.saturating_duration_since(Instant::now()))
                    .min(MAX_SLEEP)
            };
            self.counts.loops += 1;
            let readable = self.wait(timeout);
            more = false;
            for i in readable {
                more |= self.receive(i, &mut recv_buf, &mut meta, &mut response);
            }
        }
        debug!("engine thread: {:?}", self.counts);
        if self.send_drops > 0 {
            warn!(
                "engine dropped {} outgoing packets: socket send buffers full",
                self.send_drops
            );
        }
    }

    /// `poll(2)` on every socket for up to `timeout`; returns the readable ones.
    fn wait(&self, timeout: Duration) -> Vec<usize> {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|s| libc::pollfd {
                fd: s.udp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Round up, so a deadline a fraction of a millisecond away is not a busy loop.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return Vec::new();
        }
        fds.iter()
            .enumerate()
            .filter(|(_, f)| f.revents != 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// Reads up to a few batches from socket `i` and hands every packet to its connection;
    /// returns whether the socket may hold more.
    fn receive(
        &mut self,
        i: usize,
        recv_buf: &mut [u8],
        meta: &mut [quinn_udp::RecvMeta],
        response: &mut Vec<u8>,
    ) -> bool {
        for _ in 0..RECV_BATCHES_PER_PASS {
            let sock = &mut self.sockets[i];
            let n = {
                let mut bufs: Vec<IoSliceMut<'_>> = recv_buf
                    .chunks_mut(RECV_SLOT)
                    .map(IoSliceMut::new)
                    .collect();
                match sock.state.recv((&sock.udp).into(), &mut bufs, meta) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("receive: {e}");
                        return false;
                    }
                }
            };
            // A batch can take a while to process: read the clock for each.
            let now = Instant::now();
            self.counts.recv_calls += 1;
            for (m, buf) in meta.iter().zip(recv_buf.chunks(RECV_SLOT)).take(n) {
                let data = &buf[..m.len];
                let ecn = m
                    .ecn
                    .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                // GRO hands several packets of one sender in one buffer, `stride` apart.
                for segment in data.chunks(m.stride.max(1)) {
                    self.counts.packets_in += 1;
                    response.clear();
                    let event = sock.endpoint.handle(
                        now,
                        m.addr,
                        m.dst_ip,
                        ecn,
                        BytesMut::from(segment),
                        response,
                    );
                    match event {
                        Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                            if let Some(conn) = sock.conns.get_mut(ch.0).and_then(Option::as_mut) {
                                conn.qc.handle_event(event);
                                if !conn.dirty {
                                    conn.dirty = true;
                                    self.dirty.push((i, ch.0));
                                }
                            }
                        }
                        Some(DatagramEvent::Response(transmit)) => {
                            sock.out
                                .push((transmit.destination, response[..transmit.size].to_vec()));
                        }
                        // A client endpoint accepts no connections.
                        Some(DatagramEvent::NewConnection(incoming)) => {
                            sock.endpoint.ignore(incoming)
                        }
                        None => {}
                    }
                }
            }
            // Answer what arrived before reading more: ACKs go out, buffers come back.
            self.drive_dirty();
            self.flush_all();
        }
        true
    }

    /// The earliest time the loop has something to do.
    fn next_wakeup(&self) -> Option<Instant> {
        let mut next = None::<Instant>;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(Reverse((t, ..))) = self.timers.peek() {
            consider(*t);
        }
        if let Some(Reverse((t, _))) = self.slot_timers.peek() {
            consider(*t);
        }
        if self.next_start < self.slots.len()
            && self.inflight < self.concurrency
            && Instant::now() < self.connect_deadline
        {
            consider(self.next_start_at);
        }
        if let Some(t) = self.churn_next {
            consider(t);
        }
        next
    }

    /// The connect phase: opens sessions at the paced rate while permits are free.
    fn start_sessions(&mut self, now: Instant) {
        while self.next_start < self.slots.len()
            && now >= self.next_start_at
            && self.inflight < self.concurrency
            && now < self.connect_deadline
        {
            let s = self.next_start;
            self.next_start += 1;
            self.next_start_at += self.start_every;
            self.slots[s].permit = true;
            self.inflight += 1;
            self.run.started.fetch_add(1, Ordering::Relaxed);
            self.start_attempt(s, now);
        }
    }

    /// Through the window: closes the next slot's session (round robin, the oldest first) and
    /// opens a new one in its place, at this thread's share of `--churn-per-s`.
    fn churn(&mut self, now: Instant) {
        let Some(every) = self.churn_every else {
            return;
        };
        let window = &self.run.window;
        let start = window.start_us.load(Ordering::Relaxed);
        if start == 0 || self.slots.is_empty() {
            return;
        }
        let next = *self.churn_next.get_or_insert(now + every);
        if now < next {
            return;
        }
        if now_us() >= window.end_us.load(Ordering::Relaxed) {
            self.churn_next = None;
            self.churn_every = None;
            return;
        }
        let s = (self.churned % self.slots.len() as u64) as usize;
        self.churned += 1;
        self.churn_next = Some(next + every);
        self.run.churn_closed.fetch_add(1, Ordering::Relaxed);
        self.close_slot(s, now);
        self.slots[s] = Slot::new(true);
        self.start_attempt(s, now);
    }

    /// Ends slot `s` the way the run's stop does: its session is closed normally.
    fn close_slot(&mut self, s: usize, now: Instant) {
        if let SlotState::Active { conn, .. } = self.slots[s].state {
            self.close_conn(conn, now, CloseCode::Normal, b"client done");
        }
        if self.slots[s].state != SlotState::Done && self.slots[s].state != SlotState::Idle {
            self.end_slot(s);
        }
    }

    /// Backoffs that are over start a new attempt; attempts past their deadline fail.
    fn expire_slots(&mut self, now: Instant) {
        while let Some(&Reverse((t, s))) = self.slot_timers.peek() {
            if t > now {
                break;
            }
            self.slot_timers.pop();
            match self.slots[s].state {
                SlotState::Backoff { until } if until <= now => {
                    self.run.recovery.lock().expect("recovery lock").attempts += 1;
                    self.start_attempt(s, now);
                }
                SlotState::Active {
                    conn,
                    deadline: Some(d),
                } if d <= now => {
                    self.close_conn(conn, now, CloseCode::Normal, b"client gave up");
                    self.finish_attempt(s, Outcome::Failed(ConnectFailure::Timeout), now);
                }
                _ => {}
            }
        }
    }

    /// Connection timers that are due (stale entries skipped).
    fn expire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, i, ch))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(conn) = self.sockets[i].conns.get_mut(ch).and_then(Option::as_mut) {
                if conn.timer == Some(t) {
                    conn.timer = None;
                    conn.qc.handle_timeout(now);
                    if !conn.dirty {
                        conn.dirty = true;
                        self.dirty.push((i, ch));
                    }
                }
            }
        }
        // Stale entries pile up when deadlines move; rebuild from the live ones now and then.
        if self.timers.len() > 4 * self.live_conns + 4096 {
            self.timers = self
                .sockets
                .iter()
                .enumerate()
                .flat_map(|(i, s)| {
                    s.conns.iter().enumerate().filter_map(move |(ch, c)| {
                        c.as_ref()
                            .and_then(|c| c.timer)
                            .map(|t| Reverse((t, i, ch)))
                    })
                })
                .collect();
        }
    }

    /// Opens a new connection for slot `s`.
    fn start_attempt(&mut self, s: usize, now: Instant) {
        let i = (s / self.per_endpoint).min(self.sockets.len() - 1);
        let targets = self.shared.targets.len();
        let t = *self.slots[s].target.get_or_insert(s % targets);
        let target = &self.shared.targets[t];
        let sock = &mut self.sockets[i];
        let connected = sock.endpoint.connect(
            now,
            self.shared.config.clone(),
            target.remote,
            &target.server_name,
        );
        let (ch, qc) = match connected {
            Ok(c) => c,
            Err(e) => {
                let reason = ConnectFailure::Other(short(&e.to_string()));
                self.finish_attempt(s, Outcome::Failed(reason), now);
                return;
            }
        };
        if sock.conns.len() <= ch.0 {
            sock.conns.resize_with(ch.0 + 1, || None);
        }
        sock.conns[ch.0] = Some(Conn {
            qc,
            slot: Some(s),
            timer: None,
            dirty: true,
            target: t,
            app: App::default(),
        });
        self.live_conns += 1;
        self.dirty.push((i, ch.0));
        let deadline = self
            .run
            .args
            .timed_attempts()
            .then(|| now + self.run.args.attempt_timeout);
        if let Some(d) = deadline {
            self.slot_timers.push(Reverse((d, s)));
        }
        self.slots[s].state = SlotState::Active {
            conn: (i, ch.0),
            deadline,
        };
    }

    /// Closes a connection from this side and detaches it from its slot; it drains on its own.
    fn close_conn(&mut self, (i, ch): (usize, usize), now: Instant, code: CloseCode, why: &[u8]) {
        if let Some(conn) = self.sockets[i].conns.get_mut(ch).and_then(Option::as_mut) {
            conn.slot = None;
            conn.app.ended = true;
            conn.qc.close(
                now,
                VarInt::from_u32(code.code()),
                Bytes::copy_from_slice(why),
            );
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push((i, ch));
            }
        }
    }

    /// The initial state arrived on slot `s`'s current attempt.
    fn slot_connected(&mut self, s: usize) {
        let slot = &mut self.slots[s];
        if !slot.ever {
            slot.ever = true;
            slot.record.from_us = now_us();
            if slot.churned_in {
                self.run.churn_opened.fetch_add(1, Ordering::Relaxed);
            } else {
                self.run.connected.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(since) = slot.down_since.take() {
            self.run.note_back(since.elapsed());
        }
        if std::mem::take(&mut slot.permit) {
            self.inflight -= 1;
        }
        slot.attempt = 0;
        if let SlotState::Active { deadline, .. } = &mut slot.state {
            *deadline = None;
        }
    }

    /// How slot `s`'s attempt ended (its connection is already detached): the wtransport
    /// engine's `session` loop, one step.
    fn finish_attempt(&mut self, s: usize, outcome: Outcome, now: Instant) {
        let run = self.run.clone();
        match outcome {
            Outcome::Stopped => {
                self.end_slot(s);
                return;
            }
            Outcome::Failed(reason) => {
                debug!("connect failed: {reason}");
                run.note_failure(&reason);
                if !run.args.reconnect {
                    if !self.slots[s].ever {
                        run.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.end_slot(s);
                    return;
                }
                let slot = &mut self.slots[s];
                slot.attempt = slot.attempt.saturating_add(1);
                slot.next_target(self.shared.targets.len());
            }
            Outcome::Lost(e) => {
                debug!("session ended: {e}");
                let slot = &mut self.slots[s];
                slot.record.lost = true;
                if !run.args.reconnect {
                    self.end_slot(s);
                    return;
                }
                slot.down_since = Some(now);
                slot.attempt = 0;
                slot.next_target(self.shared.targets.len());
                run.note_loss();
            }
        }
        let wait = run
            .args
            .backoff()
            .delay(self.slots[s].attempt, rand::random::<f64>());
        let until = now + wait;
        self.slots[s].state = SlotState::Backoff { until };
        self.slot_timers.push(Reverse((until, s)));
    }

    /// Slot `s` is finished: its permit goes back, its record (if it ever connected) joins the
    /// run's.
    fn end_slot(&mut self, s: usize) {
        let slot = &mut self.slots[s];
        if std::mem::take(&mut slot.permit) {
            self.inflight -= 1;
        }
        slot.state = SlotState::Done;
        if slot.ever {
            let mut record = std::mem::take(&mut slot.record);
            if !self.run.stop.is_cancelled() {
                // The churn closed it: ticks after now are not its to receive.
                record.to_us = now_us();
            }
            self.run.records.lock().expect("records lock").push(record);
        }
    }

    /// The run is over: every session is closed normally and the close packets sent.
    fn stop(&mut self, now: Instant) {
        for s in 0..self.slots.len() {
            self.close_slot(s, now);
        }
        self.drive_dirty();
        self.flush_all();
    }

    /// Processes every connection on the dirty list.
    fn drive_dirty(&mut self) {
        let mut now = Instant::now();
        let mut n = 0usize;
        while let Some((i, ch)) = self.dirty.pop() {
            n += 1;
            if n.is_multiple_of(256) {
                now = Instant::now();
            }
            let (slot_progress, drained) = self.drive(i, ch, now);
            if let Some((s, progress)) = slot_progress {
                if progress.up {
                    self.slot_connected(s);
                }
                if let Some(outcome) = progress.ended {
                    if let Some(conn) = self.sockets[i].conns[ch].as_mut() {
                        conn.slot = None;
                    }
                    self.finish_attempt(s, outcome, now);
                }
            }
            if drained {
                self.sockets[i].conns[ch] = None;
                self.live_conns -= 1;
            }
        }
    }

    /// One pass over a connection: endpoint events both ways, application events, packets to
    /// send, the next deadline. Returns what it meant for the slot, and whether the connection
    /// is drained (and gone from the endpoint).
    fn drive(&mut self, i: usize, ch: usize, now: Instant) -> (Option<(usize, Progress)>, bool) {
        let run = &*self.run;
        let shared = &*self.shared;
        let sock = &mut self.sockets[i];
        let Some(conn) = sock.conns.get_mut(ch).and_then(Option::as_mut) else {
            return (None, false);
        };
        conn.dirty = false;
        let mut progress = Progress::default();
        let mut slot = conn.slot.map(|s| &mut self.slots[s]);
        loop {
            let mut busy = false;
            while let Some(event) = conn.qc.poll_endpoint_events() {
                busy = true;
                if let Some(event) = sock.endpoint.handle_event(ConnectionHandle(ch), event) {
                    conn.qc.handle_event(event);
                }
            }
            while let Some(event) = conn.qc.poll() {
                busy = true;
                on_event(
                    conn,
                    slot.as_deref_mut(),
                    run,
                    shared,
                    now,
                    event,
                    &mut progress,
                );
            }
            if !busy {
                break;
            }
        }
        loop {
            let mut buf = self.spare.pop().unwrap_or_default();
            // quinn-proto appends to the buffer: it must start empty every call.
            buf.clear();
            match conn.qc.poll_transmit(now, 1, &mut buf) {
                Some(t) => {
                    buf.truncate(t.size);
                    self.counts.packets_out += 1;
                    sock.out.push((t.destination, buf));
                    if sock.out.len() >= SEND_BATCH {
                        self.send_drops += flush(&sock.udp, &mut sock.out, &mut self.spare);
                    }
                }
                None => {
                    self.spare.push(buf);
                    break;
                }
            }
        }
        while let Some(event) = conn.qc.poll_endpoint_events() {
            if let Some(event) = sock.endpoint.handle_event(ConnectionHandle(ch), event) {
                conn.qc.handle_event(event);
            }
        }
        let next = conn.qc.poll_timeout();
        if next != conn.timer {
            conn.timer = next;
            if let Some(t) = next {
                self.timers.push(Reverse((t, i, ch)));
            }
        }
        let slot_progress = conn.slot.map(|s| (s, progress));
        // The endpoint has seen the drained event above; the handle may now be reused.
        (slot_progress, conn.qc.is_drained())
    }

    fn flush_all(&mut self) {
        for sock in &mut self.sockets {
            if !sock.out.is_empty() {
                self.send_drops += flush(&sock.udp, &mut sock.out, &mut self.spare);
            }
        }
    }
}

/// One application event of a connection: the HTTP/3 handshake, streams, datagrams, the end.
fn on_event(
    conn: &mut Conn,
    mut slot: Option<&mut Slot>,
    run: &Run,
    shared: &Shared,
    now: Instant,
    event: Event,
    progress: &mut Progress,
) {
    match event {
        Event::Connected => {
            conn.app.handshaked = true;
            if let Some(id) = conn.qc.streams().open(Dir::Uni) {
                write(conn, id, &shared.control);
            }
            match conn.qc.streams().open(Dir::Bi) {
                Some(id) => {
                    conn.app.bidi = Some(id);
                    write(conn, id, &shared.targets[conn.target].request);
                }
                None => end(
                    conn,
                    now,
                    progress,
                    CloseCode::Normal,
                    Outcome::Failed(ConnectFailure::Handshake(
                        "the server allows no request stream".into(),
                    )),
                ),
            }
        }
        Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
            while let Some(id) = conn.qc.streams().accept(Dir::Uni) {
                conn.app
                    .uni
                    .push((id, Uni::Header(UniHeaderReader::default())));
                read(conn, run, now, id, progress);
            }
        }
        Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
            // fleetcast's server opens none; take them so they do not count against it.
            while conn.qc.streams().accept(Dir::Bi).is_some() {}
        }
        Event::Stream(StreamEvent::Readable { id }) => {
            read(conn, run, now, id, progress);
        }
        Event::Stream(StreamEvent::Writable { id }) => {
            if let Some(k) = conn.app.pending.iter().position(|(p, _)| *p == id) {
                let (_, bytes) = conn.app.pending.swap_remove(k);
                write(conn, id, &bytes);
            }
        }
        Event::DatagramReceived => {
            while let Some(d) = conn.qc.datagrams().recv() {
                let Ok(datagram) = Datagram::read(&d) else {
                    continue;
                };
                let payload = datagram.payload();
                if let (Some(slot), Ok(header)) = (slot.as_deref_mut(), TickHeader::decode(payload))
                {
                    slot.record.datagram(header, payload.len(), &run.window);
                }
            }
        }
        Event::ConnectionLost { reason } => {
            let text = reason.to_string();
            let outcome = if conn.app.up {
                Outcome::Lost(text)
            } else if !conn.app.handshaked {
                Outcome::Failed(ConnectFailure::Handshake(short(&text)))
            } else {
                Outcome::Failed(ConnectFailure::EndedEarly(short(&text)))
            };
            if !conn.app.ended {
                conn.app.ended = true;
                progress.ended = Some(outcome);
            }
        }
        Event::HandshakeDataReady
        | Event::DatagramsUnblocked
        | Event::Stream(StreamEvent::Finished { .. })
        | Event::Stream(StreamEvent::Stopped { .. })
        | Event::Stream(StreamEvent::Available { .. }) => {}
    }
}

/// Writes `bytes` to stream `id`, keeping what flow control does not take for later.
fn write(conn: &mut Conn, id: StreamId, bytes: &[u8]) {
    match conn.qc.send_stream(id).write(bytes) {
        Ok(n) if n < bytes.len() => conn.app.pending.push((id, bytes[n..].to_vec())),
        Ok(_) => {}
        Err(quinn_proto::WriteError::Blocked) => conn.app.pending.push((id, bytes.to_vec())),
        // Stopped or closed: the connection's end will tell.
        Err(e) => debug!("write on {id}: {e}"),
    }
}

/// Ends the attempt from this side (a refusal, a bad answer), closing the connection.
fn end(conn: &mut Conn, now: Instant, progress: &mut Progress, code: CloseCode, outcome: Outcome) {
    if conn.app.ended {
        return;
    }
    conn.app.ended = true;
    conn.qc.close(
        now,
        VarInt::from_u32(code.code()),
        Bytes::from_static(b"client done"),
    );
    progress.ended = Some(outcome);
}

/// Reads what stream `id` has and acts on it.
fn read(conn: &mut Conn, run: &Run, now: Instant, id: StreamId, progress: &mut Progress) {
    let mut chunks_read: Vec<Bytes> = Vec::new();
    let mut finished = false;
    {
        let mut stream = conn.qc.recv_stream(id);
        let Ok(mut chunks) = stream.read(true) else {
            return;
        };
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => chunks_read.push(chunk.bytes),
                Ok(None) => {
                    finished = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(_)) => {
                    finished = true;
                    break;
                }
            }
        }
        // Whether to send flow-control credit is decided at the next poll_transmit anyway.
        let _ = chunks.finalize();
    }
    if Some(id) == conn.app.bidi {
        for bytes in &chunks_read {
            match conn.app.response.push(bytes) {
                Ok(Some(200)) | Ok(None) => {}
                Ok(Some(status)) => {
                    let outcome = Outcome::Failed(ConnectFailure::Refused(Some(status)));
                    return end(conn, now, progress, CloseCode::Normal, outcome);
                }
                Err(e) => {
                    let outcome = Outcome::Failed(ConnectFailure::Handshake(short(&e.to_string())));
                    return end(conn, now, progress, CloseCode::ProtocolViolation, outcome);
                }
            }
        }
        if finished && conn.app.response.push(&[]).ok().flatten().is_none() {
            let outcome = Outcome::Failed(ConnectFailure::Refused(None));
            end(conn, now, progress, CloseCode::Normal, outcome);
        }
        return;
    }
    let Some(k) = conn.app.uni.iter().position(|(u, _)| *u == id) else {
        return;
    };
    for bytes in chunks_read {
        let rest = match &mut conn.app.uni[k].1 {
            Uni::Header(reader) => match reader.push(&bytes) {
                None => continue,
                Some((UniKind::WebTransport, rest)) => {
                    conn.app.uni[k].1 = Uni::Session;
                    rest
                }
                Some((UniKind::Ignored, _)) => {
                    conn.app.uni[k].1 = Uni::Ignored;
                    continue;
                }
            },
            Uni::Session => bytes.to_vec(),
            Uni::Ignored => continue,
        };
        conn.app.frames.push(&rest);
        loop {
            match conn.app.frames.next_message() {
                Ok(Some(StreamMessage::Hello(hello))) => run.note_hello(&hello),
                Ok(Some(StreamMessage::State(_))) => {
                    if !conn.app.up && !conn.app.ended {
                        conn.app.up = true;
                        progress.up = true;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    let reason = format!("server sent an undecodable frame: {e}");
                    let outcome = if conn.app.up {
                        Outcome::Lost(reason)
                    } else {
                        Outcome::Failed(ConnectFailure::EndedEarly(short(&reason)))
                    };
                    return end(conn, now, progress, CloseCode::ProtocolViolation, outcome);
                }
            }
        }
    }
}

/// Sends the queued packets with `sendmmsg`, up to [`SEND_BATCH`] a call; returns how many
/// were dropped because the send buffer was full (QUIC recovers them like any loss).
fn flush(udp: &UdpSocket, out: &mut Vec<(SocketAddr, Vec<u8>)>, spare: &mut Vec<Vec<u8>>) -> u64 {
    let mut dropped = 0;
    let mut sent = 0;
    while sent < out.len() {
        let batch = &out[sent..out.len().min(sent + SEND_BATCH)];
        let addrs: Vec<socket2::SockAddr> = batch.iter().map(|(a, _)| (*a).into()).collect();
        let mut iovs: Vec<libc::iovec> = batch
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = addrs
            .iter()
            .zip(iovs.iter_mut())
            .map(|(addr, iov)| {
                // SAFETY: an all-zero mmsghdr is a valid empty header; the pointers set below
                // stay valid (addrs, iovs and the packets live until the call returns).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
                m.msg_hdr.msg_namelen = addr.len();
                m.msg_hdr.msg_iov = iov as *mut libc::iovec;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` holds `msgs.len()` initialised headers whose buffers outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                udp.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => {
                // The send buffer is full: drop this batch rather than stall every session.
                dropped += batch.len() as u64;
                sent += batch.len();
            }
            _ => {
                // One bad destination must not hold the rest back.
                debug!("sendmmsg: {e}");
                dropped += 1;
                sent += 1;
            }
        }
    }
    spare.extend(out.drain(..).map(|(_, b)| b));
    dropped
}
