//! The routes file (YAML): which app this sidecar fronts, and how each request is authenticated,
//! rate-limited and metered. Validated as a whole at start-up and on SIGHUP; every problem is
//! reported with the line it is on.
//!
//! ```yaml
//! app: idoctor
//! upstream: http://127.0.0.1:4200
//! time_zone: Asia/Shanghai
//! rate_limits:                        # per user, on every route unless a route has its own
//!   - {name: per-second, rate: 100, period: 1s, burst: 200}
//! routes:
//!   - {method: GET, path: /health, public: true}
//!   - {method: POST, path: "/process/{patient}/{date}", quota: api_calls_full_process, cost: 1}
//!   - {method: POST, path: /upload, quota: storage_bytes, cost: request_body_bytes}
//! ```
//!
//! Requests that match no route need credentials and count no quota.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use chrono_tz::Tz;
use http::Method;
use serde::Deserialize;
use tollgate_common::ids;
use tollgate_common::keys::{bucket_field, user_field};
use tollgate_common::window::Window;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    app: String,
    upstream: Option<String>,
    time_zone: Option<String>,
    #[serde(default)]
    rate_limits: Vec<RateLimitSpec>,
    routes: Vec<RouteSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitSpec {
    name: String,
    rate: u64,
    period: String,
    burst: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    method: String,
    path: String,
    #[serde(default)]
    public: bool,
    quota: Option<String>,
    cost: Option<CostSpec>,
    rate_limits: Option<Vec<RateLimitSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CostSpec {
    Fixed(u64),
    Named(String),
}

/// What one request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    Fixed(u64),
    /// The request body's size in bytes.
    RequestBodyBytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub name: String,
    pub rate: u64,
    pub period_ms: u64,
    pub burst: u64,
    /// The user-hash field holding this limit's state (`keys::user_field::rate`), built once.
    pub field: String,
}

/// What a metered route charges, with the Redis field names it needs built once, so that a
/// decision builds none of them.
#[derive(Debug)]
pub struct Quota {
    pub quota_type: Arc<str>,
    pub cost: Cost,
    /// `keys::user_field::quota`, `keys::user_field::counter`, `keys::bucket_field::suffix`.
    pub limit_field: String,
    pub counter_field: String,
    pub bucket_suffix: String,
    /// The quota type's window as Redis last said it is (see `store::Store::decide`), so that
    /// only that window's bounds are sent.
    pub window: AtomicU8,
}

impl Quota {
    fn new(app: &str, quota_type: &str, cost: Cost, label: &str) -> Quota {
        Quota {
            quota_type: quota_type.into(),
            cost,
            limit_field: user_field::quota(app, quota_type),
            counter_field: user_field::counter(app, quota_type),
            bucket_suffix: bucket_field::suffix(app, quota_type, label),
            window: AtomicU8::new(Window::Month.index()),
        }
    }

    /// The window the next decision should send bounds for.
    pub fn window(&self) -> Window {
        Window::from_index(self.window.load(Ordering::Relaxed)).unwrap_or(Window::Month)
    }

