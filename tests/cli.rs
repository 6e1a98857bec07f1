//! The binary as a user runs it: `fleetcast serve` and `fleetcast watch --json` as processes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{serve, serve_in, serve_with, Serve, BIN};

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
    let latency = |p: &str| report["latency_ms"][p].as_f64().unwrap();
    let (p50, p99, max) = (latency("p50"), latency("p99"), latency("max"));
    // Tick to receipt on loopback: more than nothing, ordered, and well under one tick (1 s);
    // anything else means the clocks or the measurement are wrong.
    assert!(p50 > 0.0, "{report}");
    assert!(p50 <= p99 && p99 <= max, "{report}");
    assert!(max < 1000.0, "{report}");
}

/// Runs `fleetcast serve` with `extra`, expecting it to refuse to start; returns its stderr.
fn serve_refuses(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--wt-listen",
            "[::1]:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--cert-dir")
        .arg(dir.path())
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve {extra:?} still running: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "serve {extra:?} succeeded: {stderr}");
    assert_eq!(status.code(), Some(1), "serve {extra:?}: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "serve {extra:?} panicked: {stderr}"
    );
    stderr
}

#[test]
fn impossible_options_are_refused_at_start_up_with_the_option_named() {
    for (args, named) in [
        (&["--datagram-budget", "1500"][..], "--datagram-budget"),
        (&["--max-handshakes", "0"], "--max-handshakes"),
        (&["--max-sessions", "0"], "--max-sessions"),
        (&["--idle-timeout", "0s"], "--idle-timeout"),
        (&["--write-timeout", "0s"], "--write-timeout"),
        (&["--handshake-timeout", "0s"], "--handshake-timeout"),
        (&["--shutdown-timeout", "2h"], "--shutdown-timeout"),
        (
            &["--datagram-send-buffer", "1KiB"],
            "--datagram-send-buffer",
        ),
        (&["--cars", "0", "--churn-ticks", "5"], "--churn-ticks"),
    ] {
        let stderr = serve_refuses(args);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

#[test]
fn a_mismatched_cert_and_key_stop_start_up_with_both_files_named() {
    let dir = tempfile::tempdir().unwrap();
    let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, one.cert.pem()).unwrap();
    std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
    let stderr = serve_refuses(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(stderr.contains(cert.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains(key.to_str().unwrap()), "{stderr}");
    // The matching pair starts.
    std::fs::write(&key, one.signing_key.serialize_pem()).unwrap();
    let server = serve(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    drop(server);
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

/// Sends SIGTERM to the server and waits for it to exit; returns how long that took.
fn terminate(server: &mut Serve, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            return (exit, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "server still running {limit:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_exits_within_the_shutdown_timeout_whatever_the_clients_do() {
    use std::io::{Read, Write};
    let mut server = serve(&[
        "--tick-ms",
        "100",
        "--shutdown-timeout",
        "2s",
        // Far beyond the shutdown timeout: only the shutdown bound can end the slow clients.
        "--http-header-timeout",
        "60s",
    ]);
    let addr = format!("127.0.0.1:{}", server.http_port);
    // Slowloris: half a request header, then silence.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .unwrap();
        slow.push(s);
    }
    // An idle WebSocket: upgraded, then never read.
    let mut ws = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        ws,
        "GET /positions.ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    ws.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101", "{}", String::from_utf8_lossy(&head));
    // Every connection is open and served: the server counts them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = fetch(&format!("http://{addr}/healthz"));
        let health: serde_json::Value = serde_json::from_str(&health).unwrap();
        // Three slow, one WebSocket, and this request.
        if health["counters"]["open_http_connections"] == 5
            && health["counters"]["open_websocket"] == 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (exit, took) = terminate(&mut server, Duration::from_secs(15));
    assert!(exit.success(), "{exit:?}");
    // The 2 s shutdown timeout, at most 1 s to close the QUIC endpoint, and a margin.
    assert!(took < Duration::from_millis(4500), "exit took {took:?}");
    drop((slow, ws));
}

/// Opens a WebSocket session at `/positions.ws` over a plain socket; `Err` with the server's
/// answer (or why there was none) when it is refused.
fn ws_open(addr: &str) -> Result<std::net::TcpStream, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A server that refuses may answer and close before the request is written: read anyway.
    let written = write!(
        s,
        "GET /positions.ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    // Byte by byte up to the end of the head, so no WebSocket frame is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) if !head.is_empty() => return Err(String::from_utf8_lossy(&head).into()),
            Ok(_) => return Err(format!("closed without an answer (write: {written:?})")),
            Err(e) => return Err(format!("read: {e} (write: {written:?})")),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 101") {
        Ok(s)
    } else {
        Err(head)
    }
}

/// Reads one server WebSocket frame (unmasked): its opcode and payload.
fn ws_frame(s: &mut std::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    use std::io::Read;
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((h[0] & 0x0f, payload))
}

/// Reads a WebSocket session until a tick made after this call arrives; panics after 5 s.
fn ws_gets_a_new_tick(s: &mut std::net::TcpStream) {
    let since = fleetcast::server::now_us();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no new tick within 5 s");
        let (opcode, payload) = ws_frame(s).expect("the session is open");
        // Binary messages on the datagram channel carry one tick part each.
        if opcode == 2 && payload.first() == Some(&1) {
            let part = fleetcast::proto::wire::TickPart::decode(&payload[1..]).unwrap();
            if part.time_us > since {
                return;
            }
        }
    }
}

/// Server user + system CPU seconds, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of the line, counted after the name's closing parenthesis.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The soft and hard "Max open files" of a process, from `/proc/PID/limits`.
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut words = line["Max open files".len()..].split_whitespace();
    (
        words.next().unwrap().to_string(),
        words.next().unwrap().to_string(),
    )
}

#[cfg(target_os = "linux")]
#[test]
fn the_open_files_soft_limit_is_raised_to_the_hard_limit_at_start() {
    use std::os::unix::process::CommandExt;
    let server = serve_with(tempfile::tempdir().unwrap(), &[], false, |command| {
        // Start it the way many systems do: a low soft limit under a higher hard one.
        // SAFETY: setrlimit is a plain system call, safe between fork and exec.
        unsafe {
            command.pre_exec(|| {
                use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
                let hard = getrlimit(Resource::Nofile).maximum;
                let soft = Some(256).min(hard);
                setrlimit(
                    Resource::Nofile,
                    Rlimit {
                        current: soft,
                        maximum: hard,
                    },
                )
                .map_err(std::io::Error::from)
            });
        }
    });
    let (soft, hard) = open_files_limit(server.child.id());
    assert_eq!(soft, hard, "soft limit not raised");
    let logged = server.logged("open files:");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].contains(&format!("soft {hard}")), "{logged:?}");
    assert!(
        logged[0].contains("raised from soft Some(256)"),
        "{logged:?}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn out_of_file_descriptors_refuses_new_clients_and_keeps_the_open_sessions() {
    let server = serve(&[
        "--tick-ms",
        "100",
        "--danger-max-open-files",
        "64",
        "--max-http-conns-per-ip",
        "1000",
    ]);
    let pid = server.child.id();
    assert_eq!(open_files_limit(pid).0, "64");
    let addr = format!("127.0.0.1:{}", server.http_port);
    let hash = fetch(&format!("http://{addr}/certificate.sha256"));

    // WebSocket sessions hold a descriptor each: open them until the server refuses.
    let mut sessions = Vec::new();
    let refusal = loop {
        assert!(sessions.len() < 200, "no refusal after 200 sessions");
        match ws_open(&addr) {
            Ok(s) => sessions.push(s),
            Err(answer) => break answer,
        }
    };
    assert!(
        sessions.len() >= 5,
        "only {} sessions opened",
        sessions.len()
    );
    assert!(
        refusal.starts_with("HTTP/1.1 503"),
        "refused with {refusal:?}"
    );

    // Further clients are refused at once, and the accept loop does not spin meanwhile.
    let cpu_before = cpu_seconds(pid);
    let window = Instant::now();
    for _ in 0..20 {
        let answer = ws_open(&addr).map(|_| ()).unwrap_err();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (cpu, took) = (cpu_seconds(pid) - cpu_before, window.elapsed());
    assert!(
        cpu < took.as_secs_f64() / 2.0,
        "{cpu:.2} s of CPU in {took:?} while out of descriptors"
    );
    // The sessions already open keep receiving ticks.
    ws_gets_a_new_tick(&mut sessions[0]);
    let last = sessions.len() - 1;
    ws_gets_a_new_tick(&mut sessions[last]);
    // WebTransport needs no descriptor per session: a new one opens and gets ticks.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use fleetcast::client::{self, ClientOptions, Event, Trust};
        let trust = Trust::Hashes(vec![client::parse_hash(&hash).unwrap()]);
        let endpoint = client::endpoint(&ClientOptions::new(trust)).unwrap();
        let url = format!("https://127.0.0.1:{}/positions", server.wt_port);
        let mut session = client::open(&endpoint, &url, None).await.unwrap();
        let mut datagrams = 0;
        while datagrams < 3 {
            let event = tokio::time::timeout(Duration::from_secs(5), session.next())
                .await
                .expect("a WebTransport event within 5 s")
                .expect("the session is open");
            if let Event::Datagram(_) = event {
                datagrams += 1;
            }
        }
    });

    // Refusals are logged, but not one line each.
    let lines = server.logged("out of file descriptors");
    assert!(!lines.is_empty(), "refusals not logged");
    assert!(lines.len() <= 5, "{} lines for 21 refusals", lines.len());

    // Once descriptors are free again, HTTP is served as before.
    sessions.truncate(3);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(body) = try_fetch(&format!("http://{addr}/healthz")) {
            let health: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(health["counters"]["http_refused_no_fd"].as_u64().unwrap() >= 21);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HTTP not served after fds were freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ws_gets_a_new_tick(&mut sessions[0]);
}

/// A plain HTTP/1.1 GET over a TCP socket; the body of a 200, or `None`.
fn try_fetch(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    if !body.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(body.split("\r\n\r\n").nth(1)?.to_string())
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
