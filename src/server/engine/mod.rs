//! The fan-out engine: fleetcast's own QUIC, HTTP/3 and WebTransport server on quinn-proto.
//!
//! quinn runs one task per connection: every datagram costs wake-ups, channel hops and timer
//! resets per session. This engine owns its connections directly instead, the way high-fan-out
//! QUIC servers do:
//! - **shards** ([`shard`]): one event loop per core on its own thread, each with its own UDP
//!   socket and quinn-proto endpoint, holding its connections in a plain table; one timer heap
//!   per shard; packets read in batches and sent in batches;
//! - **routing**: the shards' sockets share the port with `SO_REUSEPORT`, so the kernel keeps a
//!   client's packets (same address and port) on one socket. Every connection id a shard issues
//!   starts with the shard's number: a packet that reaches another shard's socket (the client's
//!   address changed: NAT rebinding, migration) is handed to the owning shard;
//! - **HTTP/3 and WebTransport** ([`h3`]): pure codecs on top of wtransport-proto's QPACK.
//!
//! The tick loop hands each tick to every shard through a `watch` channel (only the newest
//! counts); each shard encodes it once per datagram header and budget and sends it to all of
//! its sessions in one pass.

pub(crate) mod h3;
mod shard;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::BytesMut;
use quinn_proto::{ConnectionId, ConnectionIdGenerator, EcnCodepoint};
use rand::RngCore;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{net, Shared};
use crate::proto::wire::CarSample;

/// Length of the connection ids the engine issues: the shard's number, then random bytes.
pub(crate) const CID_LEN: usize = 8;

/// Packets for one shard that another shard's socket received.
const FORWARD_QUEUE: usize = 4096;

/// One tick, for the shards to encode and send.
#[derive(Debug)]
pub(crate) struct EngineTick {
    pub tick: u64,
    pub time_us: u64,
    pub cars: Arc<Vec<CarSample>>,
    /// The datagram payloads under `--datagram-budget`, packed once for every shard.
    pub packed: Option<Arc<Vec<Vec<u8>>>>,
}

/// What a shard can be told by the others.
pub(crate) enum Command {
    /// A packet for one of its connections that reached another shard's socket.
    Packet {
        remote: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    },
}

/// Connection ids that carry the shard's number in their first byte.
struct ShardCids {
    shard: u8,
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut id = [0u8; CID_LEN];
        rand::rng().fill_bytes(&mut id[1..]);
        id[0] = self.shard;
        ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The running engine, as the rest of the server sees it.
pub(crate) struct Engine {
    config: watch::Sender<Arc<quinn_proto::ServerConfig>>,
}

/// The shards' sockets, bound before the server's shared state exists (it holds the port).
pub(crate) struct Bound {
    pub local_addr: SocketAddr,
    sockets: Vec<std::net::UdpSocket>,
}

impl Bound {
    /// Binds one socket per shard on the same port.
    pub(crate) fn bind(addr: SocketAddr, buffer: usize, shards: usize) -> Result<Bound> {
        let shards = shards.clamp(1, 64);
        let mut sockets = Vec::with_capacity(shards);
        let first = crate::udp::bind_udp_shared(addr, buffer, shards > 1)?;
        let local_addr = first.local_addr()?;
        sockets.push(first);
        for _ in 1..shards {
            sockets.push(crate::udp::bind_udp_shared(local_addr, buffer, true)?);
        }
        Ok(Bound {
            local_addr,
            sockets,
        })
    }
}

/// The QUIC server configuration for an identity: TLS 1.3 with ALPN `h3`, our transport limits.
pub(crate) fn server_config(
    identity: &wtransport::Identity,
    args: &super::ServeArgs,
) -> Result<Arc<quinn_proto::ServerConfig>> {
    let tls = crate::certs::quic_config(identity).context("TLS configuration")?;
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS configuration for QUIC")?;
    let mut config = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
    config
        .transport_config(Arc::new(net::transport_config(args)?))
        .max_incoming(args.max_handshakes.max(1));
    Ok(Arc::new(config))
}

impl Engine {
    /// Starts one thread per shard; they return once the shutdown (`token`) is complete.
    pub(crate) fn start(
        bound: Bound,
        shared: Arc<Shared>,
        identity: &wtransport::Identity,
        token: CancellationToken,
    ) -> Result<(Engine, Vec<std::thread::JoinHandle<()>>)> {
        let args = &shared.args;
        let Bound {
            local_addr,
            sockets,
        } = bound;
        let shards = sockets.len();
        let config = server_config(identity, args)?;
        let (config_tx, config_rx) = watch::channel(config);
        let ticks_rx = shared.engine_ticks.subscribe();
        let mut senders = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
            senders.push(tx);
            receivers.push(rx);
        }
        let peers = Arc::new(senders);
        let handshakes = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(shards);
        for (index, (socket, commands)) in sockets.into_iter().zip(receivers).enumerate() {
            let mut endpoint_config = quinn_proto::EndpointConfig::default();
            let shard_id = index as u8;
            endpoint_config.cid_generator(move || Box::new(ShardCids { shard: shard_id }));
            let parts = shard::Parts {
                index,
                shared: shared.clone(),
                socket,
                endpoint_config: Arc::new(endpoint_config),
                server_config: config_rx.clone(),
                ticks: ticks_rx.clone(),
                commands,
                peers: peers.clone(),
                handshakes: handshakes.clone(),
                token: token.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("fleetcast-shard-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            tracing::error!("shard {index}: cannot start its runtime: {e}");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        match shard::Shard::new(parts) {
                            Ok(shard) => shard.run().await,
                            Err(e) => tracing::error!("shard {index}: cannot start: {e}"),
                        }
                    });
                })
                .context("starting a shard thread")?;
            threads.push(thread);
        }
        tracing::info!("fan-out engine: {shards} shard(s) on {local_addr}");
        Ok((Engine { config: config_tx }, threads))
    }

    /// Serves `identity` to new connections from now on; open ones keep theirs.
    pub(crate) fn install(
        &self,
        identity: &wtransport::Identity,
        args: &super::ServeArgs,
    ) -> Result<()> {
        self.config.send_replace(server_config(identity, args)?);
        Ok(())
    }
}