    pub fn learn_window(&self, window: Window) {
        self.window.store(window.index(), Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    /// A trailing `*`: any remaining segments, including none.
    Rest,
}

#[derive(Debug, Clone)]
pub struct Route {
    method: Option<Method>,
    /// Shared, so the per-request copy of a route allocates nothing.
    segments: Arc<[Segment]>,
    /// `METHOD /pattern`, the metrics label.
    pub label: Arc<str>,
    pub public: bool,
    /// The quota type and cost, for metered routes.
    pub quota: Option<Arc<Quota>>,
    pub rate_limits: Arc<[RateLimit]>,
    /// Its metric series, made on first use (`Metrics::route`).
    pub series: Arc<std::sync::OnceLock<crate::metrics::RouteSeries>>,
}

#[derive(Debug, Clone)]
pub struct Routes {
    pub app: Arc<str>,
    pub upstream: Option<String>,
    pub time_zone: Tz,
    routes: Vec<Route>,
    /// What a request that matches no route gets: credentials, no quota, the global limits.
    fallback: Route,
}

/// Every problem found in a routes file, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct RoutesError(pub Vec<String>);

fn parse_period(s: &str) -> Option<u64> {
    let ms = s.parse::<tollgate_common::config::Millis>().ok()?.0;
    (ms > 0).then_some(ms)
}

fn compile_limits(
    app: &str,
    specs: &[RateLimitSpec],
    at: &str,
    problems: &mut Vec<String>,
) -> Vec<RateLimit> {
    let mut out: Vec<RateLimit> = Vec::new();
    for spec in specs {
        let ok_name = !spec.name.is_empty()
            && spec.name.len() <= 64
            && spec
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_name {
            problems.push(format!(
                "{at}: rate limit name {:?} must be 1-64 letters, digits, '-' or '_'",
                spec.name
            ));
        }
        if out.iter().any(|l| l.name == spec.name) {
            problems.push(format!("{at}: rate limit {:?} is defined twice", spec.name));
        }
        let Some(period_ms) = parse_period(&spec.period) else {
            problems.push(format!(
                "{at}: rate limit {:?}: period {:?} is not a duration such as 1s or 1m",
                spec.name, spec.period
            ));
            continue;
        };
        if spec.rate == 0 {
            problems.push(format!(
                "{at}: rate limit {:?}: rate must be at least 1",
                spec.name
            ));
            continue;
        }
        let burst = spec.burst.unwrap_or(spec.rate);
        if burst == 0 {
            problems.push(format!(
                "{at}: rate limit {:?}: burst must be at least 1",
                spec.name
            ));
            continue;
        }
        out.push(RateLimit {
            name: spec.name.clone(),
            rate: spec.rate,
            period_ms,
            burst,
            field: user_field::rate(app, &spec.name),
        });
    }
    out
}

fn compile_path(path: &str) -> Result<Vec<Segment>, String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with /"));
    }
    let parts: Vec<&str> = path[1..].split('/').collect();
    let mut segments = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if *part == "*" {
            if i + 1 != parts.len() {
                return Err(format!(
                    "path {path:?}: * is only allowed as the last segment"
                ));
            }
            segments.push(Segment::Rest);
        } else if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
            segments.push(Segment::Param);
        } else if part.contains(['{', '}', '*']) {
            return Err(format!(
                "path {path:?}: segment {part:?} must be a literal, a whole {{param}} or a trailing *"
            ));
        } else {
            segments.push(Segment::Literal((*part).to_owned()));
        }
    }
    // "/" is one empty literal segment.
    Ok(segments)
}

/// The 1-based lines on which the items of the top-level `routes:` list start.
fn route_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let mut in_routes = false;
    let mut item_indent: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if indent == 0 {
            in_routes = trimmed.starts_with("routes:");
            continue;
        }
        if in_routes && trimmed.starts_with('-') && item_indent.is_none_or(|i| i == indent) {
            item_indent = Some(indent);
            lines.push(n + 1);
        }
    }
    lines
}

