//! The binary itself: bad configuration exits non-zero with one line per problem, naming it;
//! `admin create` reads the password from standard input.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-control-plane");

#[test]
fn bad_config_reports_every_problem_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("tg-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("cp.toml");
    std::fs::write(&file, "db_pool_size = \"many\"\nunknown_setting = 1\n").expect("write");
    let output = Command::new(BIN)
        .args(["--config", file.to_str().expect("utf-8"), "serve"])
        .env("TOLLGATE_LISTEN", "not-an-address")
        .env("TOLLGATE_BODY_LIMIT_BYTES", "huge")
        .env("DATABASE_URL", "postgres://u:hunter2@localhost:notaport/db")
        .output()
        .expect("run binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 5, "{stderr}");
    let file = file.display().to_string();
    for start in [
        format!("config: {file}: db_pool_size: "),
        format!("config: {file}: unknown_setting: "),
        "config: listen: ".to_owned(),
        "config: TOLLGATE_BODY_LIMIT_BYTES: ".to_owned(),
        "config: database_url: ".to_owned(),
    ] {
        assert_eq!(
            lines.iter().filter(|l| l.starts_with(&start)).count(),
            1,
            "{start}: {stderr}"
        );
    }
    assert!(!stderr.contains("hunter2"), "secret leaked: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_config_file_is_reported() {
    let output = Command::new(BIN)
        .args(["--config", "/nonexistent/tollgate.toml", "migrate"])
        .output()
        .expect("run binary");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/tollgate.toml"));
}

#[tokio::test]
async fn migrate_seed_and_admin_create_from_the_command_line() {
    let db = TestDb::new().await;
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(BIN)
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("TOLLGATE_LOG_FORMAT", "text")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    };
    for args in [["migrate"], ["migrate"], ["seed"], ["seed"]] {
        let out = run(&args, "");
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    let out = run(
        &["admin", "create", "--email", "Boss@Example.com"],
        "s3cret-passw0rd\n",
    );
    assert!(out.status.success(), "{out:?}");
    let out = run(
        &["admin", "create", "--email", "boss@example.com"],
        "s3cret-passw0rd\n",
    );
    assert!(
        !out.status.success(),
        "same email in another case must be refused"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = run(
        &["admin", "create", "--email", "short@example.com"],
        "short\n",
    );
    assert!(!out.status.success(), "short password must be refused");

    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT u.role, u.password_hash, s.plan_id FROM users u
             JOIN subscriptions s ON s.user_id = u.id AND s.status = 'active'
             WHERE lower(u.email) = 'boss@example.com'",
            &[],
        )
        .await
        .expect("admin row");
    assert_eq!(row.get::<_, String>(0), "admin");
    let hash: String = row.get(1);
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    assert!(!hash.contains("s3cret"));
    assert_eq!(row.get::<_, String>(2), "free");
    let users: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(users, 1);
}
