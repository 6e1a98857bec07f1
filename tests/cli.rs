//! The binary as a user runs it: `fleetcast serve` and `fleetcast watch --json` as processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fleetcast");

/// A `fleetcast serve` process, killed on drop if still running.
struct Serve {
    child: Child,
    wt_port: u16,
    http_port: u16,
    _dir: tempfile::TempDir,
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

fn serve(extra: &[&str]) -> Serve {
    serve_in(tempfile::tempdir().unwrap(), extra, false)
}

/// Starts `fleetcast serve` with its certificates in `dir`; with `expect_reuse` it fails if
/// the server generates a new certificate instead of reusing the one in `dir`.
fn serve_in(dir: tempfile::TempDir, extra: &[&str], expect_reuse: bool) -> Serve {
    let mut child = Command::new(BIN)
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while wt.is_none() || http.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("server printed its URLs");
        assert!(
            !(expect_reuse && line.contains("generated")),
            "certificate regenerated: {line}"
        );
        wt = wt.or_else(|| port_after(&line, "session URL:  https://localhost:"));
        http = http.or_else(|| port_after(&line, "web demo:     http://localhost:"));
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Serve {
        child,
        wt_port: wt.unwrap(),
        http_port: http.unwrap(),
        _dir: dir,
    }
}

#[test]
fn watch_json_reports_the_whole_fleet_and_every_tick() {
    let server = serve(&["--cars", "100"]);
    let out = Command::new(BIN)
        .args(["watch", "--duration", "5s", "--json", "--url"])
        .arg(format!("https://localhost:{}/positions", server.wt_port))
        .arg("--cert-hash-url")
        .arg(format!(
            "http://localhost:{}/certificate.sha256",
            server.http_port
        ))
        .output()
        .expect("watch runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["initial_cars"], 100, "{report}");
    assert_eq!(report["cars"], 100, "{report}");
    assert!(report["ticks_received"].as_u64().unwrap() >= 4, "{report}");
    assert_eq!(report["ticks_missed"], 0, "{report}");
    assert!(report["datagrams"].as_u64().unwrap() >= 4, "{report}");
    assert!(report["bytes"].as_u64().unwrap() > 0, "{report}");
    for p in ["p50", "p99", "max"] {
        assert!(report["latency_ms"][p].as_f64().unwrap() >= 0.0, "{report}");
    }
}

#[test]
fn watch_with_a_wrong_certificate_hash_never_connects() {
    let server = serve(&[]);
    let out = Command::new(BIN)
        .args(["watch", "--duration", "2s", "--json", "--url"])
        .arg(format!("https://localhost:{}/positions", server.wt_port))
        .args(["--cert-hash", &"ab".repeat(32)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sessions"], 0);
}

#[test]
fn sigterm_shuts_down_cleanly_and_the_certificate_is_reused() {
    let mut server = serve(&[]);
    let hash_url = format!("http://127.0.0.1:{}/certificate.sha256", server.http_port);
    let first = fetch(&hash_url);
    assert_eq!(first.trim().len(), 64);
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "server still running 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    // A restart with the same certificate directory serves the same certificate.
    let dir = std::mem::replace(&mut server._dir, tempfile::tempdir().unwrap());
    drop(server);
    let again = serve_in(dir, &[], true);
    let second = fetch(&format!(
        "http://127.0.0.1:{}/certificate.sha256",
        again.http_port
    ));
    assert_eq!(first, second);
}

/// A plain HTTP/1.1 GET over a TCP socket.
fn fetch(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body.split("\r\n\r\n").nth(1).unwrap().to_string()
}
