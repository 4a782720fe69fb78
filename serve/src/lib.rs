//! The HTTP server loop both Tollgate programs share ([`serve`]): hyper-util's auto (HTTP/1 and
//! HTTP/2) connection builder behind the overload protection of issue #12.
//!
//! - **Connection cap** (`max_connections`). At the cap, the connection idle longest is closed to
//!   make room (nginx's habit with keep-alive connections); when none is idle the new one is
//!   answered `503 overloaded` with `Retry-After` and closed. Those refusals have a small cap of
//!   their own; past it a connection is closed unanswered. Nothing waits in the kernel's backlog.
//! - **In-flight cap** (`max_in_flight`): a request past it is answered `503 overloaded` with
//!   `Retry-After` at once. A request counts until its response has been sent.
//! - **Timeouts**: a connection with nothing in progress closes after `idle_timeout`; a request
//!   head (HTTP/1) or first frame of a request (HTTP/2) must be complete `header_read_timeout`
//!   after its first byte; a request body may stall at most `body_read_timeout` between frames;
//!   HTTP/2 connections with open streams are pinged.
//! - **`Content-Length` above `max_body_bytes`**: `413 payload_too_large` before any of the body
//!   is read.
//! - **`accept` errors** (EMFILE, ENFILE, ENOBUFS...): counted, logged at most every 10 s, and
//!   followed by a pause that doubles up to 1 s, never a busy loop.
//! - **Graceful shutdown**: when `shutdown` completes the listener is closed; every request
//!   already received is answered (HTTP/1 with `Connection: close`, HTTP/2 after GOAWAY); idle
//!   connections close; after `grace` whatever remains is cut. [`serve`] then returns, and the
//!   program runs its own drain steps.
//!
//! Every refusal is in the contract's error body and carries `X-Request-Id`.

mod body;
mod conn;
pub mod fds;
pub mod metrics;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_common::error::ErrorBody;
use tollgate_common::request_id;

pub use body::{BodyTimeout, RequestBody, ResponseBody};
pub use metrics::{ListenerMetrics, ServeMetrics};

use body::RequestGuard;
use conn::{ConnState, Tracked, Verdict, Why};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a refused request is told to wait before trying again, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;
/// How long a connection refused at the cap may take to send its request head and get its 503.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new connection waits for the slot of the idle connection it evicted.
const EVICTION_WAIT: Duration = Duration::from_millis(500);
/// HTTP/2: a connection with open streams is pinged this often and dropped when a ping goes
/// unanswered for as long.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// `accept` errors: the first pause, the longest, and how often they are logged.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// A listener's limits; each program fills them from its configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// `Content-Length` above this answers 413 before the body is read; `None`: no limit here.
    pub max_body_bytes: Option<u64>,
    /// After `shutdown`, how long requests in progress may take before their connections are cut.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_in_flight: 256,
            idle_timeout: Duration::from_secs(75),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_header_bytes: 16 << 10,
            max_body_bytes: None,
            grace: Duration::from_secs(20),
        }
    }
}

impl Limits {
    /// Connections refused with a 503 at once, at most (each holds a descriptor for up to 2 s).
    pub fn max_refusing(&self) -> usize {
        (self.max_connections / 16).clamp(8, 256)
    }

    /// File descriptors this listener may hold at its limits.
    pub fn descriptors(&self) -> usize {
        self.max_connections + self.max_refusing() + 1
    }
}

/// How [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open when the grace ran out, cut with whatever they were doing.
    pub cut: usize,
}

/// One of the runtimes a listener's connections are served on, and the handler requests there
/// go to (a program keeps per-runtime state, such as its own Redis connection, in it).
pub struct Worker<H> {
    /// `None`: the runtime [`serve`] itself runs on. Otherwise each connection given to this
    /// worker is moved to that runtime (its socket registered with that runtime's reactor), so
    /// its reads, writes and request tasks never wake another thread.
    pub runtime: Option<tokio::runtime::Handle>,
    pub handler: H,
}

struct Server<H> {
    name: String,
    limits: Limits,
    metrics: ListenerMetrics,
    workers: Vec<Worker<H>>,
    /// The worker the next connection goes to (round robin).
    next_worker: AtomicUsize,
    builder: auto::Builder<TokioExecutor>,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    connections: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    epoch: Instant,
    /// Shutdown has begun: connections finish what they received and close.
    stopping: CancellationToken,
    /// The grace is over: connections are dropped.
    cut: CancellationToken,
    tasks: TaskTracker,
}

/// Serves `listener` with `handler` under `limits` until `shutdown` completes, then lets the
/// requests already received finish (for up to `limits.grace`) and returns.
///
/// `handler` gets each request (its body under the body read timeout) and the client's address.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    name: &str,
    limits: Limits,
    metrics: ListenerMetrics,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Stopped
