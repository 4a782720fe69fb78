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
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tollgate_common::error::ErrorBody;
use tollgate_common::quota::{self, QuotaStatus};
use tollgate_common::request_id;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{AuthError, Identity};
use crate::config::FailMode;
use crate::refunds::PendingSettle;
use crate::refusals::{Cached, QuotaRefusal};
use crate::routes::{Cost, Quota, RateLimit, Route};
use crate::store::{Charge, Charged, DecideInput, Decision, SettleInput};
use crate::{Body, BoxError, Refilled, RequestBody, Shared, Table, full_body};

/// The headers the sidecar writes, made once (a name given as a string is parsed every time).
const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
const X_AUTH_METHOD: HeaderName = HeaderName::from_static("x-auth-method");
const X_PLAN: HeaderName = HeaderName::from_static("x-plan");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_QUOTA_TYPE: HeaderName = HeaderName::from_static("x-quota-type");
const X_QUOTA_LIMIT: HeaderName = HeaderName::from_static("x-quota-limit");
const X_QUOTA_REMAINING: HeaderName = HeaderName::from_static("x-quota-remaining");
const X_QUOTA_RESET: HeaderName = HeaderName::from_static("x-quota-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Headers a client may not set: the sidecar is the only source of these.
const IDENTITY_HEADERS: [HeaderName; 4] = [X_USER_ID, X_AUTH_METHOD, X_PLAN, X_REQUEST_ID];

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
        quota_type: Arc<str>,
        limit: i64,
        used: i64,
        resets_at_ms: i64,
    },
    BackendUnavailable,
    BadGateway,
    UpstreamTimeout,
}

impl Refusal {
    /// The error code of its answer, which is also its `decision` label in the metrics and the
    /// access log: one table, so a dashboard and a client name a refusal alike.
    fn code(&self) -> &'static str {
        match self {
            Refusal::BadPath => "invalid_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::AccountDisabled => "account_disabled",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::QuotaExceeded { .. } => "quota_exceeded",
            Refusal::BackendUnavailable => "quota_backend_unavailable",
            Refusal::BadGateway => "bad_gateway",
            Refusal::UpstreamTimeout => "upstream_timeout",
        }
    }
}

/// How a request ended, as far as the sidecar decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted and counted.
    Allowed,
    /// A public route: forwarded without an identity.
    Public,
    /// Redis unavailable with `fail_mode = open`: forwarded uncounted.
    FailOpen,
    /// Answered by the sidecar itself, with this error code (`Refusal::code`).
    Refused(&'static str),
}

impl Outcome {
    /// The `decision` label of the metrics and the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Public => "public",
            Outcome::FailOpen => "fail_open",
            Outcome::Refused(code) => code,
        }
    }
}

/// What the phases learn about one request.
pub struct Ctx {
    /// The request's `X-Request-Id` (the client's if sane, else a new one): for the logs, the app
    /// and the answer. Never used to name anything in Redis, since a client chooses it.
    pub request_id: String,
    pub route: Route,
    pub app: Arc<str>,
    pub identity: Option<Identity>,
    pub plan: String,
    /// The sidecar's own id of a metered request (`new_settle_id`, once per decision), naming its
    /// settle marker in Redis; empty for a request without one.
    pub settle_id: String,
    /// The `now` (ms) its decision was made with.
    pub decided_ms: i64,
    /// What a metered request was charged.
    pub charged: Option<Charged>,
    /// Rate-limit state after this request: (limit, remaining, reset ms).
    pub rates: Vec<(RateLimit, i64, i64)>,
    /// The body is metered as it streams (no Content-Length on a byte-priced route).
    pub reserved: bool,
    pub decision: Outcome,
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
    let request_id = request_id::choose(
        request
            .headers()
            .get(request_id::HEADER)
            .map(HeaderValue::as_bytes),
    );
    // Every log line of the request, on whatever task, carries its id.
    let span = tracing::info_span!("request", request_id = %request_id);
    // Tracked, so that shutdown waits for it (lib.rs, `drain`).
    let task = shared
        .tasks
        .spawn(serve(shared.clone(), request, peer, request_id).instrument(span.clone()));
    match task.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(parent: &span, error = %e, "request task failed");
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
    request_id: String,
) -> Response<Body> {
    let started = Instant::now();
    let _in_flight = InFlight::enter(&shared.metrics.in_flight);
    let table = shared.table.load_full();
    let mut ctx = early(&table, &mut request, request_id);
    let response = match pipeline(&shared, &table, &mut ctx, request, peer).await {
        Ok(response) => response,
        Err(refusal) => {
            ctx.decision = Outcome::Refused(refusal.code());
            fail_to_proxy(&ctx, &refusal)
        }
    };
    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&ctx.request_id) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    ctx.status = response.status().as_u16();
    log(&shared, &ctx, started);
    response
}

