//! `tollgate-paysim`: configuration from the environment, then serve until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use tollgate_common::config::ProcessEnv;
use tollgate_paysim::Config;
use tollgate_paysim::config::{
    ENV_DATA_DIR, ENV_KEYS_DIR, ENV_LISTEN, ENV_LOG, ENV_LOG_FORMAT, ENV_PUBLIC_URL,
};

fn usage() -> String {
    format!(
        "tollgate-paysim: Alipay (RSA2) and WeChat Pay v3 gateway simulator for development and tests.\n\n\
         Configured by the environment:\n  \
         {ENV_LISTEN}      address to serve on (default 127.0.0.1:9100)\n  \
         {ENV_KEYS_DIR}    folder with the test keys (made by paysim/gen-keys.sh)\n  \
         {ENV_DATA_DIR}    alternative: the keys are then in $PAYSIM_DATA_DIR/keys\n  \
         {ENV_PUBLIC_URL}  where browsers reach the simulator (default http://<listen>)\n  \
         {ENV_LOG} / {ENV_LOG_FORMAT}  log filter (default info) and format (json|text)\n"
    )
}

fn main() -> ExitCode {
    if let Some(arg) = std::env::args().nth(1) {
        if arg == "--help" || arg == "-h" {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "tollgate-paysim takes no arguments (got {arg:?})\n\n{}",
            usage()
        );
        return ExitCode::from(2);
    }
    let config = match Config::from_env(&ProcessEnv) {
        Ok(config) => config,
        Err(e) => {
            for line in e.0 {
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
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        tollgate_paysim::run(config, listener, shutdown_signal())
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

/// Resolves on SIGTERM or Ctrl-C.
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
