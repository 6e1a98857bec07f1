//! UDP sockets with large kernel buffers, for the server and for load-generating clients.

use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

/// Binds a UDP socket with `buffer` bytes of send and receive buffer (dual-stack for `[::]`).
///
/// The kernel default (~208 KiB) drops datagrams from about a hundred sessions on; the kernel
/// may grant less than asked (`net.core.rmem_max`), which is logged.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> Result<UdpSocket> {
    bind_udp_shared(addr, buffer, false)
}

/// [`bind_udp`], with `SO_REUSEPORT` when `reuse_port`: several sockets of this process then
/// share the port, and the kernel spreads clients over them by address and port.
pub fn bind_udp_shared(addr: SocketAddr, buffer: usize, reuse_port: bool) -> Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Chromium dials ::1 for localhost while other clients use 127.0.0.1: take both.
        socket.set_only_v6(false)?;
    }
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        warn!("cannot set UDP receive buffer to {buffer} B: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        warn!("cannot set UDP send buffer to {buffer} B: {e}");
    }
    // Linux reports twice the granted size (it counts its own bookkeeping).
    let granted_recv = socket.recv_buffer_size()? / 2;
    let granted_send = socket.send_buffer_size()? / 2;
    if granted_recv < buffer || granted_send < buffer {
        warn!(
            "kernel granted UDP buffers of {granted_recv} B (receive) and {granted_send} B (send), \
             asked for {buffer} B: raise net.core.rmem_max and net.core.wmem_max, or expect \
             drops under load"
        );
    } else {
        debug!("UDP buffers: {granted_recv} B receive, {granted_send} B send");
    }
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    if reuse_port {
        anyhow::bail!(
            "several shards need SO_REUSEPORT, which this platform lacks: use --shards 1"
        );
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding UDP on {addr}"))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
