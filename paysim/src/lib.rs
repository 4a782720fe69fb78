//! `tollgate-paysim`: a payment gateway simulator for development and tests. It plays Alipay's
//! open platform gateway (RSA2) and WeChat Pay API v3 with local test keys, verifying merchant
//! signatures exactly as the real gateways do and signing (and, for WeChat, encrypting) what it
//! sends back. Nothing in production uses it.
//!
//! Code map: [`alipay`] and [`wechat`] are the two gateways; [`sim`] is the simulator's own
//! surface (pay as the buyer, re-notify, inspect, keys); [`notify`] delivers notifications;
//! [`store`] is the in-memory order book; [`keys`] and [`config`] are read once at start-up.

pub mod alipay;
pub mod config;
pub mod crypto;
pub mod error;
pub mod format;
pub mod keys;
pub mod notify;
pub mod pages;
pub mod sim;
pub mod store;
pub mod wechat;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get, post};
use tokio::net::TcpListener;

pub use crate::config::Config;
use crate::store::Store;

pub struct AppState {
    pub config: Config,
    /// Where browsers reach the simulator.
    pub public_url: String,
    pub store: Store,
    /// Sends notifications to merchants.
    pub http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(sim::healthz))
        .route(
            "/alipay/gateway.do",
            get(alipay::gateway).post(alipay::gateway),
        )
        // The real gateway's own path, for a merchant configured with the bare host.
        .route("/gateway.do", get(alipay::gateway).post(alipay::gateway))
        .route("/wechat/{*path}", any(wechat::api))
        .route("/sim/pay", post(sim::pay_handler))
        .route("/sim/notify-again", post(sim::notify_again))
        .route("/sim/orders/{out_trade_no}", get(sim::order))
        .route("/sim/keys", get(sim::keys))
        .route("/sim/alipay/pay", post(sim::alipay_cashier_pay))
        .route("/sim/wechat/qr/{pr}", get(sim::wechat_qr))
        .route("/sim/wechat/qr/{pr}/pay", post(sim::wechat_qr_pay))
        .fallback(sim::not_found)
        .with_state(state)
}

/// Serves until `shutdown` resolves. Notifications still being retried then are dropped, as a
/// gateway restart would.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let addr = listener.local_addr()?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let http = reqwest::Client::builder()
        // Notify URLs are the merchant's own (usually local) addresses; a developer's proxy
        // settings must not reroute them.
        .no_proxy()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .build()?;
    tracing::info!(%addr, public_url, keys_dir = %config.keys_dir.display(), "payment simulator listening");
    let state = Arc::new(AppState {
        config,
        public_url,
        store: Store::default(),
        http,
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
