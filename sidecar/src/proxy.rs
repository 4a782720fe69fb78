//! The request path, as fixed phases run in order (pingora's model, as plain async functions):
//!
//! early (request id, route, strip spoofable headers) → authenticate → decide (rate limits and
//! quotas, one Redis call) → forward → settle (refund or commit) → respond (headers) → log.
//!
//! One per-request [`Ctx`] carries what the phases learn; [`fail_to_proxy`] is the one place that
//! turns a refusal into a status and body; the log phase always runs.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use tollgate_common::error::ErrorBody;
use tollgate_common::request_id;
use uuid::Uuid;

use crate::auth::{AuthError, Identity};
use crate::config::FailMode;
use crate::routes::{Cost, RateLimit, Route};
use crate::store::{Charge, Charged, DecideInput, Decision, SettleInput, SettleItem};
use crate::{Body, BoxError, RequestBody, Shared, Table, full_body};

/// Headers a client may not set: the sidecar is the only source of these.
const IDENTITY_HEADERS: [&str; 4] = ["x-user-id", "x-auth-method", "x-plan", "x-request-id"];

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Why a request was not (fully) served.
#[derive(Debug)]
pub enum Refusal {
    /// The request path is not in normal form (see `routes::is_normal_path`).
    BadPath,
    Unauthorized,
    AccountDisabled,
    RateLimited {
        retry_after_s: u64,
    },
    QuotaExceeded {
        quota_type: String,
        limit: i64,
        used: i64,
        resets_at_ms: i64,
    },
    BackendUnavailable,
    BadGateway,
    UpstreamTimeout,
}

impl Refusal {
    fn decision(&self) -> &'static str {
        match self {
            Refusal::BadPath => "invalid_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::AccountDisabled => "forbidden",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::QuotaExceeded { .. } => "quota_exceeded",
            Refusal::BackendUnavailable => "backend_unavailable",
            Refusal::BadGateway => "bad_gateway",
            Refusal::UpstreamTimeout => "upstream_timeout",
        }
    }
}

/// What the phases learn about one request.
pub struct Ctx {
    pub request_id: String,
    pub route: Route,
    pub app: Arc<str>,
    pub identity: Option<Identity>,
    pub plan: String,
    pub charges: Vec<(Uuid, Charged)>,
    /// Rate-limit state after this request: (limit, remaining, reset ms).
    pub rates: Vec<(RateLimit, i64, i64)>,
    /// The body is metered as it streams (no Content-Length on a byte-priced route).
    pub reserved: bool,
    pub decision: &'static str,
    pub status: u16,
    pub method: String,
    pub path: String,
}

/// Runs one request to the end on a task of its own: if the client goes away mid-request, hyper
/// drops this future, but the decision is still settled and logged.
pub async fn handle(
    shared: Arc<Shared>,
    request: Request<RequestBody>,
    peer: SocketAddr,
) -> Response<Body> {
    // Tracked, so that shutdown waits for it (lib.rs, `drain`).
    let task = shared.tasks.spawn(serve(shared.clone(), request, peer));
    match task.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            let mut response = Response::new(full_body(
                ErrorBody::new("internal", "internal error").to_json(),
            ));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

async fn serve(
    shared: Arc<Shared>,
    mut request: Request<RequestBody>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    shared.metrics.in_flight.inc();
    let table = shared.table.load_full();
    let mut ctx = early(&table, &mut request);
    let response = match pipeline(&shared, &table, &mut ctx, request, peer).await {
        Ok(response) => response,
        Err(refusal) => {
            ctx.decision = refusal.decision();
            fail_to_proxy(&ctx, &refusal)
        }
    };
    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&ctx.request_id) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    ctx.status = response.status().as_u16();
    log(&shared, &ctx, started);
    shared.metrics.in_flight.dec();
    response
}

/// Phase 1: request id, route, and no identity header from the client survives.
fn early(table: &Table, request: &mut Request<RequestBody>) -> Ctx {
    let request_id = request_id::choose(
        request
            .headers()
            .get(request_id::HEADER)
            .map(HeaderValue::as_bytes),
    );
    for name in IDENTITY_HEADERS {
        request.headers_mut().remove(name);
    }
    let route = table
        .routes
        .find(request.method(), request.uri().path())
        .clone();
    Ctx {
        request_id,
        route,
        app: table.routes.app.clone(),
        identity: None,
        plan: String::new(),
        charges: Vec::new(),
        rates: Vec::new(),
        reserved: false,
        decision: "allowed",
        status: 0,
        method: request.method().as_str().to_owned(),
        path: request.uri().path().to_owned(),
    }
}

