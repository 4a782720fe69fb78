//! The binary: a bad routes file is refused at start (with line numbers) and on SIGHUP (the old
//! routes stay in force); a good one is taken on SIGHUP without a restart. Its JSON log lines of
//! a request carry the request's span, with the request id.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{ControlPlane, ROUTES, echo_upstream};
use tollgate_sidecar::config;
use tollgate_testkit::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-sidecar");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn check_reports_every_problem_with_its_line() {
    let dir = TempDir::new();
    let path = dir.0.join("routes.yaml");
    std::fs::write(
        &path,
        "app: idoctor\nupstream: http://127.0.0.1:4200\nroutes:\n  - method: GET\n    path: nope\n  - method: POST\n    path: /x\n    cost: 3\n",
    )
    .expect("write");
    let output = Command::new(BIN)
        .args(["--check", "--routes", path.to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains("line 4 (route 1)") && lines[0].contains("path"),
        "{stderr}"
    );
    assert!(
        lines[1].contains("line 6 (route 2)") && lines[1].contains("cost without quota"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sighup_reloads_good_files_and_refuses_bad_ones() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let dir = TempDir::new();
    let routes = dir.0.join("routes.yaml");
    std::fs::write(&routes, ROUTES).expect("write");
    let (port, admin) = (free_port(), free_port());
    let env = support::sidecar_env(
        &cp,
        &support::redis_url(),
        &upstream,
        &routes,
        &[
            (config::ENV_LISTEN, &format!("127.0.0.1:{port}")),
            (config::ENV_ADMIN_LISTEN, &format!("127.0.0.1:{admin}")),
            (config::ENV_LOG_FORMAT, "json"),
        ],
    );
    let mut child = Command::new(BIN)
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sidecar");
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "sidecar did not become ready");
    let health = || http.get(format!("http://127.0.0.1:{port}/health")).send();
    assert_eq!(health().await.expect("health").status(), 200);
    let traced = http
        .get(format!("http://127.0.0.1:{port}/health"))
        .header("x-request-id", "span-check-1")
        .send()
        .await
        .expect("health");
    assert_eq!(traced.status(), 200);

    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    // A broken file: refused, the old routes stay.
    std::fs::write(
        &routes,
        "app: idoctor\nroutes:\n  - method: GET\n    path: broken\n",
    )
    .expect("write");
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        health().await.expect("health").status(),
        200,
        "old routes kept"
    );

    // A good file with /health no longer public: taken without a restart.
    std::fs::write(
        &routes,
        ROUTES.replace("path: /health, public: true", "path: /health"),
    )
    .expect("write");
    hup(child.id());
    let mut reloaded = false;
    for _ in 0..40 {
        if health().await.expect("health").status() == 401 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "new routes not taken");

    // SIGTERM: drains and exits cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = child.wait().expect("wait");
        let mut stderr = String::new();
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut stderr);
        }
        (status, stderr)
    });
    let (status, stderr) = tokio::time::timeout(Duration::from_secs(10), exited)
        .await
        .expect("exits within 10 s")
        .expect("join");
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("routes file refused"), "{stderr}");
    assert!(stderr.contains("line 3 (route 1)"), "{stderr}");
    // The request's lines carry its id through the request's span (JSON logs name the span).
    let access = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "request" && line["request_id"] == "span-check-1")
        .unwrap_or_else(|| panic!("no access-log line for span-check-1: {stderr}"));
    assert_eq!(access["span"]["name"], "request", "{access}");
    assert_eq!(access["span"]["request_id"], "span-check-1", "{access}");
}
