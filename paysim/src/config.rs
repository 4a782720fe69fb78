//! The simulator's one `Config`, read from the environment (through [`Env`], so tests hand in a
//! map) and validated as a whole, key files included: every problem is one line.

use std::net::SocketAddr;
use std::path::PathBuf;

use tollgate_common::config::{ConfigError, Env, LogFormat, Problems};

use crate::keys::Keys;

pub const ENV_LISTEN: &str = "PAYSIM_LISTEN";
pub const ENV_KEYS_DIR: &str = "PAYSIM_KEYS_DIR";
pub const ENV_DATA_DIR: &str = "PAYSIM_DATA_DIR";
pub const ENV_PUBLIC_URL: &str = "PAYSIM_PUBLIC_URL";
/// Shared with the other Tollgate programs, so one setting reaches every part of the stack.
pub const ENV_LOG: &str = "TOLLGATE_LOG";
pub const ENV_LOG_FORMAT: &str = "TOLLGATE_LOG_FORMAT";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9100";

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where browsers reach the simulator (cashier and QR pages); `None` means `http://<the
    /// address actually bound>`.
    pub public_url: Option<String>,
    pub keys_dir: PathBuf,
    pub keys: Keys,
    pub log_format: LogFormat,
    pub log_filter: String,
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();
        let listen = match env.var(ENV_LISTEN) {
            None => DEFAULT_LISTEN.parse().ok(),
            Some(raw) => match raw.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    problems.push(
                        ENV_LISTEN,
                        format_args!("{raw:?} is not an address such as 127.0.0.1:9100: {e}"),
                    );
                    None
                }
            },
        };
        let public_url = env.var(ENV_PUBLIC_URL).and_then(|raw| {
            let url = raw.trim_end_matches('/').to_owned();
            if (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() > "https://".len()
            {
                Some(url)
            } else {
                problems.push(
                    ENV_PUBLIC_URL,
                    format_args!("{raw:?} is not an http(s) URL"),
                );
                None
            }
        });
        let keys_dir = match (env.var(ENV_KEYS_DIR), env.var(ENV_DATA_DIR)) {
            (Some(dir), _) if !dir.is_empty() => Some((PathBuf::from(dir), ENV_KEYS_DIR)),
            (_, Some(data)) if !data.is_empty() => {
                Some((PathBuf::from(data).join("keys"), ENV_DATA_DIR))
            }
            _ => {
                problems.push(
                    ENV_KEYS_DIR,
                    format_args!("required: the folder with the test keys (or set {ENV_DATA_DIR}; the keys are then in $PAYSIM_DATA_DIR/keys)"),
                );
                None
            }
        };
        let keys = keys_dir
            .as_ref()
            .and_then(|(dir, setting)| Keys::load(dir, setting, &mut problems));
        let log_format = problems
            .env::<LogFormat>(env, ENV_LOG_FORMAT)
            .unwrap_or(LogFormat::Json);
        let log_filter = env.var(ENV_LOG).unwrap_or_else(|| "info".to_owned());
        match (listen, keys_dir, keys) {
            (Some(listen), Some((keys_dir, _)), Some(keys)) if problems.is_empty() => problems
                .finish(Config {
                    listen,
                    public_url,
                    keys_dir,
                    keys,
                    log_format,
                    log_filter,
                }),
            _ => Err(problems
                .finish(())
                .err()
                .unwrap_or_else(|| ConfigError(vec!["invalid configuration".to_owned()]))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        tollgate_common::config::env_of(pairs)
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::from_env(&env(&[
            (ENV_LISTEN, "nowhere"),
            (ENV_PUBLIC_URL, "ftp://x"),
            (ENV_LOG_FORMAT, "xml"),
        ]))
        .unwrap_err();
        let text = err.0.join("\n");
        for setting in [ENV_LISTEN, ENV_PUBLIC_URL, ENV_KEYS_DIR, ENV_LOG_FORMAT] {
            assert!(text.contains(setting), "{setting} missing from:\n{text}");
        }
        assert_eq!(err.0.len(), 4, "{text}");
    }

    #[test]
    fn data_dir_implies_keys_dir() {
        let err = Config::from_env(&env(&[(ENV_DATA_DIR, "/nonexistent/paysim")])).unwrap_err();
        let text = err.0.join("\n");
        assert!(text.contains("/nonexistent/paysim/keys"), "{text}");
        assert!(text.starts_with(ENV_DATA_DIR), "{text}");
    }
}
