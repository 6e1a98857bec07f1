//! One shard: an event loop on its own thread that owns a UDP socket, a quinn-proto endpoint
//! and every connection that endpoint accepted.
//!
//! Nothing in a shard waits on a connection: packets are read in batches and handed straight to
//! their connection, one timer heap holds every connection's deadline (stale entries are
//! skipped, never woken for), and a tick is one pass over the shard's sessions that queues each
//! one's datagrams, collects the packets and sends them in batches, reading the socket every
//! [`READ_EVERY`] sessions so acknowledgements never wait behind a long pass.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Endpoint, Event, Incoming, ServerConfig,
    StreamEvent, StreamId, VarInt,
};
use tokio::io::Interest;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace};

use super::h3::{self, ConnectStreamEvent, Requested, UniKind};
use super::{Command, EngineTick};
use crate::proto::wire::{CloseCode, StreamMessage};
use crate::server::admission::{Refusal, SessionSlot};
use crate::server::config::origin_allowed;
use crate::server::feed::TickEncoder;
use crate::server::{now_us, Shared, Stats, SESSION_PATH};
use crate::token;

/// Sessions served between reads of the socket during a tick's pass.
const READ_EVERY: usize = 1024;
/// Packets collected before they are written to the socket.
const SEND_BATCH: usize = 64;
/// How long a goodbye stage, or a close capsule's acknowledgement, may take.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);
/// Close reason sent with [`CloseCode::Normal`] when the client ended the session.
const CLIENT_ENDED: &str = "the client ended the session";
/// The most a client's stream may hold unread by us before we give up on it.
const MAX_BUFFERED: usize = 2 * h3::MAX_FRAME;

/// Which deadline a timer heap entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// quinn-proto's own (loss detection, idle, ACK delay, ...).
    Quic,
    /// Ours: handshake, reply, write and goodbye limits.
    App,
}

/// Why a live session ended.
#[derive(Debug)]
enum End {
    /// The client ended it (capsule, FIN on the CONNECT stream, or a QUIC close).
    ClientEnded,
    Violation(&'static str),
    Slow(Duration),
    Internal(String),
}

/// A uni stream the client opened.
enum UniIn {
    /// Its type has not arrived yet.
    Pending(Vec<u8>),
    /// The control stream, until its SETTINGS frame is complete.
    Control(Vec<u8>),
    /// Nothing more to read from it (QPACK, unknown types, control after SETTINGS).
    Discard,
}

/// The request stream.
struct ConnectStream {
    id: StreamId,
    /// Bytes read and not consumed yet.
    frames: Vec<u8>,
    /// Capsule bytes from DATA frames, not consumed yet.
    capsules: Vec<u8>,
    /// The request, once its HEADERS arrived, until it is answered.
    request: Option<h3::Request>,
    answered: bool,
    /// What QUIC has not taken yet of the response (flow control).
    unsent: Bytes,
}

/// Goodbye stages at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goodbye {
    /// The Goodbye frame is queued on the stream; the stream is finished once it is written.
    Writing,
    /// Finished: waiting for the client to acknowledge it.
    Acking,
    /// Acknowledged: the client may read it and end the session itself.
    AwaitClient,
}

/// A session that was accepted.
struct Live {
    _slot: SessionSlot,
    id: u64,
    /// The datagram header (quarter stream id).
    header: Arc<[u8]>,
    /// The server's uni stream.
    uni: StreamId,
    /// Stream bytes not yet taken by QUIC (flow control).
    pending: VecDeque<Bytes>,
    /// Datagrams queued so far.
    queued: u64,
    goodbye: Option<Goodbye>,
}

enum Phase {
    /// QUIC handshake, HTTP/3 settings and the CONNECT request, until answered.
    Opening,
    /// A refusal is being sent: the connection closes once the client acknowledged it.
    Refused,
    /// The 200 is being sent: the session starts once QUIC took all of it.
    Accepting(SessionSlot),
    Live(Box<Live>),
    /// A close capsule was sent: the connection closes once it is acknowledged.
    Closing {
        code: u32,
        reason: String,
    },
    /// `close` was called: waiting for quinn-proto to drain it.
    Closed,
}

struct Conn {
    quic: quinn_proto::Connection,
    remote: SocketAddr,
    /// quinn-proto's deadline as pushed on the heap.
    timer: Option<Instant>,
    /// Our deadline as pushed on the heap.
    deadline: Option<Instant>,
    phase: Phase,
    /// Counted in the handshakes in flight.
    handshaking: bool,
    /// The client's SETTINGS were read and allow WebTransport.
    settings: bool,
    uni_in: Vec<(StreamId, UniIn)>,
    connect: Option<ConnectStream>,
    dirty: bool,
}

/// What the shard was built with.
pub(crate) struct Parts {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub socket: std::net::UdpSocket,
    pub endpoint_config: Arc<quinn_proto::EndpointConfig>,
    pub server_config: watch::Receiver<Arc<ServerConfig>>,
    pub ticks: watch::Receiver<Option<Arc<EngineTick>>>,
    pub commands: mpsc::Receiver<Command>,
    pub peers: Arc<Vec<mpsc::Sender<Command>>>,
    pub handshakes: Arc<AtomicUsize>,
    pub token: CancellationToken,
}

/// Packets collected for one batched send.
struct Outgoing {
    buf: Vec<u8>,
    items: Vec<Item>,
    scratch: Vec<u8>,
}

struct Item {
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    start: usize,
    len: usize,
    segment_size: Option<usize>,
    src_ip: Option<IpAddr>,
}

impl Outgoing {
    fn push(&mut self, t: &quinn_proto::Transmit, contents: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&contents[..t.size]);
        self.items.push(Item {
            destination: t.destination,
            ecn: t.ecn,
            start,
            len: t.size,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        });
    }
}

pub(crate) struct Shard {
    index: usize,
    shared: Arc<Shared>,
    socket: tokio::net::UdpSocket,
    udp: quinn_udp::UdpSocketState,
    endpoint: Endpoint,
    server_config: watch::Receiver<Arc<ServerConfig>>,
    conns: Vec<Option<Conn>>,
    timers: BinaryHeap<Reverse<(Instant, usize, Kind)>>,
    dirty: Vec<usize>,
    out: Outgoing,
    recv_bufs: Vec<Vec<u8>>,
    handshakes: Arc<AtomicUsize>,
    events: broadcast::Receiver<Arc<StreamMessage>>,
    ticks: watch::Receiver<Option<Arc<EngineTick>>>,
    commands: mpsc::Receiver<Command>,
    peers: Arc<Vec<mpsc::Sender<Command>>>,
    token: CancellationToken,
    /// When the shutdown started; `None` while serving.
    closing: Option<Instant>,
    live: usize,
    max_gso: usize,
}

