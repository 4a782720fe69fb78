//! Login throttling per account and per client address, in Redis so that it holds across
//! replicas (`lua/login_throttle.lua`). Stricter than ordinary rate limits: a handful of failures
//! locks the account (or the address) for the lockout window.

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
    /// Locked; try again after this many seconds.
    Locked(u64),
}

impl Throttle {
    pub fn new(keys: Keys, config: LoginConfig) -> Throttle {
        Throttle {
            script: Script::from_lua(SCRIPT),
            keys,
            config,
        }
    }

    fn redis_keys(&self, email: &str, client: IpAddr) -> Vec<String> {
        let digest = Sha256::digest(email.to_lowercase().as_bytes());
        let account: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        vec![
            self.keys.login_failures_account(&account),
            self.keys.login_failures_client(&client.to_string()),
        ]
    }

    async fn call(
        &self,
        redis: &RedisClient,
        mode: &str,
        email: &str,
        client: IpAddr,
    ) -> Result<Verdict, fred::error::Error> {
        let (locked, retry_ms): (i64, i64) = self
            .script
            .evalsha_with_reload(
                redis,
                self.redis_keys(email, client),
                vec![
                    mode.to_owned(),
                    self.config.max_failures_account.to_string(),
                    self.config.max_failures_client.to_string(),
                    self.config.lockout.0.to_string(),
                ],
            )
            .await?;
        Ok(if locked == 1 {
            Verdict::Locked((retry_ms.max(0) as u64).div_ceil(1000).max(1))
        } else {
            Verdict::Open
        })
    }

    /// Is this account or address locked?
    pub async fn check(
        &self,
        redis: &RedisClient,
        email: &str,
        client: IpAddr,
    ) -> Result<Verdict, fred::error::Error> {
        self.call(redis, "check", email, client).await
    }

    /// Counts a failed login; answers whether that locked the account or address.
    pub async fn fail(
        &self,
        redis: &RedisClient,
        email: &str,
        client: IpAddr,
    ) -> Result<Verdict, fred::error::Error> {
        self.call(redis, "fail", email, client).await
    }

    /// A successful login clears the account's failures (not the address's: one good password
    /// must not reset a guessing run against other accounts).
    pub async fn succeed(
        &self,
        redis: &RedisClient,
        email: &str,
        client: IpAddr,
    ) -> Result<(), fred::error::Error> {
        use fred::interfaces::KeysInterface;
        let keys = self.redis_keys(email, client);
        redis.del::<(), _>(keys[0].as_str()).await
    }
}
