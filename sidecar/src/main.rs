//! `tollgate-sidecar`: the proxy listener, the admin listener, SIGHUP to reload the routes file,
//! SIGTERM to drain and stop.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tollgate_common::config::ProcessEnv;
use tollgate_sidecar::config::{Config, Flags};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tollgate-sidecar", version, about)]
struct Cli {
    /// TOML config file; environment variables and flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The settings that have a flag (config.rs declares them).
    #[command(flatten)]
    settings: Flags,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some((path.display().to_string(), text)),
            Err(e) => {
                eprintln!("config: {}: cannot read: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let config = match Config::load(
        file.as_ref().map(|(o, t)| (o.as_str(), t.as_str())),
        &ProcessEnv,
        cli.settings.0,
    ) {
        Ok(config) => config,
        Err(e) => {
            for line in e.0 {
                eprintln!("config: {line}");
            }
            return ExitCode::from(2);
        }
    };
    if let Err(e) = tollgate_sidecar::load_table(&config) {
        for line in e.to_string().lines() {
            eprintln!("config: {line}");
        }
        return ExitCode::from(2);
    }
    if cli.check {
        println!("configuration and routes file are valid");
        return ExitCode::SUCCESS;
    }
    let _log = tollgate_common::telemetry::init(config.log_format, &config.log_filter);
    // The first worker; `run` starts the others (one current-thread runtime per core).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let admin = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.admin_listen))?;
        tollgate_sidecar::run(config, listener, admin, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}
