//! The binary as a user runs it: `fleetcast serve` and `fleetcast watch --json` as processes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{serve, serve_in, Serve, BIN};

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

const SECRET: &str = "cli-test-secret-0123456789abcdefgh";

/// `fleetcast token` with `args`; returns its stdout, asserting it succeeded.
fn token(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .arg("token")
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("fleetcast token runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `fleetcast watch --json` for `duration` against `server`, with extra arguments.
fn watch(server: &Serve, duration: &str, extra: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(BIN)
        .args(["watch", "--duration", duration, "--json", "--url"])
        .arg(format!("https://localhost:{}/positions", server.wt_port))
        .arg("--cert-hash-url")
        .arg(format!(
            "http://localhost:{}/certificate.sha256",
            server.http_port
        ))
        .args(extra)
        .env_remove("FLEETCAST_TOKEN")
        .output()
        .expect("watch runs");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "one JSON object on stdout ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

#[test]
fn token_command_prints_a_token_that_watch_uses_on_a_protected_server() {
    let server = serve(&[
        "--cars",
        "30",
        "--tick-ms",
        "100",
        "--subscribe-secret",
        SECRET,
    ]);
    let stdout = token(&["--secret", SECRET, "--ttl", "1h", "--sub", "cli"], &[]);
    // One token and a newline, nothing else.
    assert!(
        stdout.ends_with('\n') && stdout.lines().count() == 1,
        "{stdout:?}"
    );
    let jwt = stdout.trim_end();
    let secret = fleetcast::token::Secret::parse(SECRET).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = fleetcast::token::verify(&secret, jwt, now).expect("a valid token");
    assert!(
        (3599..=3601).contains(&(claims.exp - now as i64)),
        "{claims:?}"
    );
    assert_eq!(claims.sub.as_deref(), Some("cli"));

    let (ok, report) = watch(&server, "3s", &["--token", jwt]);
    assert!(ok, "{report}");
    assert_eq!(report["sessions"], 1, "{report}");
    assert_eq!(report["initial_cars"], 30, "{report}");
    assert!(report["ticks_received"].as_u64().unwrap() >= 5, "{report}");

    // Without the token it never connects, and the server says why it refused.
    let (ok, report) = watch(&server, "1s", &[]);
    assert!(!ok);
    assert_eq!(report["sessions"], 0, "{report}");
    let health: serde_json::Value = serde_json::from_str(&fetch(&format!(
        "http://127.0.0.1:{}/healthz",
        server.http_port
    )))
    .unwrap();
    assert!(
        health["counters"]["refused_unauthorized"].as_u64().unwrap() >= 1,
        "{health}"
    );
}

#[test]
fn token_command_reads_the_secret_from_env_or_file() {
    let from_env = token(&["--ttl", "90s"], &[("FLEETCAST_SUBSCRIBE_SECRET", SECRET)]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, format!("  {SECRET}  \n")).unwrap();
    let from_file = token(&["--secret-file", file.to_str().unwrap()], &[]);
    let secret = fleetcast::token::Secret::parse(SECRET).unwrap();
    for t in [from_env, from_file] {
        assert!(
            fleetcast::token::verify(&secret, t.trim_end(), 0).is_ok(),
            "{t}"
        );
    }
}

#[test]
fn short_secrets_fail_at_start_up_and_help_hides_secrets() {
    for args in [
        vec!["serve", "--subscribe-secret", "too-short"],
        vec!["token", "--secret", "too-short"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("at least 32"), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("too-short"),
            "the error quotes the secret: {stderr}"
        );
    }
    // `--help` names the environment variables but never shows their values.
    for command in ["serve", "token", "watch"] {
        let out = Command::new(BIN)
            .args([command, "--help"])
            .env("FLEETCAST_SUBSCRIBE_SECRET", SECRET)
            .env("FLEETCAST_TOKEN", "secret-token-value")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(!help.contains(SECRET), "{command} --help shows the secret");
        assert!(
            !help.contains("secret-token-value"),
            "{command} --help shows the token"
        );
    }
}