async fn pipeline(
    shared: &Shared,
    table: &Table,
    ctx: &mut Ctx,
    mut request: Request<RequestBody>,
    peer: SocketAddr,
) -> Result<Response<Body>, Refusal> {
    if !crate::routes::is_normal_path(&ctx.path) {
        return Err(Refusal::BadPath);
    }
    let decided = Instant::now();
    if !ctx.route.public {
        authenticate(shared, ctx, &mut request).await?;
        decide(shared, table, ctx, &request).await?;
    } else {
        request.headers_mut().remove("x-api-key");
        ctx.decision = "public";
    }
    shared
        .metrics
        .decision_seconds
        .with_label_values(&[&ctx.route.label])
        .observe(decided.elapsed().as_secs_f64());
    let forwarded = forward(shared, table, ctx, request, peer).await;
    let response = settle(shared, ctx, forwarded).await?;
    Ok(respond(ctx, response))
}

/// Phase 2: who is calling.
async fn authenticate(
    shared: &Shared,
    ctx: &mut Ctx,
    request: &mut Request<RequestBody>,
) -> Result<(), Refusal> {
    let key = request.headers_mut().remove("x-api-key");
    let result = if let Some(key) = key {
        match key.to_str() {
            Ok(key) => shared.auth.verify_api_key(key).await,
            Err(_) => return Err(Refusal::Unauthorized),
        }
    } else {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_owned());
        match token {
            Some(token) => shared.auth.verify_jwt(&token).await,
            None => return Err(Refusal::Unauthorized),
        }
    };
    match result {
        Ok(identity) => {
            ctx.identity = Some(identity);
            Ok(())
        }
        Err(AuthError::Refused(why)) => {
            tracing::debug!(request_id = %ctx.request_id, why, "credentials refused");
            Err(Refusal::Unauthorized)
        }
        Err(AuthError::Backend(e)) => {
            shared.metrics.redis_errors.with_label_values(&[e.op]).inc();
            tracing::warn!(request_id = %ctx.request_id, error = %e, "cannot check the api key");
            // An API key cannot be checked without Redis, fail-open or not.
            Err(Refusal::BackendUnavailable)
        }
    }
}

/// Phase 3: the user's status, rate limits and quotas, all-or-nothing, in one Redis call.
async fn decide(
    shared: &Shared,
    table: &Table,
    ctx: &mut Ctx,
    request: &Request<RequestBody>,
) -> Result<(), Refusal> {
    let Some(identity) = ctx.identity else {
        return Err(Refusal::Unauthorized);
    };
    let mut charges = Vec::new();
    if let Some((quota_type, cost)) = &ctx.route.quota {
        let (cost, reserve) = match cost {
            Cost::Fixed(n) => (*n, false),
            Cost::RequestBodyBytes => match content_length(request.headers()) {
                Some(n) => (n, false),
                None => (0, true),
            },
        };
        ctx.reserved = reserve;
        charges.push(Charge {
            quota_type,
            cost,
            event_id: Uuid::new_v4(),
            reserve,
        });
    }
    let settle_id = charges
        .first()
        .map(|c| c.event_id.to_string())
        .unwrap_or_default();
    let input = DecideInput {
        user: identity.user,
        request: &settle_id,
        iat: identity.iat,
        app: &ctx.app,
        method: &ctx.method,
        path: &ctx.path,
        charges: &charges,
        rates: &ctx.route.rate_limits,
        now: chrono::Utc::now(),
        time_zone: table.routes.time_zone,
    };
    let mut outcome = shared.store.decide(&input).await;
    if matches!(outcome, Ok(Decision::Missing)) && shared.refill.ensure(identity.user).await {
        outcome = shared.store.decide(&input).await;
    }
    let decision = match outcome {
        Ok(decision) => decision,
        Err(e) => {
            shared.metrics.redis_errors.with_label_values(&[e.op]).inc();
            if !charges.is_empty() && e.is_transient() {
                // The script may have run although its answer never came: give back whatever it
                // took (settle.lua does nothing if it did not run).
                undo_unanswered(
                    shared,
                    identity.user,
                    &ctx.app,
                    &ctx.method,
                    &ctx.path,
                    &settle_id,
                    &charges,
                );
            }
            if shared.config.fail_mode == FailMode::Open && e.is_transient() {
                shared
                    .metrics
                    .fail_open
                    .with_label_values(&[&ctx.route.label])
                    .inc();
                tracing::warn!(request_id = %ctx.request_id, error = %e, "redis unavailable: forwarding uncounted (fail-open)");
                ctx.decision = "fail_open";
                ctx.reserved = false;
                return Ok(());
            }
            tracing::error!(request_id = %ctx.request_id, error = %e, "redis unavailable: refusing (fail-closed)");
            return Err(Refusal::BackendUnavailable);
        }
    };
    match decision {
        Decision::Missing => {
            tracing::warn!(request_id = %ctx.request_id, user = %identity.user, "no limits in redis for this user and the control plane did not write them");
            Err(Refusal::BackendUnavailable)
        }
        Decision::Disabled => Err(Refusal::AccountDisabled),
        Decision::Revoked => Err(Refusal::Unauthorized),
        Decision::RateLimited { retry_after_ms, .. } => Err(Refusal::RateLimited {
            retry_after_s: (retry_after_ms.max(1) as u64).div_ceil(1000),
        }),
        Decision::QuotaExceeded {
            quota_type,
            limit,
            used,
            resets_at_ms,
        } => Err(Refusal::QuotaExceeded {
            quota_type,
            limit,
            used,
            resets_at_ms,
        }),
        Decision::Admitted {
            plan,
            charged,
            rates,
        } => {
            ctx.plan = plan;
            ctx.charges = charges.iter().map(|c| c.event_id).zip(charged).collect();
            ctx.rates = ctx
                .route
                .rate_limits
                .iter()
                .cloned()
                .zip(rates)
                .map(|(limit, (remaining, reset))| (limit, remaining, reset))
                .collect();
            Ok(())
        }
    }
}

