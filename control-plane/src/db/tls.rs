//! `DATABASE_URL`'s TLS settings. tokio-postgres itself knows `sslmode=disable|prefer|require`
//! and no certificates; libpq's `verify-ca`, `verify-full` and `sslrootcert` are read here, taken
//! out of the string, and turned into a rustls connector.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tollgate_common::tls::{self, Verify};

/// A parsed `DATABASE_URL`: what tokio-postgres gets, and how to do TLS, if at all.
pub struct DbTarget {
    pub config: tokio_postgres::Config,
    /// `None`: plain TCP (`disable`, `prefer`, `allow` or no `sslmode`: no TLS is attempted).
    pub tls: Option<Verify>,
    /// `sslrootcert` from the URL.
    pub root_cert: Option<PathBuf>,
}

impl DbTarget {
    /// Parses a URL (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) or a key=value
    /// string (`host=… sslmode=verify-full`). Errors never repeat the string (it may hold a
    /// password).
    pub fn parse(raw: &str) -> Result<DbTarget, String> {
        let mut mode = None;
        let mut root_cert = None;
        let rest = if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            let (base, query) = raw.split_once('?').unwrap_or((raw, ""));
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = percent_decode(v);
                match k {
                    "sslmode" => mode = Some(v),
                    "sslrootcert" => root_cert = Some(PathBuf::from(v)),
                    _ => kept.push(pair),
                }
            }
            if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        } else {
            let mut kept = Vec::new();
            for token in raw.split_whitespace() {
                match token.split_once('=') {
                    Some(("sslmode", v)) => mode = Some(v.to_owned()),
                    Some(("sslrootcert", v)) => root_cert = Some(PathBuf::from(v)),
                    _ => kept.push(token),
                }
            }
            kept.join(" ")
        };
        let tls = match mode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => None,
            // libpq: `require` with a root certificate behaves as `verify-ca`.
            Some("require") if root_cert.is_some() => Some(Verify::ChainOnly),
            Some("require") => Some(Verify::Nothing),
            Some("verify-ca") => Some(Verify::ChainOnly),
            Some("verify-full") => Some(Verify::Full),
            Some(_) => {
                return Err(
                    "sslmode must be disable, allow, prefer, require, verify-ca or verify-full"
                        .to_owned(),
                );
            }
        };
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
        config.ssl_mode(if tls.is_some() {
            tokio_postgres::config::SslMode::Require
        } else {
            tokio_postgres::config::SslMode::Disable
        });
        Ok(DbTarget {
            config,
            tls,
            root_cert,
        })
    }

    /// The rustls connector for this target; `ca_file` is used when the URL names no
    /// `sslrootcert`.
    pub fn connector(
        &self,
        ca_file: Option<&Path>,
    ) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, String> {
        let Some(verify) = self.tls else {
            return Ok(None);
        };
        let roots = match self.root_cert.as_deref().or(ca_file) {
            Some(path) => Some(read_roots(path)?),
            None => None,
        };
        let config = tls::client_config(roots, verify)?;
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }
}

/// Reads a PEM file of CA certificates.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    tls::roots_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

fn percent_decode(v: &str) -> String {
    percent_encoding::percent_decode_str(v)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let check = |raw: &str, want: Option<Verify>, cert: Option<&str>| {
            let t = DbTarget::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(t.tls, want, "{raw}");
            assert_eq!(t.root_cert.as_deref(), cert.map(Path::new), "{raw}");
        };
        check("postgres://u@h/db", None, None);
        check("postgres://u@h/db?sslmode=prefer", None, None);
        check(
            "postgres://u@h/db?sslmode=require",
            Some(Verify::Nothing),
            None,
        );
        check(
            "postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem",
            Some(Verify::ChainOnly),
            Some("/ca.pem"),
        );
        check(
            "postgres://u@h/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
            Some(Verify::Full),
            Some("/etc/ca.pem"),
        );
        check(
            "host=h dbname=d sslmode=verify-ca",
            Some(Verify::ChainOnly),
            None,
        );
        assert!(DbTarget::parse("postgres://u:hunter2@h/db?sslmode=sometimes").is_err());
        let err = DbTarget::parse("postgres://u:hunter2@h:x/db")
            .err()
            .expect("bad port");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
