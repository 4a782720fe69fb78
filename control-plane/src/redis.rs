//! The control plane's Redis client. It connects in the background and reconnects forever, so a
//! Redis outage shows in `/readyz` instead of stopping the process.

use std::time::Duration;

use fred::prelude::*;

pub type RedisClient = fred::clients::Client;

pub fn client(url: &str) -> Result<RedisClient, Error> {
    client_with_ca(url, None)
}

/// The Redis client; a `rediss://` URL connects over TLS, trusting the CAs of `ca_file` (default:
/// the public web roots) and checking the host name.
pub fn client_with_ca(url: &str, ca_file: Option<&std::path::Path>) -> Result<RedisClient, Error> {
    tollgate_common::tls::install_provider();
    let mut config = Config::from_url(url)?;
    if config.uses_tls() {
        let roots = match ca_file {
            Some(path) => {
                Some(crate::db::tls::read_roots(path).map_err(|e| Error::new(ErrorKind::Tls, e))?)
            }
            None => None,
        };
        let tls = tollgate_common::tls::client_config(roots, tollgate_common::tls::Verify::Full)
            .map_err(|e| Error::new(ErrorKind::Tls, e))?;
        config.tls = Some(fred::types::config::TlsConnector::from(tls).into());
    }
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(5);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(2);
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()?;
    Ok(client)
}

/// Checks that Redis answers within `timeout`.
pub async fn ping(client: &RedisClient, timeout: Duration) -> Result<(), Error> {
    let options = Options {
        timeout: Some(timeout),
        fail_fast: true,
        max_attempts: Some(1),
        ..Options::default()
    };
    client.with_options(&options).ping::<()>(None).await
}
