//! `fleetcast serve` as a child process on ephemeral ports, for tests that run the binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fleetcast");

/// A `fleetcast serve` process, killed on drop if still running.
pub struct Serve {
    pub child: Child,
    pub wt_port: u16,
    pub http_port: u16,
    /// Every line the server has logged so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Serve {
    /// `http://127.0.0.1:PORT`, the server's HTTP side.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The log lines that contain `text`.
    pub fn logged(&self, text: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(text)).cloned().collect()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_after(line: &str, marker: &str) -> Option<u16> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Starts `fleetcast serve` on ephemeral ports with `extra` options.
pub fn serve(extra: &[&str]) -> Serve {
    serve_in(tempfile::tempdir().unwrap(), extra, false)
}

/// Starts `fleetcast serve` with its certificates in `dir`; with `expect_reuse` it fails if
/// the server generates a new certificate instead of reusing the one in `dir`.
pub fn serve_in(dir: tempfile::TempDir, extra: &[&str], expect_reuse: bool) -> Serve {
    serve_with(dir, extra, expect_reuse, |_| {})
}

/// Like [`serve_in`], with `tweak` applied to the command before it starts.
pub fn serve_with(
    dir: tempfile::TempDir,
    extra: &[&str],
    expect_reuse: bool,
    tweak: impl FnOnce(&mut Command),
) -> Serve {
    let mut command = Command::new(BIN);
    tweak(&mut command);
    let mut child = command
        .args([
            "serve",
            "--wt-listen",
            "[::]:0",
            "--http-listen",
            "[::]:0",
            "--cert-dir",
        ])
        .arg(dir.path())
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("fleetcast serve starts");
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut wt, mut http) = (None, None);
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while wt.is_none() || http.is_none() {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            // Never leave the server behind when the test fails here.
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not print its URLs within 20 s");
        };
        log.lock().unwrap().push(line.clone());
        assert!(
            !(expect_reuse && line.contains("generated")),
            "certificate regenerated: {line}"
        );
        wt = wt.or_else(|| port_after(&line, "session URL:  https://localhost:"));
        http = http
            .or_else(|| port_after(&line, "web demo:     http://localhost:"))
            .or_else(|| port_after(&line, "web demo:     https://localhost:"));
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn({
        let log = log.clone();
        move || {
            while let Ok(line) = rx.recv() {
                log.lock().unwrap().push(line);
            }
        }
    });
    Serve {
        child,
        wt_port: wt.unwrap(),
        http_port: http.unwrap(),
        log,
        dir,
    }
}