impl Shard {
    pub(crate) fn new(parts: Parts) -> std::io::Result<Shard> {
        let socket = tokio::net::UdpSocket::from_std(parts.socket)?;
        let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
        let max_gso = udp.max_gso_segments().min(10);
        let endpoint = Endpoint::new(
            parts.endpoint_config,
            Some(parts.server_config.borrow().clone()),
            true,
            None,
        );
        let events = parts.shared.roster_events.subscribe();
        let slot = 64 * 1024 * udp.gro_segments().clamp(1, 1);
        Ok(Shard {
            index: parts.index,
            shared: parts.shared,
            socket,
            endpoint,
            server_config: parts.server_config,
            conns: Vec::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            out: Outgoing {
                buf: Vec::with_capacity(SEND_BATCH * 1500),
                items: Vec::with_capacity(SEND_BATCH),
                scratch: Vec::with_capacity(1500),
            },
            recv_bufs: (0..quinn_udp::BATCH_SIZE).map(|_| vec![0; slot]).collect(),
            udp,
            handshakes: parts.handshakes,
            events,
            ticks: parts.ticks,
            commands: parts.commands,
            peers: parts.peers,
            token: parts.token,
            closing: None,
            live: 0,
            max_gso,
        })
    }

    /// Runs until the shutdown is complete.
    pub(crate) async fn run(mut self) {
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        // The instant the sleep is set for; far away when nothing is due.
        let far = || Instant::now() + Duration::from_secs(3600);
        let mut armed = far();
        // Ticks keep every session alive: each datagram's acknowledgement restarts the idle
        // timer on both sides. When no tick has gone out for a third of the idle timeout
        // (slow ticks; a cluster without NATS or without a ticker), live sessions get a PING
        // instead, so they stay open until ticks resume. Handshakes get none: a client that
        // never opens its session is still closed by the idle timeout.
        let quiet = self.shared.args.idle_timeout / 3;
        let keepalive = tokio::time::sleep(quiet);
        tokio::pin!(keepalive);
        loop {
            if self.closing.is_some() && self.done_closing() {
                break;
            }
            let next = match self.next_deadline() {
                Some(due) => due,
                None if armed > Instant::now() + Duration::from_secs(1800) => armed,
                None => far(),
            };
            if next != armed {
                armed = next;
                sleep.as_mut().reset(tokio::time::Instant::from_std(next));
            }
            let serving = self.closing.is_none();
            tokio::select! {
                biased;
                _ = self.token.cancelled(), if serving => self.begin_shutdown(),
                ready = self.socket.readable() => {
                    if ready.is_ok() {
                        self.read_socket(usize::MAX);
                    }
                }
                // Roster events before ticks: a tick's events are sent before its snapshot and
                // its datagrams, so a session gets a car's CarsAdded before the first tick that
                // carries the car (PROTOCOL.md section 7, rule 3).
                event = self.events.recv() => self.on_roster_event(event),
                changed = self.ticks.changed(), if serving => {
                    if changed.is_ok() {
                        let tick = self.ticks.borrow_and_update().clone();
                        if let Some(tick) = tick {
                            self.fan_out(&tick).await;
                            keepalive.as_mut().reset(tokio::time::Instant::now() + quiet);
                        }
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Packet { remote, dst_ip, ecn, data }) => {
                        self.on_packet(Instant::now(), remote, dst_ip, ecn, data);
                    }
                    None => {}
                },
                changed = self.server_config.changed() => {
                    if changed.is_ok() {
                        let config = self.server_config.borrow_and_update().clone();
                        self.endpoint.set_server_config(Some(config));
                    }
                }
                _ = &mut keepalive, if serving => {
                    self.ping_live();
                    keepalive.as_mut().reset(tokio::time::Instant::now() + quiet);
                }
                _ = &mut sleep => {
                    self.fire_timers(Instant::now());
                    // Re-armed above, whatever is due next.
                    armed = far();
                    sleep.as_mut().reset(tokio::time::Instant::from_std(armed));
                }
            }
            self.process_dirty();
            self.flush().await;
        }
        // Send the last CONNECTION_CLOSE packets.
        self.process_dirty();
        self.flush().await;
        debug!(shard = self.index, "shard stopped");
    }

    // ---- sockets ----

