//! Smoke tests of the load generator: a small swarm against a real server, both transports,
//! both WebTransport engines (wtransport and quinn-proto), and its churn and reconnect modes.

mod common;

use std::time::Duration;

use common::TestServer;
use fleetcast::client::ConnectArgs;
use fleetcast::server::Server;
use fleetcast::swarm::{self, Engine, SwarmArgs, Transport};

/// The two 1,000-session tests run alone (a write lock); the smaller ones share the machine
/// with each other (read locks). Run beside everything else on two cores, the 1,000 sessions
/// missed ticks for want of CPU, which is not what they test.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn args(ts: &TestServer, transport: Transport, sessions: usize) -> SwarmArgs {
    args_for(&ts.server, transport, sessions)
}

fn args_for(server: &Server, transport: Transport, sessions: usize) -> SwarmArgs {
    SwarmArgs {
        connect: ConnectArgs {
            cert_hash: server.cert_hash.clone(),
            ..ConnectArgs::new(common::url_for(server.wt_addr, "/positions"))
        },
        ws_url: Some(format!("ws://{}/positions.ws", server.http_addr)),
        transport,
        engine: Engine::Wtransport,
        engine_threads: 1,
        sessions,
        sessions_per_endpoint: Some(250),
        connect_concurrency: 100,
        connect_rate: 2000,
        connect_timeout: Duration::from_secs(60),
        duration: Duration::from_secs(2),
        udp_buffer: 4 << 20,
        metrics_url: Some(format!("http://{}/metrics", server.http_addr)),
        reconnect: false,
        reconnect_base: Duration::from_secs(1),
        reconnect_cap: Duration::from_secs(8),
        reconnect_jitter: fleetcast::backoff::Jitter::Full,
        attempt_timeout: Duration::from_secs(5),
        churn_per_s: 0.0,
        json: true,
    }
}

