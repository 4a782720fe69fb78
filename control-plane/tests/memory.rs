//! Issue 13: bursts of concurrent logins must not leave the control plane's memory above its
//! Kubernetes limit. The real binary (its allocator included) takes three bursts of 64
//! concurrent logins; its resident memory afterwards must be under 256 MiB. Measured figures
//! (release build) are in docs/deployment.md, made with bench/login-burst.sh.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::{TestDb, config};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-control-plane");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn three_bursts_of_64_logins_leave_memory_under_256_mib() {
    let db = TestDb::migrated().await;
    let config = config(&db);
    let (port, internal) = (free_port(), free_port());
    let child = Killed(
        Command::new(BIN)
            .arg("serve")
            .env("DATABASE_URL", config.database_url.expose())
            .env("REDIS_URL", config.redis_url.expose())
            .env("TOLLGATE_REDIS_PREFIX", &config.redis_prefix)
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("TOLLGATE_INTERNAL_LISTEN", format!("127.0.0.1:{internal}"))
            .env("TOLLGATE_JWT_PRIVATE_KEY", support::test_pem())
            .env("TOLLGATE_JWT_KID", support::TEST_KID)
            .env("TOLLGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn control plane"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = support::Api::new(&base);
    api.register("burst@example.com", "correct horse battery")
        .await;
    let pid = child.0.id();
    for burst in 1..=3 {
        let logins = (0..64).map(|_| {
            let http = &http;
            let base = &base;
            async move {
                http.post(format!("{base}/v1/auth/login"))
                    .json(
                        &json!({"email": "burst@example.com", "password": "correct horse battery"}),
                    )
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        });
        let statuses = futures_util::future::join_all(logins).await;
        assert!(
            statuses.iter().all(|s| matches!(s, Ok(200 | 503))),
            "burst {burst}: {statuses:?}"
        );
        let mib = rss_kib(pid) / 1024;
        eprintln!("after burst {burst}: {mib} MiB resident");
        assert!(mib < 256, "after burst {burst}: {mib} MiB resident");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mib = rss_kib(pid) / 1024;
    eprintln!("a second later: {mib} MiB resident");
    assert!(mib < 256, "{mib} MiB resident");
}
