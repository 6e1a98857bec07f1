//! Smoke test of the load generator: a small swarm against a real server, both transports.

mod common;

use std::time::Duration;

use common::TestServer;
use fleetcast::client::ConnectArgs;
use fleetcast::swarm::{self, SwarmArgs, Transport};

fn args(ts: &TestServer, transport: Transport, sessions: usize) -> SwarmArgs {
    SwarmArgs {
        connect: ConnectArgs {
            cert_hash: ts.server.cert_hash.clone(),
            ..ConnectArgs::new(common::url_for(ts.server.wt_addr, "/positions"))
        },
        ws_url: Some(format!("ws://{}/positions.ws", ts.server.http_addr)),
        transport,
        sessions,
        sessions_per_endpoint: 250,
        connect_concurrency: 100,
        connect_rate: 2000,
        connect_timeout: Duration::from_secs(60),
        duration: Duration::from_secs(2),
        udp_buffer: 4 << 20,
        metrics_url: Some(format!("http://{}/metrics", ts.server.http_addr)),
        json: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_webtransport_sessions_all_receive_every_tick() {
    let ts = TestServer::start(|a| a.tick_ms = 250).await;
    let report = swarm::run(args(&ts, Transport::Webtransport, 1000))
        .await
        .unwrap();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_swarm_measures_the_same_ticks() {
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
    let secret = fleetcast::token::Secret::parse("swarm-test-secret-0123456789abcdef").unwrap();
    let ts = TestServer::start(|a| {
        a.tick_ms = 250;
        a.subscribe_secret = Some(secret.clone());
    })
    .await;
    let exp = fleetcast::server::now_us() / 1_000_000 + 3600;
    let token = fleetcast::token::mint(&secret, &fleetcast::token::Claims::expiring_at(exp as i64));
    for transport in [Transport::Webtransport, Transport::Websocket] {
        let mut with = args(&ts, transport, 20);
        with.connect.token = Some(token.clone());
        let report = swarm::run(with).await.unwrap();
        assert_eq!(report.sessions_connected, 20, "{transport:?}: {report:?}");
        assert!(report.delivery_ratio >= 0.999, "{report:?}");

        let mut without = args(&ts, transport, 5);
        without.duration = Duration::from_millis(100);
        let report = swarm::run(without).await.unwrap();
        assert_eq!(report.sessions_connected, 0, "{transport:?}: {report:?}");
        assert_eq!(report.connect_failures, 5, "{report:?}");
    }
    assert_eq!(ts.server.stats().get("refused_unauthorized"), Some(5));
    assert_eq!(ts.server.stats().get("ws_refused_unauthorized"), Some(5));
}