impl Routes {
    /// Parses and validates a routes file.
    pub fn parse(origin: &str, text: &str) -> Result<Routes, RoutesError> {
        let spec: FileSpec = serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" at line {}", l.line()))
                .unwrap_or_default();
            RoutesError(vec![format!("{origin}{at}: {e}")])
        })?;
        let lines = route_lines(text);
        let mut problems = Vec::new();
        if !ids::is_id(&spec.app) {
            problems.push(format!(
                "{origin}: app {:?} must be an app id (1-63 lowercase letters, digits, '_' or '-', starting with a letter or digit)",
                spec.app
            ));
        }
        if let Some(upstream) = &spec.upstream
            && (!upstream.starts_with("http://") || upstream.parse::<http::Uri>().is_err())
        {
            problems.push(format!(
                "{origin}: upstream {upstream:?} must be an http:// URL"
            ));
        }
        let time_zone = match spec.time_zone.as_deref() {
            None => chrono_tz::UTC,
            Some(name) => name.parse::<Tz>().unwrap_or_else(|_| {
                problems.push(format!(
                    "{origin}: time_zone {name:?} is not an IANA time zone"
                ));
                chrono_tz::UTC
            }),
        };
        let global: Arc<[RateLimit]> = compile_limits(
            &spec.app,
            &spec.rate_limits,
            &format!("{origin}: rate_limits"),
            &mut problems,
        )
        .into();
        let mut routes = Vec::with_capacity(spec.routes.len());
        for (i, r) in spec.routes.iter().enumerate() {
            let at = match lines.get(i) {
                Some(line) => format!("{origin} line {line} (route {})", i + 1),
                None => format!("{origin} (route {})", i + 1),
            };
            let method = match r.method.to_ascii_uppercase().as_str() {
                "*" | "ANY" => None,
                m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => {
                    Method::from_bytes(m.as_bytes()).ok()
                }
                "HEAD" => {
                    problems.push(format!(
                        "{at}: HEAD is matched by the GET route of the path; list GET"
                    ));
                    None
                }
                _ => {
                    problems.push(format!(
                        "{at}: method {:?} must be GET, POST, PUT, PATCH, DELETE, OPTIONS or *",
                        r.method
                    ));
                    None
                }
            };
            if r.public && r.rate_limits.is_some() {
                problems.push(format!(
                    "{at}: rate limits are per user, and a public route has no user; remove one"
                ));
            }
            let segments = compile_path(&r.path).unwrap_or_else(|e| {
                problems.push(format!("{at}: {e}"));
                Vec::new()
            });
            let label = format!("{} {}", r.method.to_ascii_uppercase(), r.path);
            let quota = match (&r.quota, &r.cost) {
                (None, None) => None,
                (Some(_), _) if r.public => {
                    problems.push(format!(
                        "{at}: a public route has no user to charge; remove quota or public"
                    ));
                    None
                }
                (Some(q), cost) => {
                    if !ids::is_quota_type_key(q) {
                        problems.push(format!(
                            "{at}: quota {q:?} must be a quota type key (1-63 lowercase letters, digits or '_', starting with a letter or digit)"
                        ));
                    }
                    let cost = match cost {
                        None => Cost::Fixed(1),
                        Some(CostSpec::Fixed(0)) => {
                            problems.push(format!("{at}: cost must be at least 1"));
                            Cost::Fixed(1)
                        }
                        Some(CostSpec::Fixed(n)) => Cost::Fixed(*n),
                        Some(CostSpec::Named(n)) if n == "request_body_bytes" => {
                            Cost::RequestBodyBytes
                        }
                        Some(CostSpec::Named(n)) => {
                            problems.push(format!(
                                "{at}: cost {n:?} must be a number or request_body_bytes"
                            ));
                            Cost::Fixed(1)
                        }
                    };
                    Some(Arc::new(Quota::new(&spec.app, q, cost, &label)))
                }
                (None, Some(_)) => {
                    problems.push(format!("{at}: cost without quota"));
                    None
                }
            };
            let rate_limits = match &r.rate_limits {
                Some(specs) => compile_limits(&spec.app, specs, &at, &mut problems).into(),
                None => global.clone(),
            };
            routes.push(Route {
                method,
                segments: segments.into(),
                label: label.into(),
                public: r.public,
                quota,
                rate_limits,
                series: Arc::default(),
            });
        }
        if !problems.is_empty() {
            return Err(RoutesError(problems));
        }
        Ok(Routes {
            app: spec.app.into(),
            upstream: spec.upstream,
            time_zone,
            routes,
            fallback: Route {
                method: None,
                segments: Arc::from([]),
                label: "unmatched".into(),
                public: false,
                quota: None,
                rate_limits: global,
                series: Arc::default(),
            },
        })
    }

    /// Every route's metrics label, the fallback's included.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .chain(std::iter::once(&self.fallback))
            .map(|r| &*r.label)
    }

    /// The first route that matches, in file order; the fallback if none does. `HEAD` is matched
    /// as `GET` (an app answers it with the same handler), and one trailing `/` is ignored.
    pub fn find(&self, method: &Method, path: &str) -> &Route {
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let path = match path.strip_suffix('/') {
            Some(trimmed) if !trimmed.is_empty() => trimmed,
            _ => path,
        };
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .unwrap_or(&self.fallback)
    }
}

/// True when a request path is in the one spelling routes are matched against: no empty, `.` or
/// `..` segments and no percent-encoded unreserved character (`%70rocess` is `process` to most
/// apps). Anything else is refused, so no spelling of a metered path goes through uncounted.
pub fn is_normal_path(path: &str) -> bool {
    if !path.starts_with('/') {
        return false;
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if (segment.is_empty() && !last) || *segment == "." || *segment == ".." {
            return false;
        }
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let decoded = path.get(i + 1..i + 3).and_then(|h| {
                let mut byte = [0u8; 1];
                hex::decode_to_slice(h, &mut byte).ok().map(|()| byte[0])
            });
            match decoded {
                Some(b)
                    if b.is_ascii_alphanumeric()
                        || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') =>
                {
                    return false;
                }
                Some(_) => i += 3,
                None => return false,
            }
        } else {
            i += 1;
        }
    }
    true
}

