//! The server loop's Prometheus metrics, named with each program's prefix
//! (`tollgate_sidecar_*`, `tollgate_cp_*`) and labelled by listener, so that one registry can hold
//! several listeners' series.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every series of every listener of one program.
#[derive(Clone)]
pub struct ServeMetrics {
    open: IntGaugeVec,
    overload: IntCounterVec,
    timeouts: IntCounterVec,
    accept_errors: IntCounterVec,
}

/// What the server does when a limit is reached (the `action` label).
pub const OVERLOAD_ACTIONS: [&str; 4] = [
    "refused_connection",
    "dropped_connection",
    "evicted_idle",
    "refused_request",
];
/// Which timeout closed a connection or failed a request body (the `kind` label).
pub const TIMEOUT_KINDS: [&str; 3] = ["idle", "header", "body"];
/// Why `accept` failed (the `kind` label): out of file descriptors (EMFILE, ENFILE) or anything
/// else that is not the one connection's own failure (ENOBUFS, ENOMEM, ...).
pub const ACCEPT_ERROR_KINDS: [&str; 2] = ["fd_exhausted", "other"];

impl ServeMetrics {
    /// Creates the series under `prefix` (say `tollgate_sidecar`) and registers them.
    pub fn new(prefix: &str, registry: &Registry) -> ServeMetrics {
        let open = IntGaugeVec::new(
            Opts::new(
                format!("{prefix}_open_connections"),
                "Client connections open now, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let overload = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_overload_total"),
                "What a listener did at its limits: refused_connection (503 at the connection cap), dropped_connection (closed unanswered: even the refusals were at their cap), evicted_idle (an idle connection closed to make room), refused_request (503 at the in-flight cap).",
            ),
            &["listener", "action"],
        )
        .expect("valid metric");
        let timeouts = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_timeouts_total"),
                "Connections closed idle or while a request head trickled in, and request bodies that stalled, by listener and kind (idle, header, body).",
            ),
            &["listener", "kind"],
        )
        .expect("valid metric");
        let accept_errors = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_accept_errors_total"),
                "Failed accept calls by listener and kind (fd_exhausted: EMFILE/ENFILE; other); each is followed by a pause.",
            ),
            &["listener", "kind"],
        )
        .expect("valid metric");
        for c in [
            Box::new(open.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(overload.clone()),
            Box::new(timeouts.clone()),
            Box::new(accept_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        ServeMetrics {
            open,
            overload,
            timeouts,
            accept_errors,
        }
    }

    /// The series of one listener, created now so that dashboards see zeros before any event.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let overload = |action: &str| self.overload.with_label_values(&[name, action]);
        let timeout = |kind: &str| self.timeouts.with_label_values(&[name, kind]);
        let accept = |kind: &str| self.accept_errors.with_label_values(&[name, kind]);
        ListenerMetrics {
            open: self.open.with_label_values(&[name]),
            refused_connection: overload(OVERLOAD_ACTIONS[0]),
            dropped_connection: overload(OVERLOAD_ACTIONS[1]),
            evicted_idle: overload(OVERLOAD_ACTIONS[2]),
            refused_request: overload(OVERLOAD_ACTIONS[3]),
            idle_timeout: timeout(TIMEOUT_KINDS[0]),
            header_timeout: timeout(TIMEOUT_KINDS[1]),
            body_timeout: timeout(TIMEOUT_KINDS[2]),
            fd_exhausted: accept(ACCEPT_ERROR_KINDS[0]),
            other_accept_error: accept(ACCEPT_ERROR_KINDS[1]),
        }
    }
}

/// One listener's series, resolved once (no label lookup per event).
#[derive(Clone)]
pub struct ListenerMetrics {
    pub open: IntGauge,
    pub refused_connection: IntCounter,
    pub dropped_connection: IntCounter,
    pub evicted_idle: IntCounter,
    pub refused_request: IntCounter,
    pub idle_timeout: IntCounter,
    pub header_timeout: IntCounter,
    pub body_timeout: IntCounter,
    pub fd_exhausted: IntCounter,
    pub other_accept_error: IntCounter,
}

impl ListenerMetrics {
    /// Series registered nowhere, for tests and tools that do not scrape.
    pub fn unregistered(name: &str) -> ListenerMetrics {
        ServeMetrics::new("unregistered", &Registry::new()).listener(name)
    }
}

/// A registry in Prometheus's text exposition format, what `/metrics` answers in both programs.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut out,
    );
    String::from_utf8(out).unwrap_or_default()
}
