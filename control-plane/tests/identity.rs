//! Accounts, tokens, API keys and user administration against real PostgreSQL and Redis: every
//! row of docs/api.md's tables, and the attacks of issue 3.

mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fred::interfaces::HashesInterface;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{Api, Cred, TEST_KID, TestDb, config, config_with, serve, test_pem};
use tollgate_common::claims::AccessClaims;
use tollgate_common::keys::Keys;

const PW: &str = "correct horse battery";

async fn start() -> (
    TestDb,
    Api,
    tollgate_control_plane::config::Config,
    support::Server,
) {
    let db = TestDb::migrated().await;
    let config = config(&db);
    let server = serve(config.clone()).await;
    let api = Api::new(&server.base);
    (db, api, config, server)
}

fn assert_error(reply: &support::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["code"], code, "{:?}", reply.body);
    assert!(reply.body["error"]["message"].is_string());
}

#[tokio::test]
async fn register_login_me_and_input_errors() {
    let (_db, api, _config, _server) = start().await;

    let reply = api
        .post(
            "/v1/auth/register",
            Cred::None,
            json!({"email": "Ann@Example.com", "password": PW, "role": "admin"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let user = &reply.body["user"];
    assert_eq!(user["email"], "Ann@Example.com");
    assert_eq!(user["role"], "user", "a smuggled role is ignored");
    assert_eq!(user["status"], "active");
    assert_eq!(reply.body["token_type"], "Bearer");
    assert_eq!(reply.body["expires_in"], 900);
    let access = reply.body["access_token"]
        .as_str()
        .expect("token")
        .to_owned();

    let me = api.get("/v1/me", Cred::Bearer(&access)).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["email"], "Ann@Example.com");
    for field in ["id", "email", "role", "status", "created_at"] {
        assert!(!me.body[field].is_null(), "{field}");
    }
    assert!(me.body.get("password_hash").is_none());

    let dup = api
        .post(
            "/v1/auth/register",
            Cred::None,
            json!({"email": "ann@EXAMPLE.com", "password": PW}),
        )
        .await;
    assert_error(&dup, 409, "email_taken");

    let huge = "x".repeat(1_000_000);
    for body in [
        json!({"email": "not-an-email", "password": PW}),
        json!({"email": "b@example.com", "password": "short"}),
        json!({"email": "b@example.com", "password": "y".repeat(257)}),
        json!({"email": "b@example.com", "password": huge}),
        json!({"email": "b@example.com"}),
        json!({"email": 42, "password": PW}),
        json!({"email": "x'); DROP TABLE users; --@example.com", "password": PW}),
        json!([]),
    ] {
        let reply = api
            .post("/v1/auth/register", Cred::None, body.clone())
            .await;
        assert_error(&reply, 400, "invalid_request");
    }
    let malformed = api
        .http
        .post(format!("{}/v1/auth/register", api.base))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(malformed.status(), 400);
    let over_limit = api
        .http
        .post(format!("{}/v1/auth/register", api.base))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"email\":\"a@b.co\",\"password\":\"{}\"}}",
            "z".repeat(2 << 20)
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(over_limit.status(), 413);
    let body: Value = over_limit.json().await.expect("json");
    assert_eq!(body["error"]["code"], "payload_too_large");

    // Nothing above created a second user.
    let login = api
        .post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "ANN@example.com", "password": PW}),
        )
        .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
    assert!(login.body["refresh_token"].as_str().is_some());

    let wrong = api
        .post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "ann@example.com", "password": "wrong password"}),
        )
        .await;
    let unknown = api
        .post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "nobody@example.com", "password": "wrong password"}),
        )
        .await;
    assert_error(&wrong, 401, "invalid_credentials");
    assert_eq!(wrong.body, unknown.body, "unknown and wrong look the same");

    let anonymous = api.get("/v1/me", Cred::None).await;
    assert_error(&anonymous, 401, "unauthorized");
}

/// Logs in from the client address `from` (the control plane trusts X-Forwarded-For here).
async fn login_from(api: &Api, from: &str, email: &str, password: &str) -> support::Reply {
    let response = api
        .http
        .post(format!("{}/v1/auth/login", api.base))
        .header("x-forwarded-for", from)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    support::Reply {
        status,
        headers,
        body,
    }
}

fn retry_after(reply: &support::Reply) -> u64 {
    assert_error(reply, 429, "too_many_attempts");
    let seconds: u64 = reply.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert_eq!(reply.body["error"]["details"]["retry_after"], seconds);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("{seconds} s"))),
        "the wait is stated: {:?}",
        reply.body
    );
    seconds
}