where
    H: Fn(Request<RequestBody>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let worker = Worker {
        runtime: None,
        handler,
    };
    serve_on(listener, name, limits, metrics, vec![worker], shutdown).await
}

/// [`serve`], with the connections dealt round robin to `workers` (at least one): the accept
/// loop, the limits and the shutdown are the listener's, each connection and its requests live
/// on its worker's runtime. The sidecar gives each core a current-thread runtime this way
/// (ARCHITECTURE.md, "The sidecar's runtime shape").
pub async fn serve_on<H, Fut, B>(
    listener: TcpListener,
    name: &str,
    limits: Limits,
    metrics: ListenerMetrics,
    workers: Vec<Worker<H>>,
    shutdown: impl Future<Output = ()>,
) -> Stopped
where
    H: Fn(Request<RequestBody>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    assert!(!workers.is_empty(), "serve_on needs at least one worker");
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The watchdog (conn.rs) times request heads; hyper's timer would also cut idle
        // keep-alive connections at the header timeout.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let server = Arc::new(Server {
        name: name.to_owned(),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        refusing: Arc::new(Semaphore::new(limits.max_refusing())),
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        limits,
        metrics,
        workers,
        next_worker: AtomicUsize::new(0),
        builder,
        connections: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        epoch: Instant::now(),
        stopping: CancellationToken::new(),
        cut: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });
    tokio::pin!(shutdown);
    let mut pause = ACCEPT_PAUSE_MIN;
    let mut failures = 0u64;
    let mut logged: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    pause = ACCEPT_PAUSE_MIN;
                    server.admit(stream, peer);
                }
                // The one connection failed before we took it: nothing to pause for.
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    failures += 1;
                    // EMFILE and ENFILE (the same numbers on Linux and the BSDs).
                    if matches!(e.raw_os_error(), Some(23 | 24)) {
                        server.metrics.fd_exhausted.inc();
                    } else {
                        server.metrics.other_accept_error.inc();
                    }
                    if logged.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                        tracing::warn!(
                            listener = %server.name,
                            error = %e,
                            failures,
                            pause_ms = pause.as_millis() as u64,
                            "accept failed; pausing before the next accept"
                        );
                        failures = 0;
                        logged = Some(Instant::now());
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = &mut shutdown => break,
                    }
                    pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                }
            },
        }
    }
    drop(listener);
    server.stopping.cancel();
    server.tasks.close();
    let open = server.connections.lock().map_or(0, |c| c.len());
    tracing::info!(listener = %server.name, open, "no new connections; answering what was received");
    let mut cut = 0;
    if tokio::time::timeout(server.limits.grace, server.tasks.wait())
        .await
        .is_err()
    {
        cut = server.connections.lock().map_or(0, |c| c.len());
        tracing::warn!(listener = %server.name, cut, "shutdown grace expired; cutting the connections still open");
        server.cut.cancel();
        server.tasks.wait().await;
    }
    Stopped { cut }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

