//! Out of file descriptors (EMFILE), the accept loop pauses and counts instead of spinning, and
//! serves again once descriptors are free. A test binary of its own: it lowers the process's
//! open-files limit.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use rlimit::Resource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_serve::{Limits, ListenerMetrics, RequestBody};

#[tokio::test]
async fn out_of_descriptors_accept_pauses_instead_of_spinning() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = ListenerMetrics::unregistered("test");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tollgate_serve::serve(
        listener,
        "test",
        Limits::default(),
        metrics.clone(),
        |_request: Request<RequestBody>, _peer| async {
            Response::new(Full::new(Bytes::from_static(b"ok")))
        },
        async move {
            let _ = stopped.await;
        },
    ));

    // Room for a few dozen more descriptors, then clients until the process has none left:
    // the last connections wait in the listener's backlog, which the server cannot accept.
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count()) as u64;
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).expect("getrlimit");
    rlimit::setrlimit(Resource::NOFILE, open + 40, hard).expect("setrlimit");
    let mut clients = Vec::new();
    while clients.len() < 200 {
        match TcpStream::connect(addr).await {
            Ok(stream) => clients.push(stream),
            Err(_) => break,
        }
    }
    let watched = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors = metrics.fd_exhausted.get();
    println!(
        "EMFILE: {} clients connected, {errors} failed accepts in {:.1}s (a busy loop makes thousands)",
        clients.len(),
        watched.elapsed().as_secs_f64()
    );
    assert!(errors >= 1, "the server never ran out");
    assert!(errors <= 50, "{errors} accept errors in 2 s: not pausing");

    // Descriptors back: the waiting connections are accepted and served.
    rlimit::setrlimit(Resource::NOFILE, soft, hard).expect("setrlimit");
    let mut last = clients.pop().expect("a client");
    last.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("send");
    let mut answer = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), last.read(&mut answer))
        .await
        .expect("answered once descriptors are free")
        .expect("read");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &answer[..n]
    );
    drop(clients);
    let _ = stop.send(());
    server.await.expect("server");
}