#[tokio::test]
async fn login_throttling_slows_the_guesser_and_never_locks_out_another_client() {
    let db = TestDb::migrated().await;
    let server = serve(config_with(
        &db,
        &[
            ("TOLLGATE_LOGIN_MAX_FAILURES_ACCOUNT", "3"),
            ("TOLLGATE_LOGIN_MAX_FAILURES_CLIENT", "8"),
            ("TOLLGATE_LOGIN_BASE_DELAY", "1s"),
            ("TOLLGATE_LOGIN_MAX_DELAY", "4s"),
            ("TOLLGATE_TRUST_FORWARDED_FOR", "true"),
        ],
    ))
    .await;
    let api = Api::new(&server.base);
    api.register("victim@example.com", PW).await;
    api.register("bystander@example.com", PW).await;
    let (attacker, owner, neighbour) = ("203.0.113.66", "198.51.100.7", "2001:db8:5:6::1");

    // The attacker's three wrong guesses: 401 each; then that pair waits, even with the right
    // password (no oracle), for a short time that the answer states.
    for _ in 0..3 {
        let r = login_from(&api, attacker, "victim@example.com", "bad guess!").await;
        assert_error(&r, 401, "invalid_credentials");
    }
    let first = retry_after(&login_from(&api, attacker, "Victim@Example.com", PW).await);
    assert!((1..=1).contains(&first), "{first}");

    // The owner, from their own client, is not affected by the attack on their account.
    let r = login_from(&api, owner, "victim@example.com", PW).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Nor is another account from the attacker's client (its own budget is not spent).
    let r = login_from(&api, attacker, "bystander@example.com", PW).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Waits grow with every further failure, up to the cap.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = login_from(&api, attacker, "victim@example.com", "bad guess!").await;
    assert_error(&r, 401, "invalid_credentials");
    let second = retry_after(&login_from(&api, attacker, "victim@example.com", PW).await);
    assert_eq!(second, 2, "the wait doubled");

    // Spraying other accounts from the same client: past 8 failures the client waits for any
    // account — and every other client still logs in.
    for i in 0..4 {
        let r = login_from(
            &api,
            attacker,
            &format!("nobody{i}@example.com"),
            "bad guess!",
        )
        .await;
        assert_error(&r, 401, "invalid_credentials");
    }
    retry_after(&login_from(&api, attacker, "bystander@example.com", PW).await);
    for (client, email) in [
        (owner, "victim@example.com"),
        (owner, "bystander@example.com"),
        (neighbour, "bystander@example.com"),
    ] {
        let r = login_from(&api, client, email, PW).await;
        assert_eq!(r.status, 200, "{client} {email}: {:?}", r.body);
    }

    // Failures from one client never make another wait, whatever the pattern: 30 more from a
    // botnet of addresses against the victim, then the owner logs in at once.
    for i in 0..30 {
        let r = login_from(
            &api,
            &format!("192.0.2.{i}"),
            "victim@example.com",
            "bad guess!",
        )
        .await;
        assert!(matches!(r.status, 401 | 429), "{:?}", r.body);
    }
    let r = login_from(&api, owner, "victim@example.com", PW).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test]
async fn refresh_rotates_and_reuse_kills_the_family() {
    let (_db, api, _config, _server) = start().await;
    let (_, _, first) = api.register("rot@example.com", PW).await;

    let refresh = |token: String| {
        let api = &api;
        async move {
            api.post(
                "/v1/auth/refresh",
                Cred::None,
                json!({"refresh_token": token}),
            )
            .await
        }
    };
    let r1 = refresh(first.clone()).await;
    assert_eq!(r1.status, 200, "{:?}", r1.body);
    let second = r1.body["refresh_token"].as_str().expect("new").to_owned();
    assert_ne!(second, first);
    assert!(r1.body["access_token"].is_string());

    // Presenting the just-spent token again within the grace period is a lost-response retry.
    let retry = refresh(first.clone()).await;
    assert_eq!(retry.status, 200, "grace retry: {:?}", retry.body);
    let third = retry.body["refresh_token"]
        .as_str()
        .expect("new")
        .to_owned();
    // `second` was spent by the retry; the family lives on through `third`.
    let r3 = refresh(third).await;
    assert_eq!(r3.status, 200);
    let fourth = r3.body["refresh_token"].as_str().expect("new").to_owned();

    // `second` is spent and not the immediately previous token: reuse, the family dies.
    let reuse = refresh(second).await;
    assert_error(&reuse, 401, "invalid_token");
    let dead = refresh(fourth).await;
    assert_error(&dead, 401, "invalid_token");

    let junk = refresh("tgr_nonsense".to_owned()).await;
    assert_error(&junk, 401, "invalid_token");

    // Logout revokes the family of a new login.
    let login = api
        .post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "rot@example.com", "password": PW}),
        )
        .await;
    let token = login.body["refresh_token"].as_str().expect("rt").to_owned();
    let out = api
        .post(
            "/v1/auth/logout",
            Cred::None,
            json!({"refresh_token": token}),
        )
        .await;
    assert_eq!(out.status, 204);
    assert_error(&refresh(token).await, 401, "invalid_token");
}

