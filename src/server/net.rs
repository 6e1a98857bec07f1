//! The server's UDP socket and QUIC transport limits.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use wtransport::config::{states, ServerConfigBuilder};
use wtransport::{Identity, ServerConfig};

use super::ServeArgs;

/// The largest WebTransport datagram payload (its quarter-stream-id byte included) that fits a
/// 1,200-byte packet, the smallest path MTU QUIC allows: 1,200 minus the short header (1 + 8
/// connection id + up to 4 packet number), the AEAD tag (16) and the DATAGRAM frame's type and
/// length (1 + 2), rounded down for safety.
pub const MIN_PATH_DATAGRAM: usize = 1150;

/// QUIC limits for one session, sized for many small sessions rather than a few big flows.
pub fn transport_config(args: &ServeArgs) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(args.idle_timeout).context("--idle-timeout too large")?,
    ));
    // Every tick's datagram is acknowledged by the client, which keeps the connection alive;
    // only when ticks are further apart than a third of the idle timeout does the server need
    // its own keep-alive (each ping costs a packet each way on every session). The idle timeout
    // is at least a second (`ServeArgs::check`), so pings are never more frequent than 3/s.
    let tick = Duration::from_millis(u64::from(args.tick_ms));
    if tick * 3 > args.idle_timeout {
        t.keep_alive_interval(Some(args.idle_timeout / 3));
    }
    // One packet per session per tick gains nothing from GSO batching, and a connection keeps
    // its transmit buffer at the largest batch it ever sent (~10 packets): send one at a time.
    t.enable_segmentation_offload(false);
    // Path MTU discovery probes every connection (4 probes each at the start, more every 10
    // minutes) to carry bigger packets; a tick's datagrams fit the 1,200-byte minimum every
    // QUIC path carries (1,162 bytes of datagram with our 8-byte connection ids) unless
    // --datagram-budget asks for more, so probe only then.
    if args.datagram_budget as usize + 1 > MIN_PATH_DATAGRAM {
        t.mtu_discovery_config(Some(quinn::MtuDiscoveryConfig::default()));
    } else {
        t.mtu_discovery_config(None);
    }
    t.datagram_send_buffer_size(args.datagram_send_buffer);
    t.datagram_receive_buffer_size(Some(args.datagram_recv_buffer));
    // Clients need the CONNECT stream and the three HTTP/3 control streams; nothing else.
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(8u32.into());
    t.stream_receive_window((64u32 * 1024).into());
    t.receive_window((128u32 * 1024).into());
    t.send_window(1024 * 1024);
    Ok(t)
}

/// The wtransport server configuration around our socket and identity.
pub fn server_config(
    socket: UdpSocket,
    identity: Identity,
    args: &ServeArgs,
) -> Result<ServerConfig> {
    configure(
        ServerConfig::builder().with_bind_socket(socket),
        identity,
        args,
    )
}

/// A configuration that carries only a new identity, for `Endpoint::reload_config` without
/// rebinding (its bind address is not used).
pub fn reload_config(identity: Identity, args: &ServeArgs) -> Result<ServerConfig> {
    configure(ServerConfig::builder().with_bind_default(0), identity, args)
}

fn configure(
    builder: ServerConfigBuilder<states::WantsIdentity>,
    identity: Identity,
    args: &ServeArgs,
) -> Result<ServerConfig> {
    let mut config = builder
        .with_custom_transport(identity, transport_config(args)?)
        .build();
    // The endpoint buffers at most this many not-yet-accepted connection attempts.
    config
        .quic_config_mut()
        .max_incoming(args.max_handshakes.max(1))
        .transport_config(Arc::new(transport_config(args)?));
    Ok(config)
}
