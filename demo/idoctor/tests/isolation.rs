//! The demo app keeps users apart by X-User-Id and fails on patient `fail`.

use serde_json::Value;

async fn start() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(tollgate_demo_idoctor::run(listener, std::future::pending()));
    format!("http://{addr}")
}

#[tokio::test]
async fn users_see_only_their_own_data() {
    let base = start().await;
    let http = reqwest::Client::new();

    let processed: Value = http
        .post(format!("{base}/process/p1/2026-11-25"))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(processed["kind"], "full_process");
    assert_eq!(processed["patient"], "p1");

    let upload = http
        .post(format!("{base}/upload"))
        .header("x-user-id", "alice")
        .body(vec![7u8; 1000])
        .send()
        .await
        .expect("send");
    assert_eq!(upload.status(), 201);
    let upload: Value = upload.json().await.expect("json");
    assert_eq!(upload["size"], 1000);
    let id = upload["id"].as_str().expect("id");

    // Alice reads her own upload and results.
    let mine = http
        .get(format!("{base}/uploads/{id}"))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("send");
    assert_eq!(mine.status(), 200);
    assert_eq!(mine.bytes().await.expect("body").len(), 1000);
    let results: Value = http
        .get(format!("{base}/results/p1"))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(results["items"].as_array().map(Vec::len), Some(1));

    // Bob sees neither.
    let theirs = http
        .get(format!("{base}/uploads/{id}"))
        .header("x-user-id", "bob")
        .send()
        .await
        .expect("send");
    assert_eq!(theirs.status(), 404);
    let results: Value = http
        .get(format!("{base}/results/p1"))
        .header("x-user-id", "bob")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(results["items"].as_array().map(Vec::len), Some(0));

    // No identity, no data.
    let anonymous = http
        .get(format!("{base}/results/p1"))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn patient_fail_answers_500_and_records_nothing() {
    let base = start().await;
    let http = reqwest::Client::new();
    for path in ["/process/fail/2026-01-01", "/l3/fail", "/muscle/fail"] {
        let response = http
            .post(format!("{base}{path}"))
            .header("x-user-id", "carol")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 500, "{path}");
    }
    let results: Value = http
        .get(format!("{base}/results/fail"))
        .header("x-user-id", "carol")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(results["items"].as_array().map(Vec::len), Some(0));
    let health = http
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("send");
    assert_eq!(health.status(), 200);
}
