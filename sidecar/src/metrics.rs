//! The sidecar's Prometheus metrics (`tollgate_sidecar_*`). Dashboards and alerts in `k8s/` use
//! exactly these names.

use tollgate_serve::ServeMetrics;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every `decision` label of `tollgate_sidecar_requests_total`: `proxy::Outcome::as_str`.
pub const DECISIONS: [&str; 11] = [
    "allowed",
    "public",
    "fail_open",
    "invalid_request",
    "unauthorized",
    "account_disabled",
    "rate_limited",
    "quota_exceeded",
    "quota_backend_unavailable",
    "bad_gateway",
    "upstream_timeout",
];

/// The caches whose lookups `tollgate_sidecar_cache_requests_total` counts.
const CACHES: [&str; 3] = ["token", "api_key", "api_key_negative"];

pub struct Metrics {
    registry: Registry,
    /// Requests by route label and decision.
    pub requests: IntCounterVec,
    /// Time of the decision (authentication and the Redis call), by route.
    pub decision_seconds: HistogramVec,
    /// Time the app took, by route.
    pub upstream_seconds: HistogramVec,
    pub redis_errors: IntCounterVec,
    pub cache: IntCounterVec,
    pub in_flight: IntGauge,
    /// Requests forwarded uncounted because Redis was unavailable and fail-open is configured.
    pub fail_open: IntCounterVec,
    pub refunds: IntCounterVec,
    /// Settles waiting for a retry after a Redis timeout.
    pub refunds_pending: IntGauge,
    /// Settles that never landed (their marker expired first): those calls stay charged.
    pub refunds_given_up: prometheus::IntCounter,
    /// Requests refused from the local refusal cache, without Redis, by kind.
    pub cached_refusals: IntCounterVec,
    /// `cache` by [`CACHES`] × (hit, miss), made once: the request path counts without a lookup.
    cache_series: Vec<[IntCounter; 2]>,
    /// Connections, overload refusals, timeouts and accept errors of both listeners
    /// (`proxy`, `admin`): `tollgate_sidecar_open_connections`, `..._overload_total`, ...
    pub serve: ServeMetrics,
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_sidecar_requests_total",
                "Requests by route and decision (allowed, public, fail_open, or the error code of a refusal: unauthorized, account_disabled, rate_limited, quota_exceeded, quota_backend_unavailable, bad_gateway, ...).",
            ),
            &["route", "decision"],
        )
        .expect("valid metric");
        let decision_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_sidecar_decision_duration_seconds",
                "Time to authenticate and decide a request (including its Redis call).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_sidecar_upstream_duration_seconds",
                "Time until the app's response head arrived.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "tollgate_sidecar_redis_errors_total",
                "Failed Redis calls by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let cache = IntCounterVec::new(
            Opts::new(
                "tollgate_sidecar_cache_requests_total",
                "In-process cache lookups by cache and result (hit, miss).",
            ),
            &["cache", "result"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new(
            "tollgate_sidecar_in_flight_requests",
            "Requests being handled right now.",
        )
        .expect("valid metric");
        let fail_open = IntCounterVec::new(
            Opts::new(
                "tollgate_sidecar_fail_open_total",
                "Requests forwarded uncounted because Redis was unavailable (fail-open).",
            ),
            &["route"],
        )
        .expect("valid metric");
        let refunds = IntCounterVec::new(
            Opts::new(
                "tollgate_sidecar_refunds_total",
                "Costs given back because the app failed or was unreachable, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let refunds_pending = IntGauge::new(
            "tollgate_sidecar_refunds_pending",
            "Refunds and upload commits waiting for a retry after a Redis timeout.",
        )
        .expect("valid metric");
        let refunds_given_up = prometheus::IntCounter::new(
            "tollgate_sidecar_refunds_given_up_total",
            "Refunds and upload commits that never landed before their settle marker expired (the calls stay charged).",
        )
        .expect("valid metric");
        let cached_refusals = IntCounterVec::new(
            Opts::new(
                "tollgate_sidecar_cached_refusals_total",
                "Requests refused from the local refusal cache, without a Redis call, by kind (quota_exceeded, rate_limited, disabled, unknown_user).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        for kind in ["quota_exceeded", "rate_limited", "disabled", "unknown_user"] {
            cached_refusals.with_label_values(&[kind]);
        }
        // Known label values exist from the start, so dashboards and alerts see zeros, not gaps.
        for op in [
            "decide",
            "settle",
            "reserve",
            "renew marker",
            "announce",
            "api key lookup",
            "note key use",
            "ping",
        ] {
            redis_errors.with_label_values(&[op]);
        }
        let cache_series = CACHES
            .iter()
            .map(|c| {
                [
                    cache.with_label_values(&[c, "hit"]),
                    cache.with_label_values(&[c, "miss"]),
                ]
            })
            .collect();
        for reason in [
            "app_error",
            "unreachable",
            "body_over_quota",
            "client_aborted",
        ] {
            refunds.with_label_values(&[reason]);
        }
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(decision_seconds.clone()),
            Box::new(upstream_seconds.clone()),
            Box::new(redis_errors.clone()),
            Box::new(cache.clone()),
            Box::new(in_flight.clone()),
            Box::new(fail_open.clone()),
            Box::new(refunds.clone()),
            Box::new(refunds_pending.clone()),
            Box::new(refunds_given_up.clone()),
            Box::new(cached_refusals.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let serve = ServeMetrics::new("tollgate_sidecar", &registry);
        Metrics {
            serve,
            registry,
            requests,
            decision_seconds,
            upstream_seconds,
            redis_errors,
            cache,
            cache_series,
            in_flight,
            fail_open,
            refunds,
            refunds_pending,
            refunds_given_up,
            cached_refusals,
        }
    }

    /// Creates the per-route series of a routes table, so each route shows zeros before traffic.
    pub fn register_routes<'a>(&self, labels: impl Iterator<Item = &'a str>) {
        for label in labels {
            self.fail_open.with_label_values(&[label]);
        }
    }

    pub fn cache(&self, cache: &str, hit: bool) {
        match CACHES.iter().position(|c| *c == cache) {
            Some(i) => self.cache_series[i][usize::from(!hit)].inc(),
            None => self
                .cache
                .with_label_values(&[cache, if hit { "hit" } else { "miss" }])
                .inc(),
        }
    }

    /// A route's series, made on its first request (and again for the routes of a reloaded
    /// file), so that the request path never looks a label up.
    pub fn route<'a>(&self, route: &'a crate::routes::Route) -> &'a RouteSeries {
        route.series.get_or_init(|| RouteSeries {
            decision_seconds: self.decision_seconds.with_label_values(&[&route.label]),
            upstream_seconds: self.upstream_seconds.with_label_values(&[&route.label]),
            requests: DECISIONS.map(|d| self.requests.with_label_values(&[&route.label, d])),
        })
    }

    pub fn render(&self) -> String {
        tollgate_serve::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One route's series (`Metrics::route`).
pub struct RouteSeries {
    pub decision_seconds: Histogram,
    pub upstream_seconds: Histogram,
    /// `requests_total` by [`DECISIONS`].
    requests: [IntCounter; DECISIONS.len()],
}

impl RouteSeries {
    /// Counts one request with its `decision` label (one of [`DECISIONS`]).
    pub fn request(&self, decision: &str) {
        if let Some(i) = DECISIONS.iter().position(|d| *d == decision) {
            self.requests[i].inc();
        }
    }
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteSeries")
    }
}
