//! The server loop's limits as a client meets them, over real sockets on 127.0.0.1: idle and
//! slow-header connections are closed within their timeouts (HTTP/1 and HTTP/2), the connection
//! cap makes room by closing an idle connection or answers 503, the in-flight cap answers 503,
//! an announced body over the limit is refused with 413 before it is sent, a stalled body fails,
//! and shutdown answers every request already sent. Each test prints what it measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot};
use tollgate_serve::{BodyTimeout, Limits, ListenerMetrics, RequestBody, Stopped};

/// Slack on top of a timeout the feature defines, for a loaded machine.
const SLACK: Duration = Duration::from_secs(3);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Stopped>,
    /// `/slow` requests wait for a permit here.
    gate: Arc<Semaphore>,
    metrics: ListenerMetrics,
}

impl Server {
    async fn stop(mut self) -> Stopped {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.await.expect("server task")
    }
}

/// `/` answers at once, `/slow` once the gate lets it, `/work` after 50 ms, `/echo` reads the
/// body and answers its length (408 when it stalled).
async fn start(limits: Limits) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gate = Arc::new(Semaphore::new(0));
    let metrics = ListenerMetrics::unregistered("test");
    let (stop, stopped) = oneshot::channel::<()>();
    let handler = {
        let gate = gate.clone();
        move |request: Request<RequestBody>, _peer: SocketAddr| {
            let gate = gate.clone();
            async move {
                let (status, text) = match request.uri().path() {
                    "/slow" => {
                        let _ = gate.acquire().await.map(|p| p.forget());
                        (StatusCode::OK, "slow".to_owned())
                    }
                    "/work" => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        (StatusCode::OK, "work".to_owned())
                    }
                    "/echo" => match request.into_body().collect().await {
                        Ok(body) => (StatusCode::OK, body.to_bytes().len().to_string()),
                        Err(e) if e.downcast_ref::<BodyTimeout>().is_some() => {
                            (StatusCode::REQUEST_TIMEOUT, e.to_string())
                        }
                        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()),
                    },
                    _ => (StatusCode::OK, "ok".to_owned()),
                };
                let mut response = Response::new(Full::new(Bytes::from(text)));
                *response.status_mut() = status;
                response
            }
        }
    };
    let done = tokio::spawn(tollgate_serve::serve(
        listener,
        "test",
        limits,
        metrics.clone(),
        handler,
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        stop: Some(stop),
        done,
        gate,
        metrics,
    }
}