impl<H, Fut, B> Server<H>
where
    H: Fn(Request<RequestBody>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let worker = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            self.hand_to_worker(stream, peer, slot, worker);
            return;
        }
        // At the cap. Whatever happens next holds a descriptor for a while: bounded too.
        let Ok(refusing) = self.refusing.clone().try_acquire_owned() else {
            self.metrics.dropped_connection.inc();
            return;
        };
        let evicted = self.evict_one();
        let server = self.clone();
        self.tasks.spawn(async move {
            if evicted {
                let slot = tokio::select! {
                    slot = tokio::time::timeout(EVICTION_WAIT, server.slots.clone().acquire_owned()) => slot.ok().and_then(Result::ok),
                    () = server.stopping.cancelled() => None,
                };
                if let Some(slot) = slot {
                    drop(refusing);
                    server.hand_to_worker(stream, peer, slot, worker);
                    return;
                }
            }
            server.metrics.refused_connection.inc();
            refuse_connection(stream).await;
            drop(refusing);
        });
    }

    /// Serves an admitted connection on its worker's runtime: on this one, or moved out of this
    /// runtime's reactor and into the worker's.
    fn hand_to_worker(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        worker: usize,
    ) {
        let Some(runtime) = &self.workers[worker].runtime else {
            self.tasks
                .spawn(self.clone().connection(stream, peer, slot, worker));
            return;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(listener = %self.name, %peer, error = %e, "connection lost while handing it to its worker");
                return;
            }
        };
        let server = self.clone();
        self.tasks.spawn_on(
            async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => server.connection(stream, peer, slot, worker).await,
                    Err(e) => {
                        tracing::warn!(listener = %server.name, %peer, error = %e, "a worker could not take a connection");
                    }
                }
            },
            runtime,
        );
    }

    /// Asks the connection idle longest (else the one whose head is slowest) to go.
    fn evict_one(&self) -> bool {
        let Ok(connections) = self.connections.lock() else {
            return false;
        };
        let victim = connections
            .values()
            .filter_map(|c| c.eviction_rank().map(|rank| (rank, c)))
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, c)| c.clone());
        drop(connections);
        match victim {
            Some(victim) => {
                victim.start_eviction();
                self.metrics.evicted_idle.inc();
                true
            }
            None => false,
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _slot: OwnedSemaphorePermit,
        worker: usize,
    ) {
        let _ = stream.set_nodelay(true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(self.epoch));
        if let Ok(mut connections) = self.connections.lock() {
            connections.insert(id, state.clone());
        }
        self.metrics.open.inc();
        let service = {
            let server = self.clone();
            let state = state.clone();
            service_fn(move |request| server.clone().request(state.clone(), request, peer, worker))
        };
        let io = TokioIo::new(Tracked {
            stream,
            state: state.clone(),
        });
        let connection = self.builder.serve_connection(io, service);
        tokio::pin!(connection);
        let watchdog = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(watchdog);
        let mut stopping = false;
        let mut closing: Option<Instant> = None;
        let mut why_closing = None;
        loop {
            let verdict = tokio::select! {
                // The connection first: a request whose bytes are here is read before a
                // shutdown or an eviction is acted on.
                biased;
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(listener = %self.name, %peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                () = self.cut.cancelled() => break,
                () = self.stopping.cancelled(), if !stopping => {
                    stopping = true;
                    // Idle ones wait a moment for requests already on their way.
                    Verdict::Check(Instant::now() + conn::SHUTDOWN_SETTLE)
                }
                () = state.evict.notified(), if closing.is_none() => state.eviction(),
                () = &mut watchdog => state.verdict(Instant::now(), &self.limits, stopping, closing),
            };
            match verdict {
                Verdict::Check(at) => watchdog.as_mut().reset(at),
                Verdict::Close(why) => {
                    if closing.is_none() {
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                        why_closing = Some(why);
                        if why == Why::Idle {
                            self.metrics.idle_timeout.inc();
                        }
                    }
                    watchdog.as_mut().reset(Instant::now());
                }
                Verdict::Drop(why) => {
                    if why == Why::HeaderTimeout {
                        self.metrics.header_timeout.inc();
                    }
                    tracing::debug!(listener = %self.name, %peer, ?why, ?why_closing, "connection dropped");
                    break;
                }
            }
        }
        if let Ok(mut connections) = self.connections.lock() {
            connections.remove(&id);
        }
        self.metrics.open.dec();
    }

    async fn request(
        self: Arc<Self>,
        state: Arc<ConnState>,
        request: Request<Incoming>,
        peer: SocketAddr,
        worker: usize,
    ) -> Result<Response<ResponseBody<B>>, Infallible> {
        state.request_started();
        let mut guard = RequestGuard {
            conn: state,
            permit: None,
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.metrics.refused_request.inc();
            let refusal = refusal(
                request.headers(),
                request.version(),
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in progress; retry shortly",
                false,
            );
            return Ok(refusal.map(|b| ResponseBody::refusal(b, Some(guard))));
        };
        guard.permit = Some(permit);
        if let Some(max) = self.limits.max_body_bytes
            && content_length(request.headers()).is_some_and(|n| n > max)
        {
            // The body is never read, so the connection cannot carry another request.
            let refusal = refusal(
                request.headers(),
                request.version(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("the request body is larger than {max} bytes"),
                true,
            );
            return Ok(refusal.map(|b| ResponseBody::refusal(b, Some(guard))));
        }
        let timeout = self.limits.body_read_timeout;
        let timed_out = self.metrics.body_timeout.clone();
        let request = request.map(|b| RequestBody::new(b, timeout, timed_out));
        let response = (self.workers[worker].handler)(request, peer).await;
        Ok(response.map(|b| ResponseBody::handler(b, guard)))
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One of the server's own answers, in the contract's error body, with a request id.
fn refusal(
    headers: &HeaderMap,
    version: Version,
    status: StatusCode,
    code: &str,
    message: &str,
    close: bool,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        ErrorBody::new(code, message).to_json(),
    )));
    *response.status_mut() = status;
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let id = request_id::choose(headers.get(request_id::HEADER).map(HeaderValue::as_bytes));
    if let Ok(id) = HeaderValue::from_str(&id) {
        out.insert(request_id::HEADER, id);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        out.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    // HTTP/2 has no Connection header (hyper would drop it with a warning).
    if close && version < Version::HTTP_2 {
        out.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Answers a connection over the cap: reads its request head (briefly) and answers 503.
async fn refuse_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(REFUSAL_TIMEOUT);
    let service = service_fn(|request: Request<Incoming>| async move {
        Ok::<_, Infallible>(refusal(
            request.headers(),
            request.version(),
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many connections; retry shortly",
            true,
        ))
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, connection).await;
}
