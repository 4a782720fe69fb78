//! The control plane's Prometheus metrics. Names follow Prometheus conventions
//! (`tollgate_cp_*`, base units, `_total` for counters); dashboards and alerts in `k8s/` use
//! exactly these names.

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::domain::payments::{Channel, NotificationResult, OrderStatus};

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Usage bucket entries drained into the ledger, by kind (applied, duplicate, dropped,
    /// malformed).
    pub usage_drained: IntCounterVec,
    /// Closed usage buckets the current drain pass staged and has not yet recorded.
    pub usage_backlog: IntGauge,
    /// Seconds since the end of the newest minute known to be in the ledger.
    pub usage_lag: Gauge,
    /// Gateway notifications by channel and result (processed, duplicate, rejected).
    pub payment_notifications: IntCounterVec,
    /// Order state changes by the status entered.
    pub orders: IntCounterVec,
    /// Orders that reconciliation found paid although no notification arrived.
    pub reconcile_paid_found: IntCounterVec,
    /// Connections, overload refusals, timeouts and accept errors, by listener (`api`):
    /// `tollgate_cp_open_connections`, `tollgate_cp_overload_total`, ...
    pub serve: tollgate_serve::ServeMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "tollgate_cp_http_requests_total",
                "REST requests handled, by route template, method and status code.",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_cp_http_request_duration_seconds",
                "Time to answer a REST request, by route template.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let usage_drained = IntCounterVec::new(
            Opts::new(
                "tollgate_cp_usage_entries_drained_total",
                "Usage bucket entries (user, app, quota type, route, minute) drained into the ledger, by kind: applied, duplicate (a pass read twice), dropped (unknown user or quota type), malformed.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let usage_backlog = IntGauge::new(
            "tollgate_cp_usage_backlog_entries",
            "Closed usage buckets the last drain pass staged and has not yet recorded (0 once it committed).",
        )
        .expect("valid metric");
        let usage_lag = Gauge::new(
            "tollgate_cp_usage_lag_seconds",
            "Seconds since the end of the newest minute whose usage is in the ledger (the close grace plus up to a minute when all is well).",
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let payment_notifications = counter(
            "tollgate_cp_payment_notifications_total",
            "Gateway notifications by channel and result (processed, duplicate, rejected).",
            &["channel", "result"],
        );
        let orders = counter(
            "tollgate_cp_orders_total",
            "Order state changes, by the status entered (pending, paid, closed, refunded).",
            &["status"],
        );
        let reconcile_paid_found = counter(
            "tollgate_cp_reconcile_paid_found_total",
            "Orders reconciliation found paid at the gateway although no notification arrived.",
            &["channel"],
        );
        // Known label values are created up front so dashboards and alerts see zeros, not gaps.
        for channel in Channel::ALL.iter().map(|c| c.as_str()) {
            for result in [
                NotificationResult::Processed,
                NotificationResult::Duplicate,
                NotificationResult::Rejected,
            ] {
                payment_notifications.with_label_values(&[channel, result.as_str()]);
            }
            reconcile_paid_found.with_label_values(&[channel]);
        }
        for status in OrderStatus::ALL {
            orders.with_label_values(&[status.as_str()]);
        }
        for collector in [
            Box::new(payment_notifications.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(orders.clone()),
            Box::new(reconcile_paid_found.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
            Box::new(usage_drained.clone()),
            Box::new(usage_backlog.clone()),
            Box::new(usage_lag.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        let serve = tollgate_serve::ServeMetrics::new("tollgate_cp", &registry);
        Metrics {
            serve,
            registry,
            http_requests,
            http_duration,
            usage_drained,
            usage_backlog,
            usage_lag,
            payment_notifications,
            orders,
            reconcile_paid_found,
        }
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        tollgate_serve::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
