//! The binary as a user runs it: `fleetcast serve` and `fleetcast watch --json` as processes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{serve, serve_in, BIN};

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
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
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