fn sign(claims: &Value, alg: Algorithm, key: &EncodingKey, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

#[tokio::test]
async fn forged_and_invalid_tokens_are_refused() {
    let (_db, api, _config, _server) = start().await;
    let (id, access, _) = api.register("target@example.com", PW).await;
    assert_eq!(api.get("/v1/me", Cred::Bearer(&access)).await.status, 200);

    let now = chrono::Utc::now().timestamp();
    let claims = |over: Value| {
        let mut c = json!({
            "sub": id, "iss": "tollgate", "aud": "tollgate", "iat": now, "nbf": now,
            "exp": now + 600, "jti": "j", "role": "admin"
        });
        for (k, v) in over.as_object().expect("object") {
            c[k] = v.clone();
        }
        c
    };
    let real = EncodingKey::from_ed_pem(test_pem().as_bytes()).expect("test key");
    // The genuine key signs a valid token: the forgeries below fail for their flaw alone.
    let valid = sign(&claims(json!({})), Algorithm::EdDSA, &real, Some(TEST_KID));
    assert_eq!(api.get("/v1/me", Cred::Bearer(&valid)).await.status, 200);
    // A clock a few seconds ahead is within the leeway.
    let skewed = sign(
        &claims(json!({"iat": now + 10})),
        Algorithm::EdDSA,
        &real,
        Some(TEST_KID),
    );
    assert_eq!(api.get("/v1/me", Cred::Bearer(&skewed)).await.status, 200);

    let jwks = api.get("/.well-known/jwks.json", Cred::None).await;
    assert_eq!(jwks.status, 200);
    let jwk = &jwks.body["keys"][0];
    assert_eq!(jwk["kid"], TEST_KID);
    assert_eq!(jwk["kty"], "OKP");
    assert!(jwk.get("d").is_none(), "no private material in the JWKS");
    let public = URL_SAFE_NO_PAD
        .decode(jwk["x"].as_str().expect("x"))
        .expect("b64");

    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"));
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": TEST_KID})),
        b64(&claims(json!({})))
    );
    let hs256_with_public_key = sign(
        &claims(json!({})),
        Algorithm::HS256,
        &EncodingKey::from_secret(&public),
        Some(TEST_KID),
    );
    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            b64(&claims(json!({"sub": uuid::Uuid::new_v4().to_string()}))),
            parts[2]
        )
    };
    let other_key =
        EncodingKey::from_ed_pem(tollgate_control_plane::auth::signing::generate_pem().as_bytes())
            .expect("key");
    let cases = [
        ("alg none", alg_none),
        ("HS256 signed with the public key", hs256_with_public_key),
        ("tampered payload", tampered),
        (
            "expired",
            sign(
                &claims(json!({"exp": now - 120, "iat": now - 1000, "nbf": now - 1000})),
                Algorithm::EdDSA,
                &real,
                Some(TEST_KID),
            ),
        ),
        (
            "not yet valid",
            sign(
                &claims(json!({"nbf": now + 300})),
                Algorithm::EdDSA,
                &real,
                Some(TEST_KID),
            ),
        ),
        (
            "wrong issuer",
            sign(
                &claims(json!({"iss": "someone-else"})),
                Algorithm::EdDSA,
                &real,
                Some(TEST_KID),
            ),
        ),
        (
            "wrong audience",
            sign(
                &claims(json!({"aud": "another-api"})),
                Algorithm::EdDSA,
                &real,
                Some(TEST_KID),
            ),
        ),
        (
            "unknown kid",
            sign(
                &claims(json!({})),
                Algorithm::EdDSA,
                &real,
                Some("no-such-kid"),
            ),
        ),
        (
            "no kid",
            sign(&claims(json!({})), Algorithm::EdDSA, &real, None),
        ),
        (
            "signed by another key",
            sign(
                &claims(json!({})),
                Algorithm::EdDSA,
                &other_key,
                Some(TEST_KID),
            ),
        ),
        (
            "issued a year in the future",
            sign(
                &claims(json!({"iat": now + 365 * 86_400})),
                Algorithm::EdDSA,
                &real,
                Some(TEST_KID),
            ),
        ),
        (
            "issued beyond the leeway",
            sign(
                &claims(json!({"iat": now + 120})),
                Algorithm::EdDSA,
                &real,
                Some(TEST_KID),
            ),
        ),
        ("garbage", "a.b.c".to_owned()),
        ("oversized", "x".repeat(10_000)),
    ];
    for (name, token) in cases {
        let reply = api.get("/v1/me", Cred::Bearer(&token)).await;
        assert_eq!(reply.status, 401, "{name}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], "unauthorized", "{name}");
    }

    // Issued tokens verify with the JWKS alone (the sidecars' path).
    let key =
        jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk.clone()).expect("jwk"))
            .expect("decoding key");
    let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
    validation.set_audience(&["tollgate"]);
    validation.set_issuer(&["tollgate"]);
    let decoded =
        jsonwebtoken::decode::<AccessClaims>(&access, &key, &validation).expect("verifies");
    assert_eq!(decoded.claims.sub, id);
    assert_eq!(decoded.claims.role, "user");
    assert_eq!(decoded.header.kid.as_deref(), Some(TEST_KID));
}

