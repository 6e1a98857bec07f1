//! The `fleetcast` binary: parses arguments, sets up logging, runs one subcommand.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;

use fleetcast::mint::{self, TokenArgs};
use fleetcast::publish::simulate::{self, SimCommandArgs};
use fleetcast::publish::{self, Finished, PublishArgs};
use fleetcast::server::{now_us, ServeArgs, Server, SESSION_PATH};
use fleetcast::swarm::{self, SwarmArgs};
use fleetcast::watch::{self, WatchArgs};

/// mimalloc serves the many small per-connection allocations (quinn's packets, ACK ranges,
/// timers) with less CPU than the system allocator; see BENCHMARKS.md for the comparison.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Live vehicle positions over WebTransport datagrams.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Runtime worker threads (default: one per core). 1 runs everything on one thread, which
    /// saves cross-thread wake-ups when another process (a load generator) shares the cores.
    #[arg(long, global = true, env = "FLEETCAST_THREADS")]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server with the built-in fleet simulator.
    Serve(Box<ServeArgs>),
    /// Follow the fleet from the command line and report what arrives.
    Watch(WatchArgs),
    /// Open many sessions at once and measure delivery and latency.
    Swarm(SwarmArgs),
    /// Print a subscriber token for a server started with --subscribe-secret.
    Token(TokenArgs),
    /// Send recorded fixes (NDJSON, CSV or GPX) to a server's position ingest. Exit status: 0
    /// all accepted, 1 some rejected, 2 stopped by an error.
    Publish(PublishArgs),
    /// Run the simulator outside the server: publish its cars to a server's ingest, or record
    /// them as NDJSON.
    Sim(Box<SimCommandArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // publish and sim keep exit status 1 for "some fixes were rejected".
    let fatal = match cli.command {
        Command::Publish(_) | Command::Sim(_) => 2,
        _ => 1,
    };
    let result = runtime(cli.threads).and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(fatal)
        }
    }
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    Ok(runtime)
}

async fn run(command: Command) -> Result<ExitCode> {
    // A process-wide crypto provider, so rustls never has to guess between ring and aws-lc.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match command {
        Command::Serve(args) => serve(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Token(args) => {
            // The token alone on stdout, so `$(fleetcast token ...)` captures exactly it.
            println!("{}", mint::run(&args, now_us() / 1_000_000)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch(args) => {
            let json = args.json;
            let report = watch::run(args, stop_on_signal()).await?;
            print_report(json, &report, || report.summary())?;
            if report.sessions == 0 {
                anyhow::bail!("never connected");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Swarm(args) => {
            let json = args.json;
            let report = swarm::run(args).await?;
            print_report(json, &report, || report.summary())?;
            if report.sessions_connected == 0 {
                anyhow::bail!("no session connected");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish(args) => {
            let json = args.json;
            let finished = publish::run(args, stop_on_signal()).await?;
            finish_publishing(json, finished)
        }
        Command::Sim(args) => {
            let json = args.json;
            match simulate::run(*args, stop_on_signal()).await? {
                Some(finished) => finish_publishing(json, finished),
                None => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

/// A token cancelled on Ctrl-C or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let signal = tokio::spawn(shutdown_signal());
    tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = signal.await;
            stop.cancel();
        }
    });
    stop
}

/// Prints a publishing summary; exit status 0 if every fix was accepted, 1 if some were
/// rejected, an error (status 2) if the run stopped early.
fn finish_publishing(json: bool, finished: Finished) -> Result<ExitCode> {
    let summary = &finished.summary;
    print_report(json, summary, || summary.text())?;
    if let Some(e) = finished.error {
        return Err(e);
    }
    Ok(if summary.rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints a report on stdout: one JSON object, or the human summary.
fn print_report<R: serde::Serialize>(
    json: bool,
    report: &R,
    summary: impl FnOnce() -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", summary());
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    // Listen for signals before anything starts, so an early SIGTERM still shuts down cleanly.
    let signal = tokio::spawn(shutdown_signal());
    fleetcast::fdlimit::apply_at_start(args.danger_max_open_files)?;
    let server = Server::start(args).await?;
    let http_port = server.http_addr.port();
    let wt_port = server.wt_addr.port();
    let scheme = if server.https() { "https" } else { "http" };
    info!("web demo:     {scheme}://localhost:{http_port}/");
    info!("session URL:  https://localhost:{wt_port}{SESSION_PATH}");
    if server.tokens_required() {
        info!("subscriber tokens required: add ?token=... (fleetcast token --secret ...)");
    }
    if let Some(hash) = server.cert_hashes().first() {
        info!("certificate:  sha-256 {hash}");
        info!("              (also at http://localhost:{http_port}/certificate.sha256)");
    }
    let _ = signal.await;
    info!("shutting down");
    server.shutdown();
    server.wait().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
