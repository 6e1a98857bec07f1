//! A real `nats-server` (with JetStream) on a loopback port, and fleetcast nodes joined by it.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{serve_with, Serve};

/// Publisher token every test node accepts.
pub const TOKEN: &str = "cluster-test-publisher-token";

/// A `nats-server -js` process, killed on drop.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    /// Starts NATS with JetStream on a free loopback port; panics (saying how to install it)
    /// when `nats-server` is missing.
    pub fn start() -> Nats {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut nats = Nats {
            child: None,
            port,
            store: tempfile::tempdir().unwrap(),
        };
        nats.restart();
        nats
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store (after [`Nats::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "NATS is already running");
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "nats-server runs (install it: apt-get install nats-server, or run scripts/test.sh)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "NATS did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL): every node loses NATS at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a node of the cluster on `nats` with subject prefix `prefix` and `extra` options.
pub fn node(nats: &Nats, prefix: &str, name: &str, extra: &[&str]) -> Serve {
    let url = nats.url();
    let mut args = vec![
        "--nats",
        url.as_str(),
        "--nats-prefix",
        prefix,
        "--node-name",
        name,
        "--feed",
        "ingest",
        "--publish-token",
        TOKEN,
    ];
    args.extend_from_slice(extra);
    serve_with(tempfile::tempdir().unwrap(), &args, false, |_| {})
}
