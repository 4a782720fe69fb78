//! `tollgate-control-plane`: `serve`, `migrate`, `seed` and `admin create`.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tollgate_common::config::ProcessEnv;
use tollgate_control_plane::config::{Config, Flags};
use tollgate_control_plane::db;
use tollgate_control_plane::domain::{accounts, password};

/// mimalloc gives freed memory back to the system (glibc's malloc kept the 19 MiB argon2
/// buffers of a login burst in per-thread arenas for good).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tollgate-control-plane", version, about)]
struct Cli {
    /// TOML config file; environment variables and flags override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The settings that have a flag (config.rs declares them).
    #[command(flatten)]
    settings: Flags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the REST API.
    Serve,
    /// Apply pending database migrations (safe to run twice, and from two processes at once).
    Migrate,
    /// Insert the idoctor app, its quota types and the free/pro/enterprise plans (idempotent).
    Seed,
    /// Administrative tasks.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an admin account; the password is read from standard input.
    Create {
        #[arg(long)]
        email: String,
    },
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let config = match load_config(&mut cli) {
        Ok(config) => config,
        Err(lines) => {
            for line in lines {
                eprintln!("config: {line}");
            }
            return ExitCode::from(2);
        }
    };
    let _log = tollgate_common::telemetry::init(config.log_format, &config.log_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &mut Cli) -> Result<Config, Vec<String>> {
    let file = match &cli.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some((path.display().to_string(), text)),
            Err(e) => return Err(vec![format!("{}: cannot read: {e}", path.display())]),
        },
        None => None,
    };
    Config::load(
        file.as_ref().map(|(o, t)| (o.as_str(), t.as_str())),
        &ProcessEnv,
        std::mem::take(&mut cli.settings.0),
    )
    .map_err(|e| e.0)
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            tollgate_control_plane::run(config, listener, shutdown_signal()).await?;
        }
        Command::Migrate => {
            let mut client = connect(&config).await?;
            let applied = db::migrate::run(&mut client).await?;
            println!(
                "applied {} migration(s); schema is at version {}",
                applied.len(),
                db::migrate::MIGRATIONS.last().map_or(0, |m| m.version)
            );
        }
        Command::Seed => {
            let mut client = connect(&config).await?;
            db::seed::run(&mut client).await?;
            println!("seed data present: app idoctor, plans free/pro/enterprise");
        }
        Command::Admin {
            command: AdminCommand::Create { email },
        } => admin_create(&config, &email).await?,
    }
    Ok(())
}

async fn admin_create(config: &Config, email: &str) -> anyhow::Result<()> {
    let email = accounts::normalize_email(email).map_err(anyhow::Error::msg)?;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password for {email}: ");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let secret = line.trim_end_matches(['\r', '\n']).to_owned();
    password::check_rules(&secret)?;
    let hash = tokio::task::spawn_blocking(move || password::hash(&secret)).await??;

    let mut client = connect(config).await?;
    let tx = client.transaction().await?;
    let key = accounts::email_key(&email);
    let user = match db::users::create(&tx, &email, &key, &hash, "admin").await {
        Ok(user) => user,
        Err(e) if db::users::email_taken(e.unique_violation()) => {
            bail!("an account with the email {email} already exists")
        }
        Err(e) => return Err(e.into()),
    };
    tx.commit().await?;
    println!("created admin {} ({})", user.email, user.id);
    Ok(())
}

async fn connect(config: &Config) -> Result<tokio_postgres::Client, db::DbError> {
    db::connect_with_ca(
        config.database_url.expose(),
        config.database_ca_file.as_deref(),
    )
    .await
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