#[tokio::test]
async fn api_keys_are_shown_once_work_and_are_revoked_everywhere() {
    let (_db, api, config, _server) = start().await;
    let (alice, alice_token, _) = api.register("alice@example.com", PW).await;
    let (_, bob_token, _) = api.register("bob@example.com", PW).await;

    let created = api
        .post(
            "/v1/api-keys",
            Cred::Bearer(&alice_token),
            json!({"name": "'); DROP TABLE api_keys; --"}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let key = created.body["key"].as_str().expect("key").to_owned();
    let key_id = created.body["id"].as_str().expect("id").to_owned();
    assert!(key.starts_with("tgk_"));
    assert_eq!(created.body["name"], "'); DROP TABLE api_keys; --");
    assert!(key.starts_with(created.body["prefix"].as_str().expect("prefix")));

    let listed = api.get("/v1/api-keys", Cred::Bearer(&alice_token)).await;
    assert_eq!(listed.status, 200);
    let items = listed.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    let text = listed.body.to_string();
    assert!(!text.contains(&key), "no key material in listings");
    assert!(items[0].get("key").is_none() && items[0].get("key_hash").is_none());
    for field in [
        "id",
        "name",
        "prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    ] {
        assert!(items[0].get(field).is_some(), "{field}");
    }

    let me = api.get("/v1/me", Cred::Key(&key)).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["id"], alice);

    // What the sidecars read is in Redis under the key schema.
    let redis = support::redis().await;
    let keys = Keys::new(config.redis_prefix.clone());
    let hex = tollgate_common::api_key::hex(&tollgate_common::api_key::hash(&key));
    let mut owner: Option<String> = None;
    for _ in 0..20 {
        owner = redis.hget(keys.api_key(&hex), "uid").await.expect("hget");
        if owner.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(owner.as_deref(), Some(alice.as_str()));

    // Bob can neither see nor delete Alice's key.
    let bobs = api.get("/v1/api-keys", Cred::Bearer(&bob_token)).await;
    assert_eq!(bobs.body["items"].as_array().map(Vec::len), Some(0));
    let steal = api
        .delete(&format!("/v1/api-keys/{key_id}"), Cred::Bearer(&bob_token))
        .await;
    assert_error(&steal, 404, "not_found");
    assert_eq!(api.get("/v1/me", Cred::Key(&key)).await.status, 200);

    for body in [
        json!({"name": ""}),
        json!({"name": "x".repeat(101)}),
        json!({"name": "old", "expires_at": "2001-01-01T00:00:00Z"}),
        json!({"name": "bad date", "expires_at": "tomorrow"}),
        json!({}),
    ] {
        let reply = api
            .post("/v1/api-keys", Cred::Bearer(&alice_token), body)
            .await;
        assert_error(&reply, 400, "invalid_request");
    }
    assert_error(
        &api.delete("/v1/api-keys/not-a-uuid", Cred::Bearer(&alice_token))
            .await,
        404,
        "not_found",
    );

    let deleted = api
        .delete(
            &format!("/v1/api-keys/{key_id}"),
            Cred::Bearer(&alice_token),
        )
        .await;
    assert_eq!(deleted.status, 204);
    assert_error(
        &api.get("/v1/me", Cred::Key(&key)).await,
        401,
        "unauthorized",
    );
    let gone: Option<String> = redis.hget(keys.api_key(&hex), "uid").await.expect("hget");
    assert_eq!(
        gone, None,
        "revoked key removed from redis before DELETE answered"
    );

    // Junk keys never reach a lookup, and answer like unknown ones.
    for junk in ["tgk_short", "nonsense", &key.replace("tgk_", "tgx_")] {
        assert_error(
            &api.get("/v1/me", Cred::Key(junk)).await,
            401,
            "unauthorized",
        );
    }
}

#[tokio::test]
async fn admins_list_disable_and_promote_users_with_an_audit_trail() {
    let (db, api, config, _server) = start().await;
    let (admin_id, _, _) = api.register("root@example.com", PW).await;
    let (user_id, user_token, user_refresh) = api.register("user@example.com", PW).await;
    for i in 0..3 {
        api.register(&format!("extra{i}@example.com"), PW).await;
    }
    let pg = db.client().await;
    pg.execute(
        "UPDATE users SET role = 'admin' WHERE id = $1::text::uuid",
        &[&admin_id],
    )
    .await
    .expect("promote");
    let admin_login = api
        .post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "root@example.com", "password": PW}),
        )
        .await;
    let admin_token = admin_login.body["access_token"]
        .as_str()
        .expect("t")
        .to_owned();
    let user_key = api
        .post(
            "/v1/api-keys",
            Cred::Bearer(&user_token),
            json!({"name": "k"}),
        )
        .await
        .body["key"]
        .as_str()
        .expect("key")
        .to_owned();

    // Ordinary users are forbidden.
    assert_error(
        &api.get("/v1/admin/users", Cred::Bearer(&user_token)).await,
        403,
        "forbidden",
    );
    assert_error(
        &api.patch(
            &format!("/v1/admin/users/{admin_id}"),
            Cred::Bearer(&user_token),
            json!({"status": "disabled"}),
        )
        .await,
        403,
        "forbidden",
    );

    // Paging with an opaque cursor visits every user once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/admin/users?limit=2&cursor={c}"),
            None => "/v1/admin/users?limit=2".to_owned(),
        };
        let page = api.get(&path, Cred::Bearer(&admin_token)).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        for item in page.body["items"].as_array().expect("items") {
            seen.push(item["email"].as_str().expect("email").to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    let search = api
        .get("/v1/admin/users?email=EXTRA", Cred::Bearer(&admin_token))
        .await;
    assert_eq!(search.body["items"].as_array().map(Vec::len), Some(3));
    let injection = api
        .get(
            "/v1/admin/users?email=%25'%20OR%201=1%20--",
            Cred::Bearer(&admin_token),
        )
        .await;
    assert_eq!(injection.status, 200);
    assert_eq!(injection.body["items"].as_array().map(Vec::len), Some(0));
    for bad in [
        "/v1/admin/users?limit=0",
        "/v1/admin/users?limit=x",
        "/v1/admin/users?cursor=zz",
    ] {
        assert_error(
            &api.get(bad, Cred::Bearer(&admin_token)).await,
            400,
            "invalid_request",
        );
    }

    // Disable: tokens, keys and refresh stop working; Redis says so for the sidecars.
    let disabled = api
        .patch(
            &format!("/v1/admin/users/{user_id}"),
            Cred::Bearer(&admin_token),
            json!({"status": "disabled", "email": "hijack@example.com"}),
        )
        .await;
    assert_eq!(disabled.status, 200, "{:?}", disabled.body);
    assert_eq!(disabled.body["status"], "disabled");
    assert_eq!(
        disabled.body["email"], "user@example.com",
        "only allow-listed fields change"
    );
    assert_error(
        &api.get("/v1/me", Cred::Bearer(&user_token)).await,
        401,
        "unauthorized",
    );
    assert_error(
        &api.get("/v1/me", Cred::Key(&user_key)).await,
        401,
        "unauthorized",
    );
    assert_error(
        &api.post(
            "/v1/auth/refresh",
            Cred::None,
            json!({"refresh_token": user_refresh}),
        )
        .await,
        401,
        "invalid_token",
    );
    assert_error(
        &api.post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "user@example.com", "password": PW}),
        )
        .await,
        401,
        "invalid_credentials",
    );
    let redis = support::redis().await;
    let keys = Keys::new(config.redis_prefix.clone());
    let uid: uuid::Uuid = user_id.parse().expect("uuid");
    let status: Option<String> = redis.hget(keys.user(uid), "status").await.expect("hget");
    assert_eq!(status.as_deref(), Some("disabled"));
    let tva: Option<i64> = redis.hget(keys.user(uid), "tva").await.expect("hget");
    assert!(tva.is_some_and(|t| t > 0));

    // Re-enable: a new login works; the old token stays dead.
    let enabled = api
        .patch(
            &format!("/v1/admin/users/{user_id}"),
            Cred::Bearer(&admin_token),
            json!({"status": "active", "role": "admin"}),
        )
        .await;
    assert_eq!(enabled.status, 200);
    assert_eq!(enabled.body["role"], "admin");
    assert_error(
        &api.get("/v1/me", Cred::Bearer(&user_token)).await,
        401,
        "unauthorized",
    );

    for (body, code) in [
        (json!({"status": "banned"}), 400),
        (json!({"role": "root"}), 400),
        (json!({}), 400),
    ] {
        let reply = api
            .patch(
                &format!("/v1/admin/users/{user_id}"),
                Cred::Bearer(&admin_token),
                body,
            )
            .await;
        assert_eq!(reply.status, code);
    }
    let self_disable = api
        .patch(
            &format!("/v1/admin/users/{admin_id}"),
            Cred::Bearer(&admin_token),
            json!({"status": "disabled"}),
        )
        .await;
    assert_error(&self_disable, 400, "invalid_request");
    let missing = api
        .patch(
            &format!("/v1/admin/users/{}", uuid::Uuid::new_v4()),
            Cred::Bearer(&admin_token),
            json!({"status": "disabled"}),
        )
        .await;
    assert_error(&missing, 404, "not_found");

    let audit: Vec<(String, Value)> = pg
        .query(
            "SELECT actor_id::text, details FROM audit_log WHERE target_id = $1 ORDER BY id",
            &[&user_id],
        )
        .await
        .expect("audit")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0].0, admin_id);
    assert_eq!(audit[0].1["after"]["status"], "disabled");
    assert_eq!(audit[1].1["after"]["role"], "admin");
}

