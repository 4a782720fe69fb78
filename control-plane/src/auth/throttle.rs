//! Login throttling (OWASP's authentication guidance): failures are counted per (account,
//! client) and per client, in Redis so that it holds across replicas (`lua/login_throttle.lua`).
//! Past a few free failures each further one makes that pair (or that client) wait, twice as
//! long each time up to a cap. Nothing is counted per account alone, so an attack on an account
//! from elsewhere never stops its owner's client from logging in.

use std::net::IpAddr;

use fred::types::scripts::Script;
use sha2::{Digest, Sha256};
use tollgate_common::keys::Keys;

use crate::config::LoginConfig;
use crate::redis::RedisClient;

static SCRIPT: &str = include_str!("../../../lua/login_throttle.lua");

#[derive(Clone)]
pub struct Throttle {
    script: Script,
    keys: Keys,
    config: LoginConfig,
}

/// The throttle's verdict.
pub enum Verdict {
    Open,
    /// Wait this many seconds before trying again.
    Locked(u64),
}

/// What a client is, for throttling: its IPv4 address, or the /64 of its IPv6 address (one
/// subscriber usually holds a whole /64, so single addresses would cost an attacker nothing).
pub fn client_id(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl Throttle {
    pub fn new(keys: Keys, config: LoginConfig) -> Throttle {
        Throttle {
            script: Script::from_lua(SCRIPT),
            keys,
            config,
        }
    }

    /// `account` is the email's comparison key (`accounts::email_key`), or the raw text for
    /// something that is not an email.
    fn redis_keys(&self, account: &str, client: IpAddr) -> Vec<String> {
        let digest = Sha256::digest(account.as_bytes());
        let account = hex::encode(digest);
        let client = client_id(client);
        vec![
            self.keys.login_failures_pair(&account, &client),
            self.keys.login_failures_client(&client),
        ]
    }

    async fn call(
        &self,
        redis: &RedisClient,
        mode: &str,
        account: &str,
        client: IpAddr,
    ) -> Result<Verdict, fred::error::Error> {
        let now = chrono::Utc::now().timestamp_millis();
        let (locked, retry_ms): (i64, i64) = self
            .script
            .evalsha_with_reload(
                redis,
                self.redis_keys(account, client),
                vec![
                    mode.to_owned(),
                    self.config.max_failures_account.to_string(),
                    self.config.max_failures_client.to_string(),
                    self.config.base_delay.0.to_string(),
                    self.config.max_delay.0.to_string(),
                    self.config.window.0.to_string(),
                    now.to_string(),
                ],
            )
            .await?;
        Ok(if locked == 1 {
            Verdict::Locked((retry_ms.max(0) as u64).div_ceil(1000).max(1))
        } else {
            Verdict::Open
        })
    }

    /// Must this client wait before trying this account?
    pub async fn check(
        &self,
        redis: &RedisClient,
        account: &str,
        client: IpAddr,
    ) -> Result<Verdict, fred::error::Error> {
        self.call(redis, "check", account, client).await
    }

    /// Counts a failed login of `account` from `client`.
    pub async fn fail(
        &self,
        redis: &RedisClient,
        account: &str,
        client: IpAddr,
    ) -> Result<Verdict, fred::error::Error> {
        self.call(redis, "fail", account, client).await
    }

    /// A successful login forgets this account's failures from this client (not the client's
    /// failures on other accounts: one good password must not reset a guessing run).
    pub async fn succeed(
        &self,
        redis: &RedisClient,
        account: &str,
        client: IpAddr,
    ) -> Result<(), fred::error::Error> {
        self.call(redis, "succeed", account, client).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_their_64() {
        let check = |ip: &str, want: &str| {
            assert_eq!(client_id(ip.parse().expect("ip")), want, "{ip}");
        };
        check("203.0.113.7", "203.0.113.7");
        check("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64");
        check("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64");
        check("::ffff:203.0.113.7", "203.0.113.7");
    }
}
