//! `serve_on`: the accepted connections are dealt to the workers in turn, each connection's
//! requests are answered on its worker's runtime (its thread), and shutdown still answers what
//! every worker received.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_serve::{Limits, ListenerMetrics, RequestBody, Worker};

/// A current-thread runtime on a named thread of its own, as the sidecar's workers.
fn worker_runtime(name: &str) -> (tokio::runtime::Handle, std::sync::mpsc::Sender<()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handle = runtime.handle().clone();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(async {
                // Park until told to stop, without blocking this runtime's thread.
                while stopped.try_recv().is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .expect("thread");
    (handle, stop)
}

/// One `GET` on a connection of its own: the body, which names the thread that answered.
async fn answered_by(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let raw = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(raw.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn connections_are_dealt_to_every_worker_and_answered_on_its_thread() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (one, stop_one) = worker_runtime("worker-one");
    let (two, stop_two) = worker_runtime("worker-two");
    let handler = |request: Request<RequestBody>, _peer: SocketAddr| async move {
        if request.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        Response::new(Full::new(Bytes::from(thread)))
    };
    let workers = vec![
        Worker {
            runtime: None,
            handler,
        },
        Worker {
            runtime: Some(one),
            handler,
        },
        Worker {
            runtime: Some(two),
            handler,
        },
    ];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tollgate_serve::serve_on(
        listener,
        "test",
        Limits::default(),
        ListenerMetrics::unregistered("test"),
        workers,
        async move {
            let _ = stopped.await;
        },
    ));
    let here = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();

    let mut by_thread = BTreeMap::<String, usize>::new();
    for _ in 0..9 {
        *by_thread.entry(answered_by(addr, "/").await).or_default() += 1;
    }
    let expected = BTreeMap::from([
        (here.clone(), 3),
        ("worker-one".to_owned(), 3),
        ("worker-two".to_owned(), 3),
    ]);
    assert_eq!(by_thread, expected, "connections dealt in turn");

    // Shutdown while a request is in progress on each worker: every one is answered.
    let slow: Vec<_> = (0..3)
        .map(|_| tokio::spawn(answered_by(addr, "/slow")))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop.send(());
    let mut answered = Vec::new();
    for call in slow {
        answered.push(call.await.expect("the slow call"));
    }
    answered.sort();
    let mut all = vec![here, "worker-one".to_owned(), "worker-two".to_owned()];
    all.sort();
    assert_eq!(answered, all, "each worker answered its slow call");
    let stopped = server.await.expect("server task");
    assert_eq!(stopped.cut, 0, "nothing cut at shutdown");
    let _ = stop_one.send(());
    let _ = stop_two.send(());
}