/// Counts a request in the in-flight gauge for as long as it lives: dropped on every return, and
/// on a panic, which `handle` turns into a 500.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Phase 1: route, and no identity header from the client survives (the request id was chosen
/// by `handle`, for the request's span).
fn early(table: &Table, request: &mut Request<RequestBody>, request_id: String) -> Ctx {
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
        settle_id: String::new(),
        decided_ms: 0,
        charged: None,
        rates: Vec::new(),
        reserved: false,
        decision: Outcome::Allowed,
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
        request.headers_mut().remove(X_API_KEY);
        ctx.decision = Outcome::Public;
    }
    shared
        .metrics
        .route(&ctx.route)
        .decision_seconds
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
    let key = request.headers_mut().remove(X_API_KEY);
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
    let quota = ctx.route.quota.clone();
    let charge = quota.as_deref().map(|quota| {
        let (cost, reserve) = match quota.cost {
            Cost::Fixed(n) => (n, false),
            Cost::RequestBodyBytes => match content_length(request.headers()) {
                Some(n) => (n, false),
                // Unknown length: reserve a first step (more as it streams); settle commits
                // the real size.
                None => (shared.config.upload_reserve_step, true),
            },
        };
        Charge {
            quota,
            cost,
            reserve,
        }
    });
    if let Some(cached) = shared.refusals.check(
        identity.user,
        charge.map(|c| (&*c.quota.quota_type, (!c.reserve).then_some(c.cost))),
        ctx.route.rate_limits.iter().map(|r| r.field.as_str()),
    ) {
        return Err(cached_refusal(shared, quota.as_deref(), cached));
    }
    if charge.is_some() {
        ctx.settle_id = new_settle_id();
    }
    ctx.reserved = charge.is_some_and(|c| c.reserve);
    ctx.decided_ms = chrono::Utc::now().timestamp_millis();
    let input = DecideInput {
        user: identity.user,
        settle_id: &ctx.settle_id,
        iat: identity.iat,
        charge,
        rates: &ctx.route.rate_limits,
        now_ms: ctx.decided_ms,
        marker_ttl_ms: shared.config.settle_window.0,
        windows: &table.windows,
    };
    let mut outcome = shared.store.decide(&input).await;
    if matches!(outcome, Ok(Decision::Missing)) {
        // Rare (a user Redis does not hold yet): on the heap, so the request's future stays small.
        match Box::pin(shared.refill.ensure(identity.user)).await {
            Refilled::Written => outcome = Box::pin(shared.store.decide(&input)).await,
            Refilled::NoSuchUser => {
                // A valid token of a user that no longer exists: refused, and remembered, so
                // that its next calls cost neither Redis nor the control plane.
                shared.refusals.note_unknown(identity.user);
                return Err(Refusal::Unauthorized);
            }
            Refilled::Failed => {}
        }
    }
    let decision = match outcome {
        Ok(decision) => decision,
        Err(e) => {
            shared.metrics.redis_errors.with_label_values(&[e.op]).inc();
            if let Some(quota) = &quota
                && e.is_transient()
            {
                // The script may have run although its answer never came: give back whatever it
                // took (settle.lua does nothing if it did not run, and cancels it if it runs
                // later).
                undo_unanswered(shared, identity.user, quota, ctx);
            }
            if shared.config.fail_mode == FailMode::Open && e.is_transient() {
                shared
                    .metrics
                    .fail_open
                    .with_label_values(&[&ctx.route.label])
                    .inc();
                tracing::warn!(request_id = %ctx.request_id, error = %e, "redis unavailable: forwarding uncounted (fail-open)");
                ctx.decision = Outcome::FailOpen;
                ctx.reserved = false;
                ctx.settle_id.clear();
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
        Decision::Cancelled => {
            tracing::warn!(request_id = %ctx.request_id, "decision cancelled by its own refund");
            Err(Refusal::BackendUnavailable)
        }
        Decision::Disabled => {
            shared.refusals.note_disabled(identity.user);
            Err(Refusal::AccountDisabled)
        }
        Decision::Revoked => Err(Refusal::Unauthorized),
        Decision::RateLimited {
            rule,
            retry_after_ms,
        } => {
            let retry_after = Duration::from_millis(retry_after_ms.max(1) as u64);
            if let Some(limit) = ctx.route.rate_limits.get(rule) {
                shared
                    .refusals
                    .note_rate_limited(identity.user, &limit.field, retry_after);
            }
            Err(Refusal::RateLimited {
                retry_after_s: retry_after.as_millis().div_ceil(1000) as u64,
            })
        }
        Decision::QuotaExceeded {
            limit,
            used,
            resets_at_ms,
        } => {
            let quota_type = quota.map_or_else(|| Arc::from(""), |q| q.quota_type.clone());
            let refusal = QuotaRefusal {
                limit,
                used,
                resets_at_ms,
            };
            shared
                .refusals
                .note_quota(identity.user, &quota_type, refusal.clone());
            Err(quota_exceeded(quota_type, &refusal))
        }
        Decision::Admitted {
            plan,
            charged,
            rates,
        } => {
            ctx.plan = plan;
            ctx.charged = charged;
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

fn quota_exceeded(quota_type: Arc<str>, refusal: &QuotaRefusal) -> Refusal {
    Refusal::QuotaExceeded {
        quota_type,
        limit: refusal.limit,
        used: refusal.used,
        resets_at_ms: refusal.resets_at_ms,
    }
}

/// The answer to a request refused from the local cache: the same as Redis's refusal was.
fn cached_refusal(shared: &Shared, quota: Option<&Quota>, cached: Cached) -> Refusal {
    let (kind, refusal) = match cached {
        Cached::Unknown => ("unknown_user", Refusal::Unauthorized),
        Cached::Disabled => ("disabled", Refusal::AccountDisabled),
        Cached::RateLimited { retry_after } => (
            "rate_limited",
            Refusal::RateLimited {
                retry_after_s: retry_after.as_millis().div_ceil(1000).max(1) as u64,
            },
        ),
        Cached::QuotaExceeded(q) => (
            "quota_exceeded",
            quota_exceeded(
                quota.map_or_else(|| Arc::from(""), |q| q.quota_type.clone()),
                &q,
            ),
        ),
    };
    shared
        .metrics
        .cached_refusals
        .with_label_values(&[kind])
        .inc();
    refusal
}

/// A fresh settle id: 64 random bits in hex, never anything a client chose.
pub fn new_settle_id() -> String {
    // The thread's own generator: no system call per request (a v4 UUID asks the kernel).
    format!("{:016x}", rand::random::<u64>())
}

/// Refunds, in the background, a decision whose answer was lost: settle.lua gives back what the
/// decision's marker says it took, nothing if it never ran, and cancels it if it runs later.
fn undo_unanswered(shared: &Shared, user: Uuid, quota: &Arc<Quota>, ctx: &Ctx) {
    shared
        .refunds
        .retry(pending_settle(shared, user, quota, ctx, true, 0));
}

/// A settle of this request that can be retried later, until its marker expires.
fn pending_settle(
    shared: &Shared,
    user: Uuid,
    quota: &Arc<Quota>,
    ctx: &Ctx,
    refund: bool,
    actual: u64,
) -> PendingSettle {
    let window = shared.config.settle_window.0;
    PendingSettle {
        refund,
        user,
        settle_id: ctx.settle_id.clone(),
        quota: quota.clone(),
        decided_ms: ctx.decided_ms,
        actual,
        marker_ttl_ms: window,
        deadline: Instant::now() + Duration::from_millis(window),
    }
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
    if let Some(identity) = ctx.identity.filter(|_| ctx.decision != Outcome::Public) {
        insert(headers, X_USER_ID, &identity.user.to_string());
        insert(headers, X_AUTH_METHOD, identity.method.as_str());
        if !ctx.plan.is_empty() {
            insert(headers, X_PLAN, &ctx.plan);
        }
    }
    insert(headers, X_REQUEST_ID, &ctx.request_id);
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    insert(headers, X_FORWARDED_FOR, &forwarded_for);
    insert(headers, X_FORWARDED_PROTO, "http");

    let byte_priced = ctx
        .route
        .quota
        .as_ref()
        .is_some_and(|q| q.cost == Cost::RequestBodyBytes);
    let (body, meter) =
        if let (true, Some(charged), Some(identity)) = (byte_priced, &ctx.charged, ctx.identity) {
            // What the quota covers: the whole Content-Length, or the first reserved step of an
            // upload of unknown length, which asks for more as it streams.
            let meter = Arc::new(BodyMeter::new(charged.taken.max(0) as u64));
            let reserver = ctx.reserved.then(|| {
                Arc::new(Reserver {
                    store: shared.store.clone(),
                    user: identity.user,
                    settle_id: ctx.settle_id.clone(),
                    quota: ctx
                        .route
                        .quota
                        .clone()
                        .expect("byte-priced routes are metered"),
                    step: shared.config.upload_reserve_step,
                    marker_ttl_ms: shared.config.settle_window.0,
                })
            });
            (
                MeteredBody {
                    inner: body,
                    meter: meter.clone(),
                    reserver,
                    held: None,
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
        keep_marker_alive(shared, ctx, shared.upstream.request(request)),
    )
    .await;
    shared
        .metrics
        .route(&ctx.route)
        .upstream_seconds
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

/// Runs `work` (the app answering), renewing a metered request's settle marker every half settle
/// window, so that a slow app never outlives the marker its refund needs.
async fn keep_marker_alive<T>(shared: &Shared, ctx: &Ctx, work: impl Future<Output = T>) -> T {
    let Some(user) = ctx
        .identity
        .map(|i| i.user)
        .filter(|_| !ctx.settle_id.is_empty())
    else {
        return work.await;
    };
    let window = shared.config.settle_window.0;
    let every = Duration::from_millis(window / 2);
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick() => {
                if let Err(e) = shared.store.renew_marker(user, &ctx.settle_id, window).await {
                    shared.metrics.redis_errors.with_label_values(&[e.op]).inc();
                    tracing::warn!(request_id = %ctx.request_id, error = %e, "could not renew the settle marker");
                }
            }
        }
    }
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
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
    let failed = match &forwarded.result {
        Ok(response) => response.status().is_client_error() || response.status().is_server_error(),
        Err(_) => true,
    };
    // An upload is settled once its body has ended: a client that breaks off is refunded, even
    // after the app has answered.
    let body_end = match &forwarded.meter {
        Some(meter) if !failed => {
            Some(meter.ended(shared.config.upstream_timeout.duration()).await)
        }
        Some(meter) => Some(meter.end()),
        None => None,
    };
    let exceeded = forwarded.meter.as_ref().is_some_and(|m| m.exceeded());
    let client_failed = body_end == Some(BodyEnd::ClientFailed);
    let failed = failed || client_failed;
    let metered = ctx.route.quota.clone().filter(|_| ctx.charged.is_some());
    if let (Some(identity), Some(quota)) = (ctx.identity, metered) {
        let refund = failed || exceeded;
        let actual = forwarded.meter.as_ref().map_or(0, |m| m.seen());
        if refund || ctx.reserved {
            let input = SettleInput {
                refund,
                user: identity.user,
                settle_id: &ctx.settle_id,
                quota: &quota,
                decided_ms: ctx.decided_ms,
                actual,
                marker_ttl_ms: shared.config.settle_window.0,
            };
            match shared.store.settle(&input).await {
                Ok(_) if refund => {
                    refunded(shared, identity.user, ctx);
                    let reason = if exceeded {
                        "body_over_quota"
                    } else if client_failed {
                        "client_aborted"
                    } else if forwarded.result.is_err() {
                        "unreachable"
                    } else {
                        "app_error"
                    };
                    shared.metrics.refunds.with_label_values(&[reason]).inc();
                    if let Some(charged) = &mut ctx.charged {
                        charged.remaining += charged.taken;
                        charged.taken = 0;
                    }
                }
                Ok(_) => {
                    // Committed at the real size: what remains moves by what was given back.
                    if let Some(charged) = &mut ctx.charged {
                        charged.remaining += charged.taken - actual as i64;
                        charged.taken = actual as i64;
                    }
                }
                Err(e) if e.is_transient() => {
                    shared.metrics.redis_errors.with_label_values(&[e.op]).inc();
                    tracing::warn!(request_id = %ctx.request_id, error = %e, refund, "settle did not land in time; retrying in the background");
                    let pending =
                        pending_settle(shared, identity.user, &quota, ctx, refund, actual);
                    shared.refunds.retry(pending);
                    if refund {
                        refunded(shared, identity.user, ctx);
                    }
                }
                Err(e) => {
                    shared.metrics.redis_errors.with_label_values(&[e.op]).inc();
                    tracing::error!(request_id = %ctx.request_id, error = %e, refund, "could not settle; the charge stands");
                }
            }
        }
        if exceeded {
            let charged = ctx.charged.clone().unwrap_or_default();
            return Err(Refusal::QuotaExceeded {
                quota_type: quota.quota_type.clone(),
                limit: charged.limit,
                used: charged.limit - charged.remaining - charged.taken,
                resets_at_ms: charged.resets_at_ms,
            });
        }
    }
    forwarded.result
}

/// After a refund: this sidecar's cached refusals of the user no longer hold, and if the user had
/// run out, other sidecars may hold some too — tell them (rare: only at exhaustion).
fn refunded(shared: &Shared, user: Uuid, ctx: &Ctx) {
    shared.refusals.forget(user);
    // After its decision, a request like this one would have been refused.
    let exhausted = ctx
        .charged
        .as_ref()
        .is_some_and(|c| c.remaining < c.taken.max(1));
    if exhausted {
        let store = shared.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.announce_user(user).await {
                tracing::debug!(error = %e, "could not announce a refund");
            }
        });
    }
}

/// Phase 6: quota and rate-limit headers on the way out.
fn respond(ctx: &Ctx, response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let success = parts.status.is_success() || parts.status.is_redirection();
    if success && let (Some(quota), Some(charged)) = (&ctx.route.quota, &ctx.charged) {
        let h = &mut parts.headers;
        insert(h, X_QUOTA_TYPE, &quota.quota_type);
        insert(h, X_QUOTA_LIMIT, &charged.limit.to_string());
        insert(h, X_QUOTA_REMAINING, &charged.remaining.max(0).to_string());
        if let Some(reset) = reset_time(charged.resets_at_ms) {
            insert(h, X_QUOTA_RESET, &quota::rfc3339(reset));
        }
    }
    rate_limit_headers(&mut parts.headers, &ctx.rates);
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

/// When a window that ends at `ms` resets; `None` for a lifetime quota (0).
fn reset_time(ms: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    (ms > 0)
        .then(|| chrono::DateTime::from_timestamp_millis(ms))
        .flatten()
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
    insert(headers, RATELIMIT_POLICY, &policy.join(", "));
    insert(headers, RATELIMIT, &state.join(", "));
}

/// The one mapping from a refusal to its answer.
pub fn fail_to_proxy(ctx: &Ctx, refusal: &Refusal) -> Response<Body> {
    let (status, message) = match refusal {
        Refusal::BadPath => (
            StatusCode::BAD_REQUEST,
            "the path has empty, '.' or '..' segments or percent-encodes a plain character; send it in its normal form".to_owned(),
        ),
        Refusal::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            "missing or invalid credentials".to_owned(),
        ),
        Refusal::AccountDisabled => (StatusCode::FORBIDDEN, "this account is disabled".to_owned()),
        Refusal::RateLimited { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests; slow down".to_owned(),
        ),
        Refusal::QuotaExceeded { quota_type, .. } => (
            StatusCode::PAYMENT_REQUIRED,
            format!("the {quota_type} quota does not cover this request"),
        ),
        Refusal::BackendUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "quota and rate limits cannot be checked right now; try again shortly".to_owned(),
        ),
        Refusal::BadGateway => (
            StatusCode::BAD_GATEWAY,
            "the app could not be reached".to_owned(),
        ),
        Refusal::UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "the app did not answer in time".to_owned(),
        ),
    };
    let mut body = ErrorBody::new(refusal.code(), message);
    if let Refusal::QuotaExceeded {
        quota_type,
        limit,
        used,
        resets_at_ms,
    } = refusal
    {
        let status = QuotaStatus::new(quota_type, *limit, *used, reset_time(*resets_at_ms));
        body = body.with_details(status.of_app(&ctx.app).to_json());
    }
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
        .route(&ctx.route)
        .request(ctx.decision.as_str());
    // The access log: one line per request, the per-call audit trail (docs/access-log.md); a
    // successful admitted call's line is written one in `access_log_every`.
    if !writes_access_line(
        shared.config.access_log_every,
        ctx.decision,
        ctx.status,
        &shared.access_lines,
    ) {
        return;
    }
    tracing::info!(
        request_id = %ctx.request_id,
        app = %ctx.app,
        route = %ctx.route.label,
        method = %ctx.method,
        path = %ctx.path,
        user = ctx.identity.map(|i| i.user.to_string()).unwrap_or_default(),
        quota = ctx.route.quota.as_ref().map_or("", |q| &*q.quota_type),
        cost = ctx.charged.as_ref().map_or(0, |c| c.taken),
        decision = ctx.decision.as_str(),
        status = ctx.status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
}

/// Whether this call's access line is written: always, but for a successful admitted call when
/// `every` is above 1, of which one in `every` (counted in `seen`).
fn writes_access_line(every: u64, decision: Outcome, status: u16, seen: &AtomicU64) -> bool {
    every <= 1
        || decision != Outcome::Allowed
        || !(200..400).contains(&status)
        || seen.fetch_add(1, Ordering::Relaxed).is_multiple_of(every)
}

/// How a metered upload's body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Streaming = 0,
    /// All of it went up.
    Complete = 1,
    /// The client broke off (connection closed or reset mid-body).
    ClientFailed = 2,
    /// It passed what the quota allows and was cut off.
    Exceeded = 3,
    /// Dropped before its end (the app answered without reading it all).
    Dropped = 4,
}

/// Counts the bytes of a metered upload, reserves more quota as it streams (uploads of unknown
/// length) and stops it once it passes what the quota allows.
pub struct BodyMeter {
    /// Bytes the quota covers so far.
    reserved: AtomicU64,
    seen: AtomicU64,
    end: std::sync::atomic::AtomicU8,
    ended: tokio::sync::Notify,
}

impl BodyMeter {
    fn new(reserved: u64) -> BodyMeter {
        BodyMeter {
            reserved: AtomicU64::new(reserved),
            seen: AtomicU64::new(0),
            end: std::sync::atomic::AtomicU8::new(BodyEnd::Streaming as u8),
            ended: tokio::sync::Notify::new(),
        }
    }

    fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    fn end(&self) -> BodyEnd {
        match self.end.load(Ordering::Acquire) {
            1 => BodyEnd::Complete,
            2 => BodyEnd::ClientFailed,
            3 => BodyEnd::Exceeded,
            4 => BodyEnd::Dropped,
            _ => BodyEnd::Streaming,
        }
    }

    fn exceeded(&self) -> bool {
        self.end() == BodyEnd::Exceeded
    }

    fn finish(&self, end: BodyEnd) {
        if self
            .end
            .compare_exchange(
                BodyEnd::Streaming as u8,
                end as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.ended.notify_waiters();
        }
    }

    /// How the body ended, waiting for it (at most `wait`) if it is still going up: an app may
    /// answer before it has read all of it, and a client that breaks off after that is refunded.
    async fn ended(&self, wait: Duration) -> BodyEnd {
        let notified = self.ended.notified();
        if self.end() != BodyEnd::Streaming {
            return self.end();
        }
        let _ = tokio::time::timeout(wait, notified).await;
        self.end()
    }
}

/// Asks Redis for another step of quota as an upload of unknown length streams.
struct Reserver {
    store: crate::store::Store,
    user: Uuid,
    settle_id: String,
    quota: Arc<Quota>,
    step: u64,
    marker_ttl_ms: u64,
}

type Reserving = Pin<Box<dyn Future<Output = Result<u64, crate::store::StoreError>> + Send>>;

struct MeteredBody {
    inner: RequestBody,
    meter: Arc<BodyMeter>,
    reserver: Option<Arc<Reserver>>,
    /// A frame past what is reserved, held while more is asked for.
    held: Option<(Frame<Bytes>, Reserving)>,
}

impl MeteredBody {
    /// Passes `frame` on if the quota covers it; otherwise asks for more (held) or cuts off.
    fn admit(
        &mut self,
        frame: Frame<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let seen = self.meter.seen() + frame.data_ref().map_or(0, |d| d.len() as u64);
        let reserved = self.meter.reserved.load(Ordering::Relaxed);
        if seen <= reserved {
            self.meter.seen.store(seen, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(reserver) = self.reserver.clone() else {
            return self.cut_off();
        };
        let want = (seen - reserved).max(reserver.step);
        let asking: Reserving = Box::pin(async move {
            let r = &reserver;
            r.store
                .reserve_more(r.user, &r.settle_id, &r.quota, want, r.marker_ttl_ms)
                .await
        });
        self.held = Some((frame, asking));
        self.poll_held(cx)
    }

    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some((_, asking)) = self.held.as_mut() else {
            return Poll::Pending;
        };
        let took = match asking.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(took)) => took,
            Poll::Ready(Err(e)) => {
                tracing::warn!(error = %e, "could not reserve more of an upload's quota");
                0
            }
        };
        let Some((frame, _)) = self.held.take() else {
            return Poll::Pending;
        };
        if took == 0 {
            return self.cut_off();
        }
        self.meter.reserved.fetch_add(took, Ordering::Relaxed);
        self.admit(frame, cx)
    }

    fn cut_off(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.meter.finish(BodyEnd::Exceeded);
        Poll::Ready(Some(Err("upload passed the remaining byte quota".into())))
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.held.is_some() {
            return this.poll_held(cx);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => this.admit(frame, cx),
            Poll::Ready(Some(Err(e))) => {
                this.meter.finish(BodyEnd::ClientFailed);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.meter.finish(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        let end = if http_body::Body::is_end_stream(&self.inner) {
            BodyEnd::Complete
        } else {
            BodyEnd::Dropped
        };
        self.meter.finish(end);
    }
}

/// How long a request may wait for the control plane to write a missing user's limits.
pub const REFILL_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_sampled_only_for_successful_admitted_calls() {
        let seen = AtomicU64::new(0);
        let written = |every, decision, status| {
            (0..100)
                .filter(|_| writes_access_line(every, decision, status, &seen))
                .count()
        };
        assert_eq!(written(1, Outcome::Allowed, 200), 100);
        assert_eq!(written(10, Outcome::Allowed, 200), 10);
        assert_eq!(written(10, Outcome::Allowed, 302), 10);
        // The app failed (refunded), a refusal, a public call: every line.
        assert_eq!(written(10, Outcome::Allowed, 500), 100);
        assert_eq!(written(10, Outcome::Refused("quota_exceeded"), 402), 100);
        assert_eq!(written(10, Outcome::Public, 200), 100);
    }

    #[test]
    fn every_decision_label_has_its_series() {
        let refusals = [
            Refusal::BadPath,
            Refusal::Unauthorized,
            Refusal::AccountDisabled,
            Refusal::RateLimited { retry_after_s: 1 },
            Refusal::QuotaExceeded {
                quota_type: Arc::from("calls"),
                limit: 1,
                used: 1,
                resets_at_ms: 0,
            },
            Refusal::BackendUnavailable,
            Refusal::BadGateway,
            Refusal::UpstreamTimeout,
        ];
        let outcomes = [Outcome::Allowed, Outcome::Public, Outcome::FailOpen]
            .into_iter()
            .chain(refusals.iter().map(|r| Outcome::Refused(r.code())));
        let mut labels: Vec<&str> = outcomes.map(Outcome::as_str).collect();
        labels.sort_unstable();
        let mut known = crate::metrics::DECISIONS.to_vec();
        known.sort_unstable();
        assert_eq!(labels, known);
    }

    #[test]
    fn the_in_flight_gauge_comes_down_on_return_and_on_panic() {
        let gauge = prometheus::IntGauge::new("in_flight", "test").expect("gauge");
        {
            let _a = InFlight::enter(&gauge);
            let _b = InFlight::enter(&gauge);
            assert_eq!(gauge.get(), 2);
        }
        assert_eq!(gauge.get(), 0);
        let panicked = std::panic::catch_unwind(|| {
            let _in_flight = InFlight::enter(&gauge);
            panic!("a request that panics");
        });
        assert!(panicked.is_err());
        assert_eq!(gauge.get(), 0);
    }
}