fn limits() -> Limits {
    Limits {
        max_connections: 64,
        max_in_flight: 64,
        idle_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(30),
        body_read_timeout: Duration::from_secs(30),
        max_header_bytes: 16 << 10,
        max_body_bytes: Some(1 << 20),
        grace: Duration::from_secs(10),
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// Reads one HTTP/1.1 response with a Content-Length body; `None` if the connection ended first.
async fn read_answer(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> Option<Answer> {
    loop {
        if let Some(end) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffered[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buffered.len() < end + 4 + length {
                if !read_more(stream, buffered).await {
                    return None;
                }
            }
            let body = String::from_utf8_lossy(&buffered[end + 4..end + 4 + length]).into_owned();
            buffered.drain(..end + 4 + length);
            return Some(Answer {
                status,
                headers,
                body,
            });
        }
        if !read_more(stream, buffered).await {
            return None;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffered.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

async fn request(addr: SocketAddr, raw: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.expect("send");
    tokio::time::timeout(SLACK * 3, read_answer(&mut stream, &mut Vec::new()))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

/// Seconds until the server closes `stream` (reading and discarding whatever comes first).
async fn seconds_until_closed(mut stream: TcpStream, started: Instant, limit: Duration) -> f64 {
    let mut sink = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after {limit:?}");
    started.elapsed().as_secs_f64()
}

#[tokio::test]
async fn idle_connections_close_within_the_idle_timeout() {
    let idle = Duration::from_secs(1);
    let server = start(Limits {
        idle_timeout: idle,
        ..limits()
    })
    .await;
    let started = Instant::now();
    let mut waits = Vec::new();
    // Connections that never send anything, and one that idles after an answer.
    for _ in 0..50 {
        let stream = TcpStream::connect(server.addr).await.expect("connect");
        waits.push(tokio::spawn(seconds_until_closed(
            stream,
            started,
            idle + SLACK,
        )));
    }
    let mut kept = TcpStream::connect(server.addr).await.expect("connect");
    kept.write_all(&get("/")).await.expect("send");
    let answer = read_answer(&mut kept, &mut Vec::new())
        .await
        .expect("answer");
    assert_eq!(answer.status, 200);
    let after_answer = Instant::now();
    let kept_closed = seconds_until_closed(kept, after_answer, idle + SLACK).await;
    let mut longest: f64 = 0.0;
    for wait in waits {
        longest = longest.max(wait.await.expect("task"));
    }
    println!(
        "idle: 50 fresh connections closed within {longest:.2}s, a keep-alive one {kept_closed:.2}s after its answer (idle_timeout {idle:?}); {} counted",
        server.metrics.idle_timeout.get()
    );
    assert_eq!(server.metrics.idle_timeout.get(), 51);
    server.stop().await;
}

#[tokio::test]
async fn slow_request_heads_are_cut_off_http1_and_http2() {
    let header = Duration::from_secs(1);
    let server = start(Limits {
        header_read_timeout: header,
        ..limits()
    })
    .await;
    // HTTP/1: a head that trickles in, a line every 300 ms, never finishing.
    let started = Instant::now();
    let mut h1 = TcpStream::connect(server.addr).await.expect("connect");
    h1.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n")
        .await
        .expect("send");
    let trickle = tokio::spawn(async move {
        for i in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if h1
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        h1
    });
    // HTTP/2: the preface, SETTINGS, and the first bytes of a HEADERS frame of 100 bytes.
    let mut h2 = TcpStream::connect(server.addr).await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x64\x01\x04\x00\x00\x00\x01\x82\x86")
        .await
        .expect("send");
    let h2_closed = seconds_until_closed(h2, started, header + SLACK).await;
    let h1 = trickle.await.expect("trickle");
    let h1_closed = seconds_until_closed(h1, started, header + SLACK).await;
    println!(
        "slow heads: HTTP/1 cut after {h1_closed:.2}s, HTTP/2 after {h2_closed:.2}s (header_read_timeout {header:?}, idle_timeout 30s)"
    );
    assert!(server.metrics.header_timeout.get() >= 1);
    server.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_an_idle_connection_makes_room_else_503() {
    let server = start(Limits {
        max_connections: 4,
        ..limits()
    })
    .await;
    let mut idle = Vec::new();
    // Twice the cap: the later ones make room for themselves by closing earlier ones.
    for _ in 0..8 {
        idle.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // Let the server take all four.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let served = request(server.addr, &get("/")).await;
    println!(
        "connection cap 4, 8 idle: a new client got {} in {:.3}s ({} evicted)",
        served.status,
        started.elapsed().as_secs_f64(),
        server.metrics.evicted_idle.get()
    );
    assert_eq!(served.status, 200);
    assert!(server.metrics.evicted_idle.get() >= 1);

    // Four busy connections: nothing to evict, so the next one is refused at once.
    drop(idle);
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(&get("/slow")).await.expect("send");
        busy.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let refused = request(server.addr, &get("/")).await;
    println!(
        "connection cap 4, 4 busy: a new client got {} in {:.3}s",
        refused.status,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.header("x-request-id").is_some());
    assert!(
        refused.body.contains(r#""code":"overloaded""#),
        "{}",
        refused.body
    );
    server.gate.add_permits(4);
    for mut stream in busy {
        let answer = read_answer(&mut stream, &mut Vec::new())
            .await
            .expect("answer");
        assert_eq!(answer.status, 200);
    }
    server.stop().await;
}

#[tokio::test]
async fn past_the_in_flight_cap_requests_get_503_at_once() {
    let server = start(Limits {
        max_in_flight: 2,
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(&get("/slow")).await.expect("send");
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let refused = request(
        server.addr,
        b"GET / HTTP/1.1\r\nHost: test\r\nX-Request-Id: mine-1\r\n\r\n",
    )
    .await;
    println!(
        "in-flight cap 2, 2 in progress: the third got {} in {:.3}s",
        refused.status,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("x-request-id"), Some("mine-1"));
    assert!(
        refused
            .body
            .starts_with(r#"{"error":{"code":"overloaded","message":"#)
    );
    assert_eq!(server.metrics.refused_request.get(), 1);
    server.gate.add_permits(2);
    for mut stream in held {
        assert_eq!(
            read_answer(&mut stream, &mut Vec::new())
                .await
                .expect("answer")
                .status,
            200
        );
    }
    // Capacity is back.
    assert_eq!(request(server.addr, &get("/")).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn an_announced_body_over_the_limit_is_413_before_it_is_sent() {
    let server = start(limits()).await;
    let started = Instant::now();
    let answer = request(
        server.addr,
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000000000\r\n\r\n",
    )
    .await;
    println!(
        "Content-Length 10^12: {} in {:.3}s",
        answer.status,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(answer.status, 413);
    assert!(answer.body.contains(r#""code":"payload_too_large""#));
    assert_eq!(answer.header("connection"), Some("close"));
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_body_fails_after_the_body_timeout() {
    let body = Duration::from_secs(1);
    let server = start(Limits {
        body_read_timeout: body,
        ..limits()
    })
    .await;
    let started = Instant::now();
    let answer = request(
        server.addr,
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc",
    )
    .await;
    println!(
        "body stalled after 3 of 10 bytes: {} after {:.2}s (body_read_timeout {body:?})",
        answer.status,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(answer.status, 408, "{}", answer.body);
    assert_eq!(server.metrics.body_timeout.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_answers_every_request_already_sent() {
    let server = start(limits()).await;
    let stop_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let answered = Arc::new(AtomicUsize::new(0));
    let closing = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (addr, stop_at, answered, closing) = (
            server.addr,
            stop_at.clone(),
            answered.clone(),
            closing.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let mut buffered = Vec::new();
            let mut lost = Vec::new();
            loop {
                let sent_at = Instant::now();
                if stream.write_all(&get("/work")).await.is_err() {
                    break;
                }
                match read_answer(&mut stream, &mut buffered).await {
                    Some(answer) => {
                        assert_eq!(answer.status, 200);
                        answered.fetch_add(1, Ordering::Relaxed);
                        if answer.header("connection") == Some("close") {
                            closing.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    None => {
                        // Lost, unless it was sent after the shutdown began.
                        if stop_at.get().is_none_or(|stop| sent_at < *stop) {
                            lost.push(sent_at);
                        }
                        break;
                    }
                }
            }
            lost.len()
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_at.set(Instant::now());
    let started = Instant::now();
    let stopped = server.stop().await;
    let stop_seconds = started.elapsed().as_secs_f64();
    let mut lost = 0;
    for client in clients {
        lost += client.await.expect("client");
    }
    println!(
        "shutdown under keep-alive traffic: {} answers, {} ended with Connection: close, {lost} lost, stopped in {stop_seconds:.2}s, {} cut",
        answered.load(Ordering::Relaxed),
        closing.load(Ordering::Relaxed),
        stopped.cut
    );
    assert_eq!(lost, 0);
    assert_eq!(stopped.cut, 0);
    assert!(closing.load(Ordering::Relaxed) > 0);
}