/// Refunds, in the background, a decision whose answer was lost: settle.lua gives back what the
/// decision's marker says it took, and nothing if it never ran.
fn undo_unanswered(
    shared: &Shared,
    user: Uuid,
    app: &str,
    method: &str,
    path: &str,
    settle_id: &str,
    charges: &[Charge<'_>],
) {
    let store = shared.store.clone();
    let now = chrono::Utc::now();
    let owned: Vec<(String, Uuid)> = charges
        .iter()
        .map(|c| (c.quota_type.to_owned(), c.event_id))
        .collect();
    let (app, method, path, settle_id) = (
        app.to_owned(),
        method.to_owned(),
        path.to_owned(),
        settle_id.to_owned(),
    );
    tokio::spawn(async move {
        let items: Vec<SettleItem<'_>> = owned
            .iter()
            .map(|(quota_type, event_id)| SettleItem {
                quota_type,
                event_id: *event_id,
                actual: 0,
            })
            .collect();
        let input = SettleInput {
            refund: true,
            user,
            request_id: &settle_id,
            app: &app,
            method: &method,
            path: &path,
            now,
            items: &items,
        };
        for _ in 0..3 {
            match store.settle(&input).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not undo an unanswered decision yet");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    });
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// What came back from the app, and how much of a metered body went up.
struct Forwarded {
    result: Result<Response<Incoming>, Refusal>,
    meter: Option<Arc<BodyMeter>>,
}

/// Phase 4: to the app, with the identity headers set, bodies streaming both ways.
async fn forward(
    shared: &Shared,
    table: &Table,
    ctx: &Ctx,
    request: Request<RequestBody>,
    peer: SocketAddr,
) -> Forwarded {
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri = match format!("{}{path_and_query}", table.upstream).parse() {
        Ok(uri) => uri,
        Err(_) => {
            return Forwarded {
                result: Err(Refusal::BadGateway),
                meter: None,
            };
        }
    };
    parts.uri = uri;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if let Some(identity) = ctx.identity.filter(|_| ctx.decision != "public") {
        insert(headers, "x-user-id", &identity.user.to_string());
        insert(headers, "x-auth-method", identity.method.as_str());
        if !ctx.plan.is_empty() {
            insert(headers, "x-plan", &ctx.plan);
        }
    }
    insert(headers, "x-request-id", &ctx.request_id);
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    insert(headers, "x-forwarded-for", &forwarded_for);
    insert(headers, "x-forwarded-proto", "http");

    let (body, meter) = if ctx.reserved {
        let limit = ctx
            .charges
            .first()
            .map_or(0, |(_, c)| c.taken.max(0) as u64);
        let meter = Arc::new(BodyMeter::new(limit));
        (
            MeteredBody {
                inner: body,
                meter: meter.clone(),
            }
            .boxed_unsync(),
            Some(meter),
        )
    } else {
        (body.boxed_unsync(), None)
    };
    let request = Request::from_parts(parts, body);
    let started = Instant::now();
    let sent = tokio::time::timeout(
        shared.config.upstream_timeout.duration(),
        shared.upstream.request(request),
    )
    .await;
    shared
        .metrics
        .upstream_seconds
        .with_label_values(&[&ctx.route.label])
        .observe(started.elapsed().as_secs_f64());
    let result = match sent {
        Err(_) => Err(Refusal::UpstreamTimeout),
        Ok(Err(e)) => {
            tracing::warn!(request_id = %ctx.request_id, error = %e, "app unreachable");
            Err(Refusal::BadGateway)
        }
        Ok(Ok(response)) => Ok(response),
    };
    Forwarded { result, meter }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // hyper frames bodies itself; a Transfer-Encoding from the client must not pass through.
    headers.remove(header::TRANSFER_ENCODING);
}

/// Phase 5: only successful calls are paid for. A failed or unreachable app gets the cost back;
/// a metered upload of unknown length is committed at its real size.
async fn settle(
    shared: &Shared,
    ctx: &mut Ctx,
    forwarded: Forwarded,
) -> Result<Response<Incoming>, Refusal> {
    let exceeded = forwarded.meter.as_ref().is_some_and(|m| m.exceeded());
    let failed = match &forwarded.result {
        Ok(response) => response.status().is_client_error() || response.status().is_server_error(),
        Err(_) => true,
    };
    if let Some(identity) = ctx.identity.filter(|_| !ctx.charges.is_empty()) {
        let refund = failed || exceeded;
        let actual = forwarded.meter.as_ref().map_or(0, |m| m.seen());
        if refund || ctx.reserved {
            let items: Vec<SettleItem<'_>> = ctx
                .charges
                .iter()
                .map(|(event_id, _)| SettleItem {
                    quota_type: ctx.route.quota.as_ref().map_or("", |(q, _)| q),
                    event_id: *event_id,
                    actual,
                })
                .collect();
            // Settling is keyed by an id the sidecar made, never by one a client chose.
            let settle_id = ctx
                .charges
                .first()
                .map(|(id, _)| id.to_string())
                .unwrap_or_default();
            let input = SettleInput {
                refund,
                user: identity.user,
                request_id: &settle_id,
                app: &ctx.app,
                method: &ctx.method,
                path: &ctx.path,
                now: chrono::Utc::now(),
                items: &items,
            };
            match shared.store.settle(&input).await {
                Ok(_) if refund => {
                    let reason = if exceeded {
                        "body_over_quota"
                    } else if forwarded.result.is_err() {
                        "unreachable"
                    } else {
                        "app_error"
                    };
                    shared.metrics.refunds.with_label_values(&[reason]).inc();
                }
                Ok(_) => {
                    // Committed at the real size: what remains moves by what was given back.
                    for (_, charged) in &mut ctx.charges {
                        charged.remaining += charged.taken - actual as i64;
                        charged.taken = actual as i64;
                    }
                }
                Err(e) => {
                    shared.metrics.redis_errors.with_label_values(&[e.op]).inc();
                    tracing::error!(request_id = %ctx.request_id, error = %e, refund, "could not settle; the charge stands");
                }
            }
        }
    }
    if exceeded {
        let charged = ctx
            .charges
            .first()
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        return Err(Refusal::QuotaExceeded {
            quota_type: ctx
                .route
                .quota
                .as_ref()
                .map_or(String::new(), |(q, _)| q.to_string()),
            limit: charged.limit,
            used: charged.limit - charged.remaining - charged.taken,
            resets_at_ms: charged.resets_at_ms,
        });
    }
    forwarded.result
}

/// Phase 6: quota and rate-limit headers on the way out.
fn respond(ctx: &Ctx, response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let success = parts.status.is_success() || parts.status.is_redirection();
    if success
        && let (Some((quota_type, _)), Some((_, charged))) = (&ctx.route.quota, ctx.charges.first())
    {
        let h = &mut parts.headers;
        insert(h, "x-quota-type", quota_type);
        insert(h, "x-quota-limit", &charged.limit.to_string());
        insert(
            h,
            "x-quota-remaining",
            &charged.remaining.max(0).to_string(),
        );
        if let Some(reset) = rfc3339_ms(charged.resets_at_ms) {
            insert(h, "x-quota-reset", &reset);
        }
    }
    rate_limit_headers(&mut parts.headers, &ctx.rates);
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

fn rfc3339_ms(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| chrono::DateTime::from_timestamp_millis(ms))
        .flatten()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// `RateLimit-Policy: "per-second";q=100;w=1` and `RateLimit: "per-second";r=97;t=1`
/// (draft-ietf-httpapi-ratelimit-headers-10).
fn rate_limit_headers(headers: &mut HeaderMap, rates: &[(RateLimit, i64, i64)]) {
    if rates.is_empty() {
        return;
    }
    let policy: Vec<String> = rates
        .iter()
        .map(|(l, _, _)| {
            format!(
                "\"{}\";q={};w={}",
                l.name,
                l.rate,
                l.period_ms.div_ceil(1000).max(1)
            )
        })
        .collect();
    let state: Vec<String> = rates
        .iter()
        .map(|(l, remaining, reset_ms)| {
            format!(
                "\"{}\";r={};t={}",
                l.name,
                remaining.max(&0),
                (reset_ms.max(&0) / 1000).max(0) + i64::from(reset_ms % 1000 != 0)
            )
        })
        .collect();
    insert(headers, "ratelimit-policy", &policy.join(", "));
    insert(headers, "ratelimit", &state.join(", "));
}

/// The one mapping from a refusal to its answer.
pub fn fail_to_proxy(ctx: &Ctx, refusal: &Refusal) -> Response<Body> {
    let (status, body) = match refusal {
        Refusal::BadPath => (
            StatusCode::BAD_REQUEST,
            ErrorBody::new(
                "invalid_request",
                "the path has empty, '.' or '..' segments or percent-encodes a plain character; send it in its normal form",
            ),
        ),
        Refusal::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            ErrorBody::new("unauthorized", "missing or invalid credentials"),
        ),
        Refusal::AccountDisabled => (
            StatusCode::FORBIDDEN,
            ErrorBody::new("account_disabled", "this account is disabled"),
        ),
        Refusal::RateLimited { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            ErrorBody::new("rate_limited", "too many requests; slow down"),
        ),
        Refusal::QuotaExceeded {
            quota_type,
            limit,
            used,
            resets_at_ms,
        } => (
            StatusCode::PAYMENT_REQUIRED,
            ErrorBody::new(
                "quota_exceeded",
                format!("the {quota_type} quota does not cover this request"),
            )
            .with_details(json!({
                "app": &*ctx.app,
                "type": quota_type,
                "limit": limit,
                "used": used,
                "remaining": (limit - used).max(0),
                "resets_at": rfc3339_ms(*resets_at_ms),
            })),
        ),
        Refusal::BackendUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                "quota_backend_unavailable",
                "quota and rate limits cannot be checked right now; try again shortly",
            ),
        ),
        Refusal::BadGateway => (
            StatusCode::BAD_GATEWAY,
            ErrorBody::new("bad_gateway", "the app could not be reached"),
        ),
        Refusal::UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            ErrorBody::new("upstream_timeout", "the app did not answer in time"),
        ),
    };
    let mut response = Response::new(full_body(body.to_json()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    match refusal {
        Refusal::Unauthorized => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        Refusal::RateLimited { retry_after_s } => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        _ => {}
    }
    response
}

/// Phase 7, always: metrics and one log line.
fn log(shared: &Shared, ctx: &Ctx, started: Instant) {
    shared
        .metrics
        .requests
        .with_label_values(&[&ctx.route.label, ctx.decision])
        .inc();
    tracing::info!(
        request_id = %ctx.request_id,
        route = %ctx.route.label,
        user = ctx.identity.map(|i| i.user.to_string()).unwrap_or_default(),
        decision = ctx.decision,
        status = ctx.status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
}

/// Counts the bytes of a metered upload and stops it once it passes what remains.
pub struct BodyMeter {
    limit: u64,
    seen: AtomicU64,
    exceeded: AtomicBool,
}

impl BodyMeter {
    fn new(limit: u64) -> BodyMeter {
        BodyMeter {
            limit,
            seen: AtomicU64::new(0),
            exceeded: AtomicBool::new(false),
        }
    }

    fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }
}

struct MeteredBody {
    inner: RequestBody,
    meter: Arc<BodyMeter>,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let seen = self
                        .meter
                        .seen
                        .fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if seen > self.meter.limit {
                        self.meter.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(
                            "upload passed the remaining byte quota".into()
                        )));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// How long a request may wait for the control plane to write a missing user's limits.
pub const REFILL_TIMEOUT: Duration = Duration::from_secs(2);