    /// Reads and handles up to `limit` batches of packets (until the socket is empty); returns
    /// how many datagrams it read.
    fn read_socket(&mut self, limit: usize) -> usize {
        let mut read = 0;
        let mut bufs = std::mem::take(&mut self.recv_bufs);
        let mut metas = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        for _ in 0..limit {
            let n = {
                let mut iovs: Vec<IoSliceMut> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let (socket, udp) = (&self.socket, &self.udp);
                match socket.try_io(Interest::READABLE, || {
                    udp.recv(socket.into(), &mut iovs, &mut metas)
                }) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // An ICMP error (port unreachable, say) for an earlier send: it is
                        // consumed by this read; carry on with the next.
                        trace!(shard = self.index, "UDP receive: {e}");
                        continue;
                    }
                }
            };
            read += n;
            let now = Instant::now();
            for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
                let ecn = meta.ecn.and_then(|e| EcnCodepoint::from_bits(e as u8));
                let stride = meta.stride.max(1);
                for chunk in buf[..meta.len].chunks(stride) {
                    self.on_packet(now, meta.addr, meta.dst_ip, ecn, BytesMut::from(chunk));
                }
            }
            self.process_dirty();
        }
        self.recv_bufs = bufs;
        Stats::add(&self.shared.stats.udp_received, read as u64);
        read
    }

    /// Writes the collected packets.
    async fn flush(&mut self) {
        let mut i = 0;
        while i < self.out.items.len() {
            let item = &self.out.items[i];
            let transmit = quinn_udp::Transmit {
                destination: item.destination,
                ecn: item
                    .ecn
                    .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
                contents: &self.out.buf[item.start..item.start + item.len],
                segment_size: item.segment_size,
                src_ip: item.src_ip,
            };
            let (socket, udp) = (&self.socket, &self.udp);
            match socket.try_io(Interest::WRITABLE, || udp.send(socket.into(), &transmit)) {
                Ok(()) => i += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.socket.writable().await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    // quinn-udp logs it; the packet counts as lost and QUIC recovers.
                    trace!(shard = self.index, "UDP send failed: {e}");
                    i += 1;
                }
            }
        }
        let segments: usize = self
            .out
            .items
            .iter()
            .map(|item| match item.segment_size {
                Some(size) if size > 0 => item.len.div_ceil(size),
                _ => 1,
            })
            .sum();
        Stats::add(&self.shared.stats.udp_sent, segments as u64);
        self.out.items.clear();
        self.out.buf.clear();
    }

    // ---- packets and connections ----

    /// The shard a packet's connection lives on, from our connection id's first byte.
    fn route(&self, data: &[u8]) -> Option<usize> {
        let shards = self.peers.len();
        if shards < 2 {
            return None;
        }
        let first = *data.first()?;
        let dcid_first = if first & 0x80 != 0 {
            // Long header: an Initial may carry the client's own choice of id: handle it here.
            if (first >> 4) & 0x03 == 0 {
                return None;
            }
            let len = *data.get(5)? as usize;
            if len != super::CID_LEN {
                return None;
            }
            *data.get(6)?
        } else {
            *data.get(1)?
        };
        let shard = usize::from(dcid_first);
        (shard < shards).then_some(shard)
    }

    fn on_packet(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    ) {
        if let Some(target) = self.route(&data) {
            if target != self.index {
                // A client whose address changed (NAT rebinding, migration) reaches another
                // shard's socket: hand the packet to the shard that owns its connection.
                let forwarded = self.peers[target].try_send(Command::Packet {
                    remote,
                    dst_ip,
                    ecn,
                    data,
                });
                let stats = &self.shared.stats;
                match forwarded {
                    Ok(()) => Stats::inc(&stats.packets_forwarded),
                    // Lost like any packet: QUIC retransmits what mattered.
                    Err(_) => Stats::inc(&stats.packets_forward_dropped),
                }
                return;
            }
        }
        let mut response = std::mem::take(&mut self.out.scratch);
        response.clear();
        match self
            .endpoint
            .handle(now, remote, dst_ip, ecn, data, &mut response)
        {
            Some(DatagramEvent::NewConnection(incoming)) => self.on_incoming(now, incoming),
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(conn) = self.conns.get_mut(ch.0).and_then(Option::as_mut) {
                    conn.quic.handle_event(event);
                    self.mark_dirty(ch.0);
                }
            }
            Some(DatagramEvent::Response(transmit)) => self.out.push(&transmit, &response),
            None => {}
        }
        self.out.scratch = response;
    }

    /// Accepts, refuses, retries or ignores a new connection attempt, before any handshake work.
    fn on_incoming(&mut self, now: Instant, incoming: Incoming) {
        let shared = self.shared.clone();
        let args = &shared.args;
        let stats = &shared.stats;
        let mut buf = std::mem::take(&mut self.out.scratch);
        buf.clear();
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let max = args.max_handshakes.max(1);
        let in_flight = self.handshakes.load(Ordering::Relaxed);
        if self.closing.is_some() {
            // Shutting down: no answer at all. A refusal would make the client count a failed
            // attempt and back off; unanswered, it retransmits its Initial and, when this is a
            // restart, reaches the new server within its own open timeout.
            self.endpoint.ignore(incoming);
        } else if !validated && in_flight >= args.validate_above {
            // Many handshakes at once: make the client prove its address first (a Retry costs
            // one stateless packet), so spoofed sources cannot take handshake slots.
            Stats::inc(&stats.handshakes_retried);
            self.retry(incoming, &mut buf);
        } else if !shared.handshake_allowed(remote.ip(), now) {
            if validated {
                Stats::inc(&stats.refused_handshake_rate);
                debug!(%remote, "refused: --handshakes-per-ip exceeded");
                let t = self.endpoint.refuse(incoming, &mut buf);
                self.out.push(&t, &buf);
            } else {
                // The source may be spoofed to get a victim refused: ask it to validate.
                Stats::inc(&stats.handshakes_retried);
                self.retry(incoming, &mut buf);
            }
        } else if in_flight >= max {
            Stats::inc(&stats.refused_busy);
            let t = self.endpoint.refuse(incoming, &mut buf);
            self.out.push(&t, &buf);
        } else {
            match self.endpoint.accept(incoming, now, &mut buf, None) {
                Ok((ch, quic)) => {
                    self.handshakes.fetch_add(1, Ordering::Relaxed);
                    let conn = Conn {
                        quic,
                        remote,
                        timer: None,
                        deadline: None,
                        phase: Phase::Opening,
                        handshaking: true,
                        settings: false,
                        uni_in: Vec::new(),
                        connect: None,
                        dirty: false,
                    };
                    if self.conns.len() <= ch.0 {
                        self.conns.resize_with(ch.0 + 1, || None);
                    }
                    self.conns[ch.0] = Some(conn);
                    self.set_deadline(ch.0, now + args.handshake_timeout);
                    self.mark_dirty(ch.0);
                }
                Err(e) => {
                    Stats::inc(&stats.handshake_failed);
                    debug!(%remote, "connection not accepted: {}", e.cause);
                    if let Some(t) = e.response {
                        self.out.push(&t, &buf);
                    }
                }
            }
        }
        self.out.scratch = buf;
    }

    fn retry(&mut self, incoming: Incoming, buf: &mut Vec<u8>) {
        match self.endpoint.retry(incoming, buf) {
            Ok(t) => self.out.push(&t, buf),
            Err(e) => self.endpoint.ignore(e.into_incoming()),
        }
    }

    fn mark_dirty(&mut self, ch: usize) {
        if let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(ch);
            }
        }
    }

    fn process_dirty(&mut self) {
        let now = Instant::now();
        while let Some(ch) = self.dirty.pop() {
            if let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) {
                conn.dirty = false;
                self.drive(ch, now);
            }
        }
    }

    /// Handles what a connection has to say after anything happened to it: its events, its
    /// endpoint events, its packets and its next deadline.
    fn drive(&mut self, ch: usize, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                return;
            };
            let Some(event) = conn.quic.poll() else { break };
            self.on_event(ch, event, now);
        }
        loop {
            let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                return;
            };
            let Some(event) = conn.quic.poll_endpoint_events() else {
                break;
            };
            let drained = event.is_drained();
            if let Some(event) = self.endpoint.handle_event(ConnectionHandle(ch), event) {
                conn.quic.handle_event(event);
            }
            if drained {
                self.remove(ch);
                return;
            }
        }
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        // quinn-proto writes each transmit at the start of an empty buffer.
        let mut scratch = std::mem::take(&mut self.out.scratch);
        loop {
            scratch.clear();
            let Some(t) = conn.quic.poll_transmit(now, self.max_gso, &mut scratch) else {
                break;
            };
            self.out.push(&t, &scratch);
        }
        self.out.scratch = scratch;
        let timer = conn.quic.poll_timeout();
        if timer != conn.timer {
            conn.timer = timer;
            if let Some(t) = timer {
                self.timers.push(Reverse((t, ch, Kind::Quic)));
            }
        }
    }

    /// Forgets a drained connection.
    fn remove(&mut self, ch: usize) {
        let Some(mut conn) = self.conns.get_mut(ch).and_then(Option::take) else {
            return;
        };
        if conn.handshaking {
            self.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
        if let Phase::Live(live) = std::mem::replace(&mut conn.phase, Phase::Closed) {
            account_end(&self.shared, &conn.quic, &live);
            self.live -= 1;
        }
    }

    // ---- deadlines ----

    fn set_deadline(&mut self, ch: usize, at: Instant) {
        if let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) {
            conn.deadline = Some(at);
            self.timers.push(Reverse((at, ch, Kind::App)));
        }
    }

    fn clear_deadline(&mut self, ch: usize) {
        if let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) {
            conn.deadline = None; // its heap entry is now stale
        }
    }

    fn is_current(&self, at: Instant, ch: usize, kind: Kind) -> bool {
        let Some(conn) = self.conns.get(ch).and_then(Option::as_ref) else {
            return false;
        };
        match kind {
            Kind::Quic => conn.timer == Some(at),
            Kind::App => conn.deadline == Some(at),
        }
    }

    /// The earliest live deadline; stale heap entries are dropped on the way.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, ch, kind))) = self.timers.peek() {
            if self.is_current(at, ch, kind) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, ch, kind))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if !self.is_current(at, ch, kind) {
                continue;
            }
            let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                continue;
            };
            match kind {
                Kind::Quic => {
                    conn.timer = None;
                    conn.quic.handle_timeout(now);
                }
                Kind::App => {
                    conn.deadline = None;
                    self.on_deadline(ch, now);
                }
            }
            self.mark_dirty(ch);
        }
    }

    fn on_deadline(&mut self, ch: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let remote = conn.remote;
        let shared = self.shared.clone();
        let stats = &shared.stats;
        match &mut conn.phase {
            Phase::Opening => {
                Stats::inc(&stats.handshake_failed);
                debug!(%remote, "no CONNECT within {:?}", shared.args.handshake_timeout);
                self.close(
                    ch,
                    now,
                    h3::H3_REQUEST_REJECTED,
                    "no session request in time",
                );
            }
            Phase::Refused => {
                Stats::inc(&stats.reply_timeouts);
                debug!(%remote, "refusal not taken within --write-timeout: connection dropped");
                self.close(ch, now, h3::H3_NO_ERROR, "");
            }
            Phase::Accepting(_) => {
                Stats::inc(&stats.reply_timeouts);
                debug!(%remote, "acceptance not taken within --write-timeout: connection dropped");
                self.close(ch, now, h3::H3_NO_ERROR, "");
            }
            Phase::Live(live) => {
                if live.goodbye.is_none() {
                    self.end_session(ch, now, End::Slow(shared.args.write_timeout));
                } else {
                    // The client took too long to acknowledge the Goodbye or to end the session.
                    self.end_session(ch, now, End::Internal(String::new()));
                }
            }
            Phase::Closing { code, reason } => {
                let (code, reason) = (*code, std::mem::take(reason));
                self.close(ch, now, code, &reason);
            }
            Phase::Closed => {}
        }
    }

    // ---- connection events ----

    fn on_event(&mut self, ch: usize, event: Event, now: Instant) {
        match event {
            Event::HandshakeDataReady => {}
            Event::Connected => self.on_connected(ch, now),
            Event::ConnectionLost { reason } => self.on_lost(ch, reason.to_string()),
            Event::Stream(StreamEvent::Opened { dir }) => self.accept_streams(ch, dir, now),
            Event::Stream(StreamEvent::Readable { id }) => self.on_readable(ch, id, now),
            Event::Stream(StreamEvent::Writable { id }) => self.on_writable(ch, id, now),
            Event::Stream(StreamEvent::Finished { id }) => self.on_finished(ch, id, now),
            Event::Stream(StreamEvent::Stopped { id, .. }) => self.on_stopped(ch, id, now),
            Event::Stream(StreamEvent::Available { .. }) => {}
            Event::DatagramReceived => {
                let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                    return;
                };
                while conn.quic.datagrams().recv().is_some() {}
                self.violation(ch, now, "clients must not send datagrams in protocol v1");
            }
            Event::DatagramsUnblocked => {}
        }
    }

    fn on_connected(&mut self, ch: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let preamble = h3::control_stream_preamble();
        let written = conn
            .quic
            .streams()
            .open(Dir::Uni)
            .and_then(|id| conn.quic.send_stream(id).write(&preamble).ok());
        if written != Some(preamble.len()) {
            self.close(
                ch,
                now,
                h3::H3_CLOSED_CRITICAL_STREAM,
                "cannot open the control stream",
            );
        }
    }

    fn on_lost(&mut self, ch: usize, reason: String) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        match conn.phase {
            Phase::Opening => {
                Stats::inc(&self.shared.stats.handshake_failed);
                debug!(remote = %conn.remote, "handshake failed: {reason}");
            }
            Phase::Live(_) => {
                debug!(remote = %conn.remote, "session ended: {reason}");
                self.finish_live(ch);
            }
            _ => {}
        }
        if let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) {
            conn.phase = Phase::Closed;
            conn.deadline = None;
            if conn.handshaking {
                conn.handshaking = false;
                self.handshakes.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn accept_streams(&mut self, ch: usize, dir: Dir, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                return;
            };
            let Some(id) = conn.quic.streams().accept(dir) else {
                return;
            };
            match dir {
                Dir::Uni => conn.uni_in.push((id, UniIn::Pending(Vec::new()))),
                Dir::Bi if conn.connect.is_none() && matches!(conn.phase, Phase::Opening) => {
                    conn.connect = Some(ConnectStream {
                        id,
                        frames: Vec::new(),
                        capsules: Vec::new(),
                        request: None,
                        answered: false,
                        unsent: Bytes::new(),
                    });
                }
                Dir::Bi => {
                    if matches!(conn.phase, Phase::Live(_)) {
                        self.violation(ch, now, "clients must not open streams in protocol v1");
                        return;
                    }
                    // One session per connection: refuse further requests.
                    let code = VarInt::from_u32(h3::H3_REQUEST_REJECTED);
                    let _ = conn.quic.recv_stream(id).stop(code);
                    let _ = conn.quic.send_stream(id).reset(code);
                }
            }
            self.on_readable(ch, id, now);
        }
    }

    /// Reads what a stream has: bytes appended to `out` (at most `cap` in total), whether it
    /// ended, or the reset code.
    fn read(
        quic: &mut quinn_proto::Connection,
        id: StreamId,
        out: Option<&mut Vec<u8>>,
    ) -> ReadOutcome {
        let mut recv = quic.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            return ReadOutcome::Closed;
        };
        let mut outcome = ReadOutcome::Open;
        let mut out = out;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => {
                    if let Some(out) = out.as_deref_mut() {
                        if out.len() + chunk.bytes.len() > MAX_BUFFERED {
                            outcome = ReadOutcome::TooMuch;
                            break;
                        }
                        out.extend_from_slice(&chunk.bytes);
                    }
                }
                Ok(None) => {
                    outcome = ReadOutcome::Finished;
                    break;
                }
                Err(quinn_proto::ReadError::Blocked) => break,
                Err(quinn_proto::ReadError::Reset(_)) => {
                    outcome = ReadOutcome::Reset;
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        outcome
    }

    fn on_readable(&mut self, ch: usize, id: StreamId, now: Instant) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        if conn.connect.as_ref().is_some_and(|c| c.id == id) {
            self.read_connect(ch, now);
            return;
        }
        let Some(pos) = conn.uni_in.iter().position(|(s, _)| *s == id) else {
            // A stream we refused: drain it.
            let _ = Self::read(&mut conn.quic, id, None);
            return;
        };
        let remote = conn.remote;
        let (_, state) = &mut conn.uni_in[pos];
        let outcome = match state {
            UniIn::Pending(buf) | UniIn::Control(buf) => Self::read(&mut conn.quic, id, Some(buf)),
            UniIn::Discard => Self::read(&mut conn.quic, id, None),
        };
        // Classify a new stream once its type is here.
        if let UniIn::Pending(buf) = state {
            if let Some((kind, len)) = h3::uni_stream_kind(buf) {
                match kind {
                    UniKind::Control => {
                        buf.drain(..len);
                        *state = UniIn::Control(std::mem::take(buf));
                    }
                    UniKind::Qpack => *state = UniIn::Discard,
                    UniKind::Unknown => {
                        let code = VarInt::from_u32(h3::H3_STREAM_CREATION_ERROR);
                        let _ = conn.quic.recv_stream(id).stop(code);
                        *state = UniIn::Discard;
                    }
                    UniKind::WebTransport => {
                        self.violation(ch, now, "clients must not open streams in protocol v1");
                        return;
                    }
                }
            }
        }
        let mut settings = None;
        let was_control = matches!(state, UniIn::Control(_));
        if let UniIn::Control(buf) = state {
            match h3::next_frame(buf) {
                Ok(None) => {}
                Ok(Some(frame)) => {
                    settings = Some(h3::check_settings(&frame));
                    *state = UniIn::Discard;
                }
                Err(e) => settings = Some(Err(e)),
            }
        }
        match settings {
            Some(Ok(())) => {
                conn.settings = true;
                // A request that waited for the settings can be answered now.
                self.maybe_answer(ch, now);
            }
            Some(Err(e)) => {
                debug!(%remote, "{e}");
                self.close(ch, now, e.code, e.reason);
                return;
            }
            None => {}
        }
        match outcome {
            ReadOutcome::TooMuch => {
                self.close(ch, now, h3::H3_FRAME_ERROR, "stream too large");
            }
            ReadOutcome::Finished | ReadOutcome::Reset | ReadOutcome::Closed => {
                let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                    return;
                };
                conn.uni_in.retain(|(s, _)| *s != id);
                if was_control && !conn.settings {
                    self.close(
                        ch,
                        now,
                        h3::H3_CLOSED_CRITICAL_STREAM,
                        "control stream closed",
                    );
                }
            }
            ReadOutcome::Open => {}
        }
    }

    fn read_connect(&mut self, ch: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let live = matches!(conn.phase, Phase::Live(_));
        let remote = conn.remote;
        let Some(connect) = conn.connect.as_mut() else {
            return;
        };
        let outcome = Self::read(&mut conn.quic, connect.id, Some(&mut connect.frames));
        match connect_action(connect, &outcome) {
            ConnectAction::Nothing => {}
            ConnectAction::Answer => self.maybe_answer(ch, now),
            ConnectAction::Refuse(status) => {
                Stats::inc(&self.shared.stats.refused_not_found);
                debug!(%remote, status, "refused: not a WebTransport request");
                self.refuse(ch, now, status);
            }
            ConnectAction::Malformed(e) => {
                Stats::inc(&self.shared.stats.refused_malformed);
                self.close(ch, now, e.code, e.reason);
            }
            ConnectAction::ClientEnded(why) => {
                debug!(%remote, "the client ended the session: {why}");
                if live {
                    self.end_session(ch, now, End::ClientEnded);
                } else if self
                    .conns
                    .get(ch)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| matches!(c.phase, Phase::Closing { .. }))
                {
                    // The client answered our close capsule. Chromium reports a QUIC close that
                    // follows too closely as a lost connection rather than the capsule's code:
                    // the connection closes at the deadline, unless the client closes it first.
                } else {
                    self.close(ch, now, CloseCode::Normal.code(), CLIENT_ENDED);
                }
            }
            ConnectAction::Error(e) => {
                if live {
                    self.end_session(ch, now, End::Violation(e.reason));
                } else {
                    self.close(ch, now, e.code, e.reason);
                }
            }
        }
    }

    /// Answers the request once both it and the client's settings are here.
    fn maybe_answer(&mut self, ch: usize, now: Instant) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        if !conn.settings || !matches!(conn.phase, Phase::Opening) {
            return;
        }
        let Some(request) = conn.connect.as_mut().and_then(|c| c.request.take()) else {
            return;
        };
        let remote = conn.remote;
        let (path, query) = match request.path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (request.path.as_str(), None),
        };
        if let Some(name) = &request.upper_case {
            // HTTP/3 field names are lower-case (RFC 9114 §4.2): such a request is malformed,
            // and an `Origin` spelt otherwise must not pass as a request without one.
            Stats::inc(&stats.refused_malformed);
            debug!(%remote, header = %name, "refused: upper-case header name (400)");
            return self.refuse(ch, now, 400);
        }
        if path != SESSION_PATH {
            Stats::inc(&stats.refused_not_found);
            debug!(%remote, path, "refused: 404"); // without the query: it may hold a token
            return self.refuse(ch, now, 404);
        }
        if !origin_allowed(&shared.allowed_origins, request.origin.as_deref()) {
            Stats::inc(&stats.refused_forbidden);
            info!(%remote, origin = request.origin.as_deref(), "refused: origin not allowed (403)");
            return self.refuse(ch, now, 403);
        }
        if let Some(secret) = &shared.args.subscribe_secret {
            match token::verify_query(secret, query, now_us() / 1_000_000) {
                Ok(claims) => {
                    debug!(%remote, sub = claims.sub.as_deref(), "subscriber token accepted")
                }
                Err(e) => {
                    Stats::inc(&stats.refused_unauthorized);
                    // The reason only: the token itself is a credential and never logged.
                    debug!(%remote, "refused: {e} (401)");
                    return self.refuse(ch, now, 401);
                }
            }
        }
        let slot = match shared.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                match refusal {
                    Refusal::Full => Stats::inc(&stats.refused_full),
                    Refusal::PerAddress => Stats::inc(&stats.refused_per_ip),
                }
                debug!(%remote, ?refusal, "refused (429)");
                return self.refuse(ch, now, 429);
            }
        };
        self.accept(ch, now, slot);
    }

    /// Sends a refusal; the connection closes once the client has acknowledged it, or when it
    /// cannot take it within --write-timeout.
    fn refuse(&mut self, ch: usize, now: Instant, status: u16) {
        self.answer(ch, now, status, Phase::Refused);
    }

    /// Accepts the session: 200, then (once the client took it) the uni stream with the
    /// initial state, and datagrams from the next tick on.
    fn accept(&mut self, ch: usize, now: Instant, slot: SessionSlot) {
        self.answer(ch, now, 200, Phase::Accepting(slot));
    }

    /// Starts writing the response; `phase` says what happens once it is written.
    fn answer(&mut self, ch: usize, now: Instant, status: u16, phase: Phase) {
        let write_timeout = self.shared.args.write_timeout;
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let Some(connect) = conn.connect.as_mut() else {
            return;
        };
        connect.answered = true;
        connect.unsent = Bytes::from(h3::response(status));
        if conn.handshaking {
            conn.handshaking = false;
            self.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
        conn.phase = phase;
        // Like a refusal, an acceptance is a write the client could leave waiting forever.
        self.set_deadline(ch, now + write_timeout);
        self.write_response(ch, now);
    }

    /// Writes what QUIC takes of the response; once all of it is written, a refusal finishes
    /// the stream and an acceptance opens the session.
    fn write_response(&mut self, ch: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let Some(connect) = conn.connect.as_mut() else {
            return;
        };
        while !connect.unsent.is_empty() {
            match conn.quic.send_stream(connect.id).write(&connect.unsent) {
                Ok(0) | Err(quinn_proto::WriteError::Blocked) => return,
                Ok(n) => {
                    let _ = connect.unsent.split_to(n);
                }
                Err(e) => {
                    debug!(remote = %conn.remote, "response not sent: {e}");
                    self.close(ch, now, h3::H3_NO_ERROR, "");
                    return;
                }
            }
        }
        match &conn.phase {
            Phase::Refused => {
                let _ = conn.quic.send_stream(connect.id).finish();
            }
            Phase::Accepting(_) => self.go_live(ch, now),
            _ => {}
        }
    }

    /// The client has the 200: the session starts.
    fn go_live(&mut self, ch: usize, now: Instant) {
        let frames = self.initial_state();
        let shared = self.shared.clone();
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let Some(connect) = conn.connect.as_ref() else {
            return;
        };
        let session_id = VarInt::from(connect.id).into_inner();
        let Phase::Accepting(slot) = std::mem::replace(&mut conn.phase, Phase::Closed) else {
            return;
        };
        let Some(uni) = conn.quic.streams().open(Dir::Uni) else {
            self.close(
                ch,
                now,
                CloseCode::Internal.code(),
                "cannot open the reliable stream",
            );
            return;
        };
        let mut first = h3::webtransport_uni_header(session_id);
        first.extend_from_slice(&frames);
        let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        let mut pending = VecDeque::new();
        pending.push_back(Bytes::from(first));
        conn.phase = Phase::Live(Box::new(Live {
            _slot: slot,
            id,
            header: h3::datagram_header(session_id).into(),
            uni,
            pending,
            queued: 0,
            goodbye: None,
        }));
        conn.deadline = None;
        Stats::inc(&shared.stats.sessions_accepted);
        shared
            .stats
            .open_webtransport
            .fetch_add(1, Ordering::Relaxed);
        self.live += 1;
        debug!(session = id, remote = %conn.remote, shard = self.index, "opened");
        self.flush_stream(ch, now);
    }

    /// The initial state for a new session: every roster event published before its snapshot
    /// is first delivered to the sessions already open, so the new one gets exactly the events
    /// after its snapshot.
    fn initial_state(&mut self) -> Vec<u8> {
        let shared = self.shared.clone();
        let snapshot = {
            let _order = shared.publish_order.lock().expect("publish lock poisoned");
            loop {
                match self.events.try_recv() {
                    Ok(event) => self.deliver_event(&event),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => {
                        self.events = shared.roster_events.subscribe();
                        let snapshot = shared.latest.borrow().clone();
                        self.push_all(snapshot.frames.clone());
                        break;
                    }
                    Err(_) => break,
                }
            }
            let snapshot = shared.latest.borrow().clone();
            snapshot
        };
        shared.initial_frames(&snapshot)
    }

    fn on_roster_event(&mut self, event: Result<Arc<StreamMessage>, broadcast::error::RecvError>) {
        match event {
            Ok(event) => self.deliver_event(&event),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Resynchronise every session with the full roster and state instead of the
                // missed events; clients replace what they held.
                debug!(
                    shard = self.index,
                    missed = n,
                    "roster events lagged; resending full state"
                );
                let (events, snapshot) = self.shared.subscribe();
                self.events = events;
                self.push_all(snapshot.frames.clone());
            }
            Err(broadcast::error::RecvError::Closed) => {}
        }
    }

    fn deliver_event(&mut self, event: &StreamMessage) {
        if self.live == 0 {
            return;
        }
        let mut buf = Vec::new();
        // Invariant: roster events hold ids and labels only; they always encode.
        event.encode_frame(&mut buf).expect("roster events encode");
        self.push_all(Bytes::from(buf));
    }

    /// Queues `bytes` on every live session's stream.
    fn push_all(&mut self, bytes: Bytes) {
        let now = Instant::now();
        for ch in 0..self.conns.len() {
            let Some(Conn {
                phase: Phase::Live(live),
                ..
            }) = self.conns[ch].as_mut()
            else {
                continue;
            };
            if live.goodbye.is_some() {
                continue;
            }
            live.pending.push_back(bytes.clone());
            self.flush_stream(ch, now);
            self.mark_dirty(ch);
        }
    }

    /// Writes what QUIC takes of a live session's pending stream bytes; a session whose bytes
    /// stay pending for --write-timeout is closed as slow.
    fn flush_stream(&mut self, ch: usize, now: Instant) {
        let write_timeout = self.shared.args.write_timeout;
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let Phase::Live(live) = &mut conn.phase else {
            return;
        };
        let mut failed = None;
        while let Some(front) = live.pending.front_mut() {
            match conn.quic.send_stream(live.uni).write(front) {
                Ok(n) if n == front.len() => {
                    live.pending.pop_front();
                }
                Ok(n) => {
                    let _ = front.split_to(n);
                    break;
                }
                Err(quinn_proto::WriteError::Blocked) => break,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(e) = failed {
            self.end_session(
                ch,
                now,
                End::Internal(format!("reliable stream failed: {e}")),
            );
            return;
        }
        let empty = live.pending.is_empty();
        let goodbye = live.goodbye;
        if empty {
            if goodbye == Some(Goodbye::Writing) {
                let _ = conn.quic.send_stream(live.uni).finish();
                live.goodbye = Some(Goodbye::Acking);
            } else if goodbye.is_none() && conn.deadline.is_some() {
                self.clear_deadline(ch);
            }
        } else if goodbye.is_none() && conn.deadline.is_none() {
            self.set_deadline(ch, now + write_timeout);
        }
    }

    fn on_writable(&mut self, ch: usize, id: StreamId, now: Instant) {
        let Some(conn) = self.conns.get(ch).and_then(Option::as_ref) else {
            return;
        };
        let connect = conn.connect.as_ref().map(|c| c.id);
        match &conn.phase {
            Phase::Live(live) if live.uni == id => self.flush_stream(ch, now),
            Phase::Refused | Phase::Accepting(_) if connect == Some(id) => {
                self.write_response(ch, now)
            }
            _ => {}
        }
    }

    fn on_finished(&mut self, ch: usize, id: StreamId, now: Instant) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let connect = conn.connect.as_ref().map(|c| c.id);
        match &mut conn.phase {
            Phase::Refused if connect == Some(id) => {
                // The client has the refusal.
                self.close(ch, now, h3::H3_NO_ERROR, "");
            }
            // Phase::Closing: acknowledged is not processed. A browser that had the QUIC close
            // right behind the capsule could report the close instead of the capsule's code:
            // wait for the client to end its side (it does on reading the capsule), or for the
            // deadline.
            Phase::Live(live) if live.uni == id && live.goodbye == Some(Goodbye::Acking) => {
                // Acknowledged is not read: a browser discards stream bytes its page has not
                // read yet when the session closes. Give the client a moment to read the
                // Goodbye and end the session itself (the page does when the stream ends).
                live.goodbye = Some(Goodbye::AwaitClient);
                self.set_deadline(ch, now + GOODBYE_WAIT);
            }
            _ => {}
        }
    }

    fn on_stopped(&mut self, ch: usize, id: StreamId, now: Instant) {
        let Some(conn) = self.conns.get(ch).and_then(Option::as_ref) else {
            return;
        };
        let connect = conn.connect.as_ref().map(|c| c.id);
        match &conn.phase {
            Phase::Live(live) if live.uni == id => {
                if live.goodbye.is_some() {
                    self.end_session(ch, now, End::ClientEnded);
                } else {
                    self.end_session(
                        ch,
                        now,
                        End::Internal("the client stopped reading the reliable stream".into()),
                    );
                }
            }
            Phase::Refused | Phase::Accepting(_) if connect == Some(id) => {
                self.close(ch, now, h3::H3_NO_ERROR, "");
            }
            Phase::Closing { code, reason } if connect == Some(id) => {
                let (code, reason) = (*code, reason.clone());
                self.close(ch, now, code, &reason);
            }
            _ => {}
        }
    }

    fn violation(&mut self, ch: usize, now: Instant, what: &'static str) {
        let live = self
            .conns
            .get(ch)
            .and_then(Option::as_ref)
            .is_some_and(|c| matches!(c.phase, Phase::Live(_)));
        if live {
            self.end_session(ch, now, End::Violation(what));
        } else {
            self.close(ch, now, CloseCode::ProtocolViolation.code(), what);
        }
    }

    /// Ends a live session: counts it, and closes with the code its end deserves.
    fn end_session(&mut self, ch: usize, now: Instant, end: End) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let Phase::Live(live) = &conn.phase else {
            return;
        };
        let goodbye = live.goodbye.is_some();
        let id = live.id;
        self.finish_live(ch);
        let (code, reason) = match end {
            End::ClientEnded if goodbye => {
                Stats::inc(&stats.closed_going_away);
                (
                    CloseCode::GoingAway.code(),
                    "server shutting down".to_string(),
                )
            }
            End::ClientEnded => {
                debug!(session = id, "closed: the client ended the session");
                // Whatever code the client gave, the server's answer is "normal" (section 8).
                self.close(ch, now, CloseCode::Normal.code(), CLIENT_ENDED);
                return;
            }
            End::Internal(_) if goodbye => {
                Stats::inc(&stats.closed_going_away);
                (
                    CloseCode::GoingAway.code(),
                    "server shutting down".to_string(),
                )
            }
            End::Violation(what) => {
                Stats::inc(&stats.closed_protocol_violation);
                (
                    CloseCode::ProtocolViolation.code(),
                    format!("protocol violation: {what}"),
                )
            }
            End::Slow(limit) => {
                Stats::inc(&stats.closed_slow);
                (
                    CloseCode::SlowConsumer.code(),
                    format!("client did not read the reliable stream within {limit:?}"),
                )
            }
            End::Internal(reason) => (CloseCode::Internal.code(), reason),
        };
        if code != CloseCode::GoingAway.code() {
            info!(session = id, code, "closing session: {reason}");
        } else {
            debug!(session = id, "closed: server shutting down");
        }
        self.close_with_capsule(ch, now, code, reason);
    }

    /// Leaves the live phase: the slot is released and the session counted as ended.
    fn finish_live(&mut self, ch: usize) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        if let Phase::Live(live) = std::mem::replace(&mut conn.phase, Phase::Closed) {
            account_end(&self.shared, &conn.quic, &live);
            self.live -= 1;
        }
    }

    /// Tells the client why the session ends with CLOSE_WEBTRANSPORT_SESSION (browsers show it
    /// as `closeCode` and `reason`), then closes the connection with the same code after
    /// [`GOODBYE_WAIT`] unless the client closes it first.
    fn close_with_capsule(&mut self, ch: usize, now: Instant, code: u32, reason: String) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let Some(connect) = conn.connect.as_ref().map(|c| c.id) else {
            return self.close(ch, now, code, &reason);
        };
        let capsule = h3::close_capsule(code, &reason);
        let mut send = conn.quic.send_stream(connect);
        if !matches!(send.write(&capsule), Ok(n) if n == capsule.len()) || send.finish().is_err() {
            return self.close(ch, now, code, &reason);
        }
        conn.phase = Phase::Closing { code, reason };
        self.set_deadline(ch, now + GOODBYE_WAIT);
    }

    /// Closes the QUIC connection now.
    fn close(&mut self, ch: usize, now: Instant, code: u32, reason: &str) {
        let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        if let Phase::Live(live) = std::mem::replace(&mut conn.phase, Phase::Closed) {
            account_end(&self.shared, &conn.quic, &live);
            self.live -= 1;
        }
        if conn.handshaking {
            conn.handshaking = false;
            self.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
        conn.deadline = None;
        trace!(remote = %conn.remote, code, reason, "closing the connection");
        conn.quic.close(
            now,
            VarInt::from_u32(code),
            Bytes::copy_from_slice(reason.as_bytes()),
        );
        self.mark_dirty(ch);
    }

    // ---- ticks ----

    /// Queues the tick's datagrams on every live session and sends them, reading the socket
    /// every [`READ_EVERY`] sessions.
    async fn fan_out(&mut self, tick: &EngineTick) {
        let started = Instant::now();
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let budget = shared.args.datagram_budget as usize;
        let mut encoder = TickEncoder::new(tick.tick, tick.time_us, &tick.cars);
        if let Some(packed) = &tick.packed {
            encoder.seed(budget, packed.clone());
        }
        let (mut sent, mut bytes, mut served) = (0u64, 0u64, 0usize);
        let mut now = Instant::now();
        for ch in 0..self.conns.len() {
            let Some(conn) = self.conns[ch].as_mut() else {
                continue;
            };
            let Phase::Live(live) = &mut conn.phase else {
                continue;
            };
            let Some(max) = conn.quic.datagrams().max_size() else {
                continue;
            };
            let room = max.saturating_sub(live.header.len());
            let this_budget = budget.min(room);
            let budgets = encoder.budgets();
            let datagrams = encoder.framed(&live.header, this_budget);
            if encoder.budgets() > budgets && this_budget < budget {
                Stats::inc(&stats.reencoded_ticks);
            }
            let Some(datagrams) = datagrams else { continue };
            for d in datagrams.iter() {
                let len = d.len() as u64;
                // `true`: when the session's datagram buffer is full, the oldest goes: newest
                // wins, and a slow session never delays anyone.
                match conn.quic.datagrams().send(d.clone(), true) {
                    Ok(()) => {
                        sent += 1;
                        bytes += len;
                        live.queued += 1;
                    }
                    Err(quinn_proto::SendDatagramError::TooLarge) => {
                        Stats::inc(&stats.datagrams_too_large)
                    }
                    Err(_) => break,
                }
            }
            conn.dirty = true;
            self.drive_now(ch, now);
            served += 1;
            if self.out.items.len() >= SEND_BATCH {
                self.flush().await;
            }
            if served % READ_EVERY == 0 {
                // Acknowledgements must not wait behind the rest of the pass.
                self.read_socket(4);
                self.flush().await;
                now = Instant::now();
            }
        }
        self.flush().await;
        stats.datagrams_sent.fetch_add(sent, Ordering::Relaxed);
        stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        stats.fanout_seconds.observe(started.elapsed());
    }

    /// Sends a PING on every live session (ticks have stopped for a while).
    fn ping_live(&mut self) {
        let now = Instant::now();
        for ch in 0..self.conns.len() {
            let Some(conn) = self.conns[ch].as_mut() else {
                continue;
            };
            if !matches!(conn.phase, Phase::Live(_)) {
                continue;
            }
            conn.quic.ping();
            conn.dirty = true;
            self.drive_now(ch, now);
        }
    }

    /// Drives one connection right away (it was marked dirty by its caller).
    fn drive_now(&mut self, ch: usize, now: Instant) {
        if let Some(conn) = self.conns.get_mut(ch).and_then(Option::as_mut) {
            conn.dirty = false;
        }
        self.drive(ch, now);
    }

    // ---- shutdown ----

    fn begin_shutdown(&mut self) {
        let now = Instant::now();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let (mut pings, mut acks, mut datagrams, mut sent, mut lost, mut probes) =
                (0, 0, 0, 0, 0, 0);
            for conn in self.conns.iter().flatten() {
                let s = conn.quic.stats();
                pings += s.frame_tx.ping;
                acks += s.frame_tx.acks;
                datagrams += s.frame_tx.datagram;
                sent += s.path.sent_packets;
                lost += s.path.lost_packets;
                probes += s.path.sent_plpmtud_probes;
            }
            debug!(
                shard = self.index,
                pings, acks, datagrams, sent, lost, probes, "QUIC totals of open connections"
            );
        }
        self.closing = Some(now);
        let mut goodbye = Vec::new();
        let frame = StreamMessage::Goodbye {
            code: CloseCode::GoingAway.code(),
            reason: "server shutting down".to_string(),
        };
        // Invariant: a Goodbye holds a number and a short string: it encodes.
        frame.encode_frame(&mut goodbye).expect("goodbye encodes");
        let goodbye = Bytes::from(goodbye);
        for ch in 0..self.conns.len() {
            let Some(conn) = self.conns[ch].as_mut() else {
                continue;
            };
            match &mut conn.phase {
                Phase::Live(live) => {
                    live.pending.push_back(goodbye.clone());
                    live.goodbye = Some(Goodbye::Writing);
                    self.set_deadline(ch, now + GOODBYE_WAIT);
                    self.flush_stream(ch, now);
                    self.mark_dirty(ch);
                }
                Phase::Opening | Phase::Refused | Phase::Accepting(_) => {
                    self.close(ch, now, CloseCode::GoingAway.code(), "server shutting down");
                }
                Phase::Closing { .. } | Phase::Closed => {}
            }
        }
    }

    /// Whether the shutdown is over: every connection closed, or the shutdown timeout passed
    /// (then whatever is left is closed now).
    fn done_closing(&mut self) -> bool {
        let Some(started) = self.closing else {
            return false;
        };
        let open: Vec<usize> = (0..self.conns.len())
            .filter(|&ch| {
                self.conns[ch]
                    .as_ref()
                    .is_some_and(|c| !matches!(c.phase, Phase::Closed))
            })
            .collect();
        if open.is_empty() {
            return true;
        }
        if started.elapsed() >= self.shared.args.shutdown_timeout {
            let now = Instant::now();
            for ch in open {
                if let Some(conn) = self.conns[ch].as_ref() {
                    if matches!(conn.phase, Phase::Live(_)) {
                        Stats::inc(&self.shared.stats.closed_going_away);
                    }
                }
                self.close(ch, now, CloseCode::GoingAway.code(), "server shutting down");
            }
            return true;
        }
        false
    }
}