impl Route {
    fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in self.segments.iter() {
            match segment {
                Segment::Rest => return true,
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
                Segment::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDOCTOR: &str = include_str!("../../demo/idoctor/routes.yaml");

    #[test]
    fn the_idoctor_file_parses_and_routes() {
        let routes = Routes::parse("routes.yaml", IDOCTOR).expect("valid");
        assert_eq!(&*routes.app, "idoctor");
        let check = |method: Method, path: &str, label: &str| {
            assert_eq!(&*routes.find(&method, path).label, label, "{method} {path}");
        };
        check(
            Method::POST,
            "/process/p1/2026-01-01",
            "POST /process/{patient}/{date}",
        );
        check(Method::GET, "/process/p1/2026-01-01", "unmatched");
        check(Method::POST, "/process/p1", "unmatched");
        check(Method::POST, "/process/p1/2026-01-01/extra", "unmatched");
        check(Method::POST, "/l3/p1", "POST /l3/{patient}");
        check(Method::POST, "/muscle/p1", "POST /muscle/{patient}");
        check(Method::POST, "/upload", "POST /upload");
        check(Method::GET, "/health", "GET /health");
        check(Method::GET, "/results/p1", "unmatched");
        assert!(routes.find(&Method::GET, "/health").public);
        let upload = routes.find(&Method::POST, "/upload");
        assert_eq!(
            upload
                .quota
                .as_ref()
                .map(|q| (q.quota_type.to_string(), q.cost)),
            Some(("storage_bytes".to_owned(), Cost::RequestBodyBytes))
        );
        let limits = &routes.find(&Method::GET, "/results/x").rate_limits;
        assert_eq!(limits.len(), 1);
        assert_eq!(
            (limits[0].rate, limits[0].period_ms, limits[0].burst),
            (100, 1000, 200)
        );
    }

    #[test]
    fn only_the_normal_spelling_of_a_path_passes() {
        let check = |path: &str, normal: bool| assert_eq!(is_normal_path(path), normal, "{path}");
        check("/process/p1/2026-11-25", true);
        check("/", true);
        check("/upload/", true);
        check("/files/a%20b", true);
        check("/files/%E4%BD%A0", true);
        check("//process/p1/d", false);
        check("/process//p1", false);
        check("/process/./p1", false);
        check("/process/../upload", false);
        check("/%70rocess/p1/d", false);
        check("/process%2Fp1/d", false);
        check("/process/p1%2", false);
        check("relative", false);
    }

    #[test]
    fn head_matches_get_and_a_trailing_slash_is_ignored() {
        let routes = Routes::parse("r.yaml", IDOCTOR).expect("valid");
        assert_eq!(&*routes.find(&Method::HEAD, "/health").label, "GET /health");
        assert_eq!(
            &*routes.find(&Method::POST, "/process/p1/2026-01-01/").label,
            "POST /process/{patient}/{date}"
        );
    }

    #[test]
    fn wildcards_and_params() {
        let routes = Routes::parse(
            "r.yaml",
            "app: a\nroutes:\n  - {method: '*', path: '/files/*'}\n  - {method: GET, path: '/'}\n",
        )
        .expect("valid");
        for path in ["/files", "/files/", "/files/a/b/c"] {
            assert_eq!(
                &*routes.find(&Method::DELETE, path).label,
                "* /files/*",
                "{path}"
            );
        }
        assert_eq!(&*routes.find(&Method::GET, "/").label, "GET /");
        assert_eq!(&*routes.find(&Method::GET, "/other").label, "unmatched");
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "app: idoctor\nroutes:\n  - method: GET\n    path: /ok\n  - method: GTE\n    path: no-slash\n  - method: POST\n    path: /x/{a}/*/y\n    quota: calls\n    cost: lots\n  - method: GET\n    path: /public\n    public: true\n    quota: calls\n";
        let err = Routes::parse("r.yaml", text).expect_err("invalid");
        let lines = err.0;
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(
            lines[0].starts_with("r.yaml line 5 (route 2): method"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("r.yaml line 5 (route 2): path"),
            "{lines:?}"
        );
        assert!(
            lines[2].starts_with("r.yaml line 7 (route 3): path"),
            "{lines:?}"
        );
        assert!(
            lines[3].starts_with("r.yaml line 7 (route 3): cost"),
            "{lines:?}"
        );
        assert!(
            lines[4].starts_with("r.yaml line 11 (route 4): a public route"),
            "{lines:?}"
        );
    }

    #[test]
    fn ids_no_database_row_can_have_are_refused() {
        for (app, quota) in [("-x", "calls"), ("x", "_calls"), ("x", "storage-bytes")] {
            let text =
                format!("app: {app:?}\nroutes:\n  - {{method: GET, path: /a, quota: {quota:?}}}\n");
            let err = Routes::parse("r.yaml", &text).expect_err("invalid id");
            assert_eq!(err.0.len(), 1, "{:?}", err.0);
        }
    }

    #[test]
    fn syntax_and_unknown_fields_name_the_line() {
        let err = Routes::parse("r.yaml", "app: a\nroutes:\n  - method: GET\n    pth: /x\n")
            .expect_err("unknown field");
        assert!(err.0[0].contains("line "), "{:?}", err.0);
        assert!(err.0[0].contains("pth"), "{:?}", err.0);
        let err = Routes::parse("r.yaml", "app: [unclosed\n").expect_err("syntax");
        assert!(err.0[0].contains("line "), "{:?}", err.0);
    }
}
