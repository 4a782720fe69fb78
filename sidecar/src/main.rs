//! `tollgate-sidecar`: validates its configuration; the proxy itself arrives with issue 4.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tollgate_common::config::{ProcessEnv, Secret};
use tollgate_sidecar::config::{Config, Layer};

#[derive(Parser)]
#[command(name = "tollgate-sidecar", version, about)]
struct Cli {
    /// TOML config file; environment variables and flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Proxy listener [env: TOLLGATE_SIDECAR_LISTEN] [default: 0.0.0.0:8080]
    #[arg(long)]
    listen: Option<String>,
    /// Admin listener for /healthz, /readyz, /metrics [env: TOLLGATE_SIDECAR_ADMIN_LISTEN] [default: 127.0.0.1:9090]
    #[arg(long)]
    admin_listen: Option<String>,
    /// The app's base URL [env: TOLLGATE_SIDECAR_UPSTREAM]
    #[arg(long)]
    upstream: Option<String>,
    /// The routes file (YAML) [env: TOLLGATE_SIDECAR_ROUTES]
    #[arg(long)]
    routes: Option<PathBuf>,
    /// Redis URL; `redis-cluster://` for Redis Cluster [env: REDIS_URL]
    #[arg(long)]
    redis_url: Option<String>,
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
    let flags = Layer {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        upstream: cli.upstream,
        routes: cli.routes,
        redis_url: cli.redis_url.map(Secret::new),
        ..Layer::default()
    };
    let config = match Config::load(
        file.as_ref().map(|(o, t)| (o.as_str(), t.as_str())),
        &ProcessEnv,
        flags,
    ) {
        Ok(config) => config,
        Err(e) => {
            for line in e.0 {
                eprintln!("config: {line}");
            }
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    tollgate_common::telemetry::init(config.log_format, &config.log_filter);
    eprintln!("error: the proxy is not implemented yet");
    ExitCode::FAILURE
}