enum ReadOutcome {
    Open,
    Finished,
    Reset,
    Closed,
    TooMuch,
}

/// Counts a live session's end: the datagrams QUIC dropped for it (queued but never sent,
/// because its send buffer was full) and the open-sessions gauge.
fn account_end(shared: &Shared, quic: &quinn_proto::Connection, live: &Live) {
    let sent = quic.stats().frame_tx.datagram;
    Stats::add(
        &shared.stats.datagrams_dropped,
        live.queued.saturating_sub(sent),
    );
    shared
        .stats
        .open_webtransport
        .fetch_sub(1, Ordering::Relaxed);
}

/// What the shard does after reading the CONNECT stream.
enum ConnectAction {
    Nothing,
    /// The request is complete: answer it once the settings are here.
    Answer,
    /// Not a WebTransport request: answer with this status.
    Refuse(u16),
    Malformed(h3::H3Error),
    /// A CLOSE_WEBTRANSPORT_SESSION capsule, or the stream ended.
    ClientEnded(String),
    Error(h3::H3Error),
}

/// Consumes what the CONNECT stream holds: the request until it is complete, then capsules.
fn connect_action(connect: &mut ConnectStream, outcome: &ReadOutcome) -> ConnectAction {
    let ended = matches!(
        outcome,
        ReadOutcome::Finished | ReadOutcome::Reset | ReadOutcome::Closed
    );
    if matches!(outcome, ReadOutcome::TooMuch) {
        return ConnectAction::Malformed(h3::H3Error {
            code: h3::H3_MESSAGE_ERROR,
            reason: "request too large",
        });
    }
    if !connect.answered {
        if connect.request.is_none() {
            // Skip unknown frames until the HEADERS frame.
            loop {
                match h3::next_frame(&connect.frames) {
                    Ok(None) => break,
                    Ok(Some(frame)) if frame.ty == 0x01 => {
                        let parsed = h3::parse_request(frame.payload);
                        let len = frame.len;
                        connect.frames.drain(..len);
                        match parsed {
                            Ok(Requested::WebTransport(request)) => {
                                connect.request = Some(request);
                                break;
                            }
                            Ok(Requested::Other(status)) => return ConnectAction::Refuse(status),
                            Err(e) => return ConnectAction::Malformed(e),
                        }
                    }
                    Ok(Some(frame)) if frame.ty == 0x00 || frame.ty == 0x04 => {
                        return ConnectAction::Malformed(h3::H3Error {
                            code: h3::H3_FRAME_UNEXPECTED,
                            reason: "frame before the request",
                        });
                    }
                    Ok(Some(frame)) => {
                        let len = frame.len;
                        connect.frames.drain(..len);
                    }
                    Err(e) => return ConnectAction::Malformed(e),
                }
            }
        }
        if ended {
            return ConnectAction::Error(h3::H3Error {
                code: h3::H3_REQUEST_REJECTED,
                reason: "request stream ended early",
            });
        }
        return if connect.request.is_some() {
            ConnectAction::Answer
        } else {
            ConnectAction::Nothing
        };
    }
    // After the response: capsules, or the end of the stream.
    match h3::read_connect_stream(&mut connect.frames, &mut connect.capsules) {
        Ok(Some(ConnectStreamEvent::Close { code, reason })) => {
            ConnectAction::ClientEnded(format!("CLOSE_WEBTRANSPORT_SESSION {code}: {reason}"))
        }
        Ok(None) if ended => ConnectAction::ClientEnded("end of the CONNECT stream".into()),
        Ok(None) => ConnectAction::Nothing,
        Err(e) => ConnectAction::Error(e),
    }
}