#[tokio::test]
async fn reconcile_rebuilds_what_the_sidecars_read() {
    let (db, api, config, _server) = start().await;
    let (user_id, token, _) = api.register("rebuild@example.com", PW).await;
    let key = api
        .post("/v1/api-keys", Cred::Bearer(&token), json!({"name": "k"}))
        .await
        .body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let redis = support::redis().await;
    let keys = Keys::new(config.redis_prefix.clone());
    let uid: uuid::Uuid = user_id.parse().expect("uuid");
    let hex = tollgate_common::api_key::hex(&tollgate_common::api_key::hash(&key));
    // Lose what the sidecars read, and plant a stale key record.
    use fred::interfaces::KeysInterface;
    let _: () = redis
        .del(vec![keys.user(uid), keys.api_key(&hex)])
        .await
        .expect("del");
    let stale = keys.api_key(&"0".repeat(64));
    let _: () = redis.hset(&stale, ("uid", "nobody")).await.expect("plant");

    let pool = tollgate_control_plane::db::pool(&db.url, 2, None).expect("pool");
    let redis_client = tollgate_control_plane::redis::client(&support::redis_url()).expect("cfg");
    use fred::interfaces::ClientLike;
    redis_client.init().await.expect("connect");
    let syncer = tollgate_control_plane::sync::Syncer::new(pool, redis_client, keys.clone());
    syncer.reconcile().await.expect("reconcile");

    let status: Option<String> = redis.hget(keys.user(uid), "status").await.expect("hget");
    assert_eq!(status.as_deref(), Some("active"));
    let owner: Option<String> = redis.hget(keys.api_key(&hex), "uid").await.expect("hget");
    assert_eq!(owner.as_deref(), Some(user_id.as_str()));
    let planted: Option<String> = redis.hget(&stale, "uid").await.expect("hget");
    assert_eq!(planted, None, "stale key record removed");
}
