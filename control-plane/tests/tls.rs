//! Issue 13: TLS to Redis and PostgreSQL. Starts a redis-server that speaks TLS only and a
//! PostgreSQL that accepts TLS connections only, both with certificates of a throwaway CA made
//! here (rcgen), then runs the control plane (`rediss://`, `sslmode=verify-full`) and a sidecar
//! (`rediss://`) against them. Skips — saying why — only when `redis-server` or PostgreSQL's
//! binaries are missing or were built without TLS, unless `TOLLGATE_TEST_REQUIRE_TLS=1` (set by
//! `scripts/test`, which installs them), where that is a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;
use support::{Api, Cred};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A PostgreSQL stopped with `pg_ctl stop` when dropped.
struct Postgres {
    bindir: PathBuf,
    data: PathBuf,
    as_postgres: bool,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg_command(&self.bindir, "pg_ctl", self.as_postgres)
            .args([
                "-D",
                &self.data.display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Skips the test (or fails it under `scripts/test`) with the reason.
fn skip(why: &str) {
    if std::env::var("TOLLGATE_TEST_REQUIRE_TLS").is_ok_and(|v| v == "1") {
        panic!("TLS test cannot run: {why}");
    }
    eprintln!("SKIPPED tls test: {why}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// PostgreSQL refuses to run as root: then it runs as the `postgres` user.
fn pg_command(bindir: &Path, program: &str, as_postgres: bool) -> Command {
    let path = bindir.join(program);
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn pg_bindir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("TOLLGATE_TEST_PG_BINDIR") {
        candidates.push(dir.into());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        candidates.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

/// The throwaway CA, a server certificate it signs (for 127.0.0.1 and localhost), and a second,
/// unrelated CA.
struct Certs {
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certs(dir: &Path) -> Certs {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate test CA");
    let ca = CertifiedIssuer::self_signed(ca_params.clone(), ca_key).expect("ca");
    let other = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
        .expect("other ca");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let certs = Certs {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&certs.ca, ca.pem()).expect("write");
    std::fs::write(&certs.other_ca, other.pem()).expect("write");
    std::fs::write(&certs.cert, server.pem()).expect("write");
    std::fs::write(&certs.key, server_key.serialize_pem()).expect("write");
    certs
}

/// redis-server on a TLS port only (no plain port).
async fn start_redis(dir: &Path, certs: &Certs) -> Result<(Killed, u16), String> {
    let version = Command::new("redis-server")
        .arg("--version")
        .output()
        .map_err(|e| format!("redis-server not found ({e})"))?;
    let _ = version;
    let port = free_port();
    let log = dir.join("redis.log");
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--tls-cert-file")
        .arg(&certs.cert)
        .arg("--tls-key-file")
        .arg(&certs.key)
        .arg("--tls-ca-cert-file")
        .arg(&certs.ca)
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server: {e}"))?;
    let mut child = Killed(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((child, port));
        }
        if let Ok(Some(_)) = child.0.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "redis-server without TLS support? it exited: {}",
                text.lines().last().unwrap_or("(no log)")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("redis-server did not listen on its TLS port".to_owned())
}

/// A PostgreSQL that accepts TLS connections only (pg_hba: hostssl, and hostnossl rejected).
fn start_postgres(dir: &Path, certs: &Certs) -> Result<(Postgres, u16), String> {
    let bindir = pg_bindir().ok_or("PostgreSQL's initdb and pg_ctl not found")?;
    let as_postgres = is_root();
    let data = dir.join("pg");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let (key, cert) = (data.join("server.key"), data.join("server.crt"));
    std::fs::copy(&certs.key, &key).map_err(|e| e.to_string())?;
    std::fs::copy(&certs.cert, &cert).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    if as_postgres {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(dir)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("cannot hand the data folder to the postgres user".to_owned());
        }
    }
    let initdb = pg_command(&bindir, "initdb", as_postgres)
        .arg("-D")
        .arg(data.join("data"))
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "-N",
        ])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !initdb.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        ));
    }
    let pgdata = data.join("data");
    std::fs::write(
        pgdata.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
    )
    .map_err(|e| e.to_string())?;
    let port = free_port();
    let postgres = Postgres {
        bindir: bindir.clone(),
        data: pgdata.clone(),
        as_postgres,
    };
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        data.display(),
        cert.display(),
        key.display()
    );
    let started = pg_command(&bindir, "pg_ctl", as_postgres)
        .arg("-D")
        .arg(&pgdata)
        .arg("-l")
        .arg(data.join("log"))
        .args(["-w", "-t", "60", "-o", &options, "start"])
        .output()
        .map_err(|e| format!("pg_ctl: {e}"))?;
    if !started.status.success() {
        let log = std::fs::read_to_string(data.join("log")).unwrap_or_default();
        return Err(format!(
            "PostgreSQL did not start with ssl=on (built without TLS?): {}",
            log.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok((postgres, port))
}

#[tokio::test]
async fn both_programs_reach_redis_and_postgres_over_tls() {
    let dir = std::env::temp_dir().join(format!("tg-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let certs = make_certs(&dir);
    let (_redis, redis_port) = match start_redis(&dir, &certs).await {
        Ok(r) => r,
        Err(why) => return skip(&why),
    };
    let (_postgres, pg_port) = match start_postgres(&dir, &certs) {
        Ok(p) => p,
        Err(why) => return skip(&why),
    };
    let ca = certs.ca.display().to_string();
    let pg = |db: &str, mode: &str, root: &str| {
        format!(
            "host=127.0.0.1 port={pg_port} user=postgres dbname={db} sslmode={mode} sslrootcert={root}"
        )
    };

    // The store refuses plain connections, and a certificate of another CA is refused by us.
    let plain = format!("host=127.0.0.1 port={pg_port} user=postgres dbname=postgres");
    assert!(tollgate_control_plane::db::connect(&plain).await.is_err());
    let other = certs.other_ca.display().to_string();
    let refused = tollgate_control_plane::db::connect(&pg("postgres", "verify-full", &other)).await;
    assert!(
        refused.is_err(),
        "a server certificate of another CA is refused"
    );

    // Create, migrate and seed a database over TLS (verify-full: chain and host name).
    let admin = tollgate_control_plane::db::connect(&pg("postgres", "verify-full", &ca))
        .await
        .expect("TLS connection with verify-full");
    admin
        .batch_execute("CREATE DATABASE tollgate")
        .await
        .expect("create database");
    let database_url = pg("tollgate", "verify-full", &ca);
    let mut client = tollgate_control_plane::db::connect(&database_url)
        .await
        .expect("connect");
    tollgate_control_plane::db::migrate::run(&mut client)
        .await
        .expect("migrate");
    tollgate_control_plane::db::seed::run(&mut client)
        .await
        .expect("seed");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the session is encrypted");

    // Redis: plain refused (no plain port), another CA refused.
    let rediss = format!("rediss://127.0.0.1:{redis_port}");
    {
        use fred::interfaces::ClientLike;
        let wrong = tollgate_control_plane::redis::client_with_ca(&rediss, Some(&certs.other_ca))
            .expect("client");
        let _connection = wrong.connect();
        let reached = tokio::time::timeout(Duration::from_secs(2), wrong.wait_for_connect()).await;
        assert!(
            !matches!(reached, Ok(Ok(()))),
            "a Redis certificate of another CA is refused"
        );
        let _ = wrong.quit().await;
    }

    // The control plane over TLS to both.
    let env: std::collections::BTreeMap<String, String> = [
        ("DATABASE_URL", database_url.as_str()),
        ("REDIS_URL", rediss.as_str()),
        ("TOLLGATE_REDIS_CA_FILE", ca.as_str()),
        ("TOLLGATE_REDIS_PREFIX", "tls"),
        ("TOLLGATE_LOG_FORMAT", "text"),
        ("TOLLGATE_JWT_PRIVATE_KEY", support::test_pem()),
        ("TOLLGATE_JWT_KID", support::TEST_KID),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = tollgate_control_plane::config::Config::load(None, &env, Default::default())
        .expect("config");
    let server = support::serve(config.clone()).await;
    let api = Api::new(&server.base);
    let mut ready = 0;
    for _ in 0..100 {
        ready = api.get("/readyz", Cred::None).await.status;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 200, "PostgreSQL and Redis reachable over TLS");
    let (_, token, _) = api
        .register("tls@example.com", "correct horse battery")
        .await;
    let login = api
        .post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "tls@example.com", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(
        login.status, 200,
        "login counts failures in Redis: {:?}",
        login.body
    );

    // A sidecar over TLS to the same Redis: it decides and counts a metered call there.
    let app = support::demo_app().await;
    let sidecar = support::sidecar(
        &config,
        &server.base,
        &server.internal,
        &app,
        support::IDOCTOR_ROUTES,
    )
    .await;
    let mut answer = (0, String::new());
    for _ in 0..50 {
        let r = reqwest::Client::new()
            .post(format!("{}/process/p1/2026-11-25", sidecar.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send");
        let remaining = r
            .headers()
            .get("x-quota-remaining")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        answer = (r.status().as_u16(), remaining);
        if answer.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        answer,
        (200, "49".to_owned()),
        "metered through Redis over TLS"
    );
    drop(sidecar);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