/// The same arguments on the quinn-proto engine, with its own sessions per socket.
fn on_proto(mut a: SwarmArgs) -> SwarmArgs {
    a.engine = Engine::Proto;
    a.sessions_per_endpoint = None;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_webtransport_sessions_all_receive_every_tick() {
    thousand_sessions_all_receive_every_tick(Engine::Wtransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_proto_engine_sessions_all_receive_every_tick() {
    thousand_sessions_all_receive_every_tick(Engine::Proto).await;
}

async fn thousand_sessions_all_receive_every_tick(engine: Engine) {
    let _alone = MACHINE.write().await;
    let ts = TestServer::start(|a| a.tick_ms = 250).await;
    let mut a = args(&ts, Transport::Webtransport, 1000);
    if engine == Engine::Proto {
        // Two threads and small sockets: the split of sessions over both is exercised too.
        a = on_proto(a);
        a.engine_threads = 2;
        a.sessions_per_endpoint = Some(300);
    }
    let report = swarm::run(a).await.unwrap();
    assert_eq!(report.engine, Some(engine));
    assert_eq!(report.sessions_connected, 1000, "{report:?}");
    assert!(report.ticks >= 6, "{report:?}");
    assert_eq!(report.parts_per_tick, 1);
    // Loopback with 4 MiB buffers: nothing should be lost at this size.
    assert!(report.delivery_ratio >= 0.999, "{report:?}");
    assert!(report.latency_ms.max > 0.0);
    assert_eq!(ts.server.stats().get("sessions_accepted"), Some(1000));
    // Positions are never older than a few ticks on a clean path.
    assert!(
        report.position_age_ms.p50 > 0.0 && report.position_age_ms.max < 2000.0,
        "{report:?}"
    );
    let server = report.server.expect("server metrics read");
    assert!(
        server.cpu_seconds > 0.0 && server.rss_bytes > 0,
        "{server:?}"
    );
    let own = report.load_generator.expect("own figures");
    assert!(own.cpu_seconds > 0.0 && own.rss_bytes > 0, "{own:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_swarm_measures_the_same_ticks() {
    let _shared = MACHINE.read().await;
    let ts = TestServer::start(|a| a.tick_ms = 250).await;
    let report = swarm::run(args(&ts, Transport::Websocket, 200))
        .await
        .unwrap();
    assert_eq!(report.sessions_connected, 200, "{report:?}");
    assert!(report.ticks >= 6, "{report:?}");
    assert!(report.delivery_ratio >= 0.999, "{report:?}");
    assert_eq!(ts.server.stats().get("ws_sessions_accepted"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_token_is_sent_on_both_transports() {
    let _shared = MACHINE.read().await;
    let secret = fleetcast::token::Secret::parse("swarm-test-secret-0123456789abcdef").unwrap();
    let ts = TestServer::start(|a| {
        a.tick_ms = 250;
        a.subscribe_secret = Some(secret.clone());
    })
    .await;
    let exp = fleetcast::server::now_us() / 1_000_000 + 3600;
    let token = fleetcast::token::mint(&secret, &fleetcast::token::Claims::expiring_at(exp as i64));
    for (transport, engine) in [
        (Transport::Webtransport, Engine::Wtransport),
        (Transport::Webtransport, Engine::Proto),
        (Transport::Websocket, Engine::Wtransport),
    ] {
        let with_engine = |mut a: SwarmArgs| {
            if engine == Engine::Proto {
                a = on_proto(a);
            }
            a
        };
        let mut with = with_engine(args(&ts, transport, 20));
        with.connect.token = Some(token.clone());
        let report = swarm::run(with).await.unwrap();
        assert_eq!(report.sessions_connected, 20, "{transport:?}: {report:?}");
        assert!(report.delivery_ratio >= 0.999, "{report:?}");

        let mut without = with_engine(args(&ts, transport, 5));
        without.duration = Duration::from_millis(100);
        let report = swarm::run(without).await.unwrap();
        assert_eq!(report.sessions_connected, 0, "{transport:?}: {report:?}");
        assert_eq!(report.connect_failures, 5, "{report:?}");
        assert_eq!(
            report.connect_failures_by_reason,
            [("refused 401".to_string(), 5)].into(),
            "{transport:?}: the status is the reason"
        );
    }
    assert_eq!(ts.server.stats().get("refused_unauthorized"), Some(10));
    assert_eq!(ts.server.stats().get("ws_refused_unauthorized"), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_swarm_ignores_the_webtransport_engine() {
    let _shared = MACHINE.read().await;
    let ts = TestServer::start(|a| a.tick_ms = 250).await;
    let report = swarm::run(on_proto(args(&ts, Transport::Websocket, 20)))
        .await
        .unwrap();
    assert_eq!(report.sessions_connected, 20, "{report:?}");
    assert_eq!(report.engine, None);
    assert_eq!(ts.server.stats().get("ws_sessions_accepted"), Some(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_replaces_sessions_at_the_rate_asked() {
    let _shared = MACHINE.read().await;
    churn_replaces_sessions(Engine::Wtransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proto_engine_churn_replaces_sessions_at_the_rate_asked() {
    let _shared = MACHINE.read().await;
    churn_replaces_sessions(Engine::Proto).await;
}

async fn churn_replaces_sessions(engine: Engine) {
    let ts = TestServer::start(|a| a.tick_ms = 250).await;
    let mut a = args(&ts, Transport::Webtransport, 40);
    if engine == Engine::Proto {
        a = on_proto(a);
    }
    a.churn_per_s = 20.0;
    a.duration = Duration::from_secs(2);
    let report = swarm::run(a).await.unwrap();
    let churn = report.churn.expect("churn report");
    // One close per 50 ms over 2 s (the first at once): 40, give or take a timer tick.
    assert!((38..=41).contains(&churn.sessions_closed), "{churn:?}");
    // The last one or two may still be connecting when the window ends.
    assert!(
        churn.sessions_opened + 2 >= churn.sessions_closed
            && churn.sessions_opened <= churn.sessions_closed,
        "{report:?}"
    );
    assert!(report.attempts_failed_by_reason.is_empty(), "{report:?}");
    let accepted = ts.server.stats().get("sessions_accepted").unwrap();
    assert!(
        (40 + churn.sessions_opened..=40 + churn.sessions_closed).contains(&accepted),
        "{accepted} accepted: {churn:?}"
    );
    // Churned sessions are charged only for the ticks of their own life.
    assert!(report.delivery_ratio >= 0.99, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_brings_every_session_back_after_a_restart() {
    let _shared = MACHINE.read().await;
    reconnect_after_a_restart(Engine::Wtransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proto_engine_reconnect_brings_every_session_back_after_a_restart() {
    let _shared = MACHINE.read().await;
    reconnect_after_a_restart(Engine::Proto).await;
}

async fn reconnect_after_a_restart(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = fleetcast::server::ServeArgs::ephemeral(dir.path().to_path_buf());
    serve.tick_ms = 250;
    let first = fleetcast::server::Server::start(serve.clone())
        .await
        .unwrap();
    serve.wt_listen = first.wt_addr;
    serve.http_listen = first.http_addr;
    let mut a = SwarmArgs {
        ws_url: None,
        metrics_url: Some("none".into()),
        ..args_for(&first, Transport::Webtransport, 50)
    };
    if engine == Engine::Proto {
        a = on_proto(a);
    }
    a.reconnect = true;
    a.reconnect_base = Duration::from_millis(200);
    a.duration = Duration::from_secs(10);
    let swarm = tokio::spawn(swarm::run(a));
    while first.sessions() < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.shutdown();
    first.wait().await;
    // Same ports and certificate directory: the same certificate hash. The old endpoint's
    // socket closes with its driver task, just after `wait` returns.
    let mut tries = 0;
    let second = loop {
        match fleetcast::server::Server::start(serve.clone()).await {
            Ok(server) => break server,
            Err(e) if tries < 40 => {
                tries += 1;
                tracing::debug!("restart: {e:#}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("restart on the same ports: {e:#}"),
        }
    };
    let report = swarm.await.unwrap().unwrap();
    let r = report.reconnect.expect("reconnect report");
    assert_eq!(r.losses, 50, "{r:?}");
    assert_eq!(r.reconnects, 50, "{r:?}");
    assert_eq!(r.still_down, 0, "{r:?}");
    // Attempts while the old server shuts down are refused at once and back off (200 ms,
    // 400 ms, ...): all are back within a few seconds of the new server starting.
    let recovery = r.recovery_seconds.expect("all back");
    assert!(
        recovery > 0.0 && recovery < 8.0,
        "{r:?} {:?}",
        report.attempts_failed_by_reason
    );
    assert_eq!(second.stats().get("sessions_accepted"), Some(50));
    second.shutdown();
    second.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_swarm_spreads_sessions_over_every_server_node() {
    let _shared = MACHINE.read().await;
    spread_over_nodes(Engine::Wtransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proto_engine_swarm_spreads_sessions_over_every_server_node() {
    let _shared = MACHINE.read().await;
    spread_over_nodes(Engine::Proto).await;
}

/// `--server A,B`: each node's `/config.json` and certificate hash are fetched, and the
/// sessions alternate between the nodes.
async fn spread_over_nodes(engine: Engine) {
    // Dual-stack, so the session URL built from the HTTP address (127.0.0.1) reaches it.
    let dual = |a: &mut fleetcast::server::ServeArgs| a.wt_listen = "[::]:0".parse().unwrap();
    let (a, b) = (TestServer::start(dual).await, TestServer::start(dual).await);
    let mut args = args(&a, Transport::Webtransport, 20);
    args.connect = ConnectArgs {
        server: vec![
            format!("http://{}", a.server.http_addr),
            format!("http://{}", b.server.http_addr),
        ],
        ..ConnectArgs::new("https://unused.invalid/positions")
    };
    args.metrics_url = None;
    args.engine = engine;
    if engine == Engine::Proto {
        args.sessions_per_endpoint = None;
    }
    let report = swarm::run(args).await.expect("swarm runs");
    assert_eq!(report.sessions_connected, 20, "{report:?}");
    // Two separate servers make separate ticks (the swarm's delivery window expects one
    // stream), so count what arrived: about 20 ticks of 100 ms for each of 20 sessions.
    assert!(report.datagrams >= 20 * 15, "{report:?}");
    for ts in [&a, &b] {
        assert_eq!(
            ts.counter("sessions_accepted"),
            10,
            "half the sessions on each node"
        );
    }
}
