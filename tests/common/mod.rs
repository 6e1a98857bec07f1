//! One helper to start a real server on ephemeral loopback ports for integration tests.

#![allow(dead_code)] // each test binary uses a different part of this module

use fleetcast::server::{ServeArgs, Server};
use tempfile::TempDir;

/// A running server and the temporary directory holding its certificate.
pub struct TestServer {
    pub server: Server,
    _certs: TempDir,
}

/// Starts `fleetcast serve` in-process with `cars` cars and a fast tick; `tweak` adjusts options.
pub async fn start(cars: u32, tweak: impl FnOnce(&mut ServeArgs)) -> TestServer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = tempfile::tempdir().expect("temp dir");
    let mut args = ServeArgs::ephemeral(certs.path().to_path_buf());
    args.cars = cars;
    args.tick_ms = 100;
    tweak(&mut args);
    let server = Server::start(args).await.expect("server starts");
    TestServer {
        server,
        _certs: certs,
    }
}
