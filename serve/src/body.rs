//! The bodies the server loop puts around a handler's: [`RequestBody`] fails a request body that
//! stalls for longer than `body_read_timeout`, and [`ResponseBody`] keeps a request counted (on
//! its connection, and against the in-flight cap) until its response has been sent or dropped.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use prometheus::IntCounter;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use crate::BoxError;
use crate::conn::ConnState;

/// The error a stalled request body ends with; handlers may look for it (`downcast_ref`) to
/// answer 408 rather than blame the upstream.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

impl fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request body stalled for longer than {}ms",
            self.0.as_millis()
        )
    }
}

impl StdError for BodyTimeout {}

/// A request body whose next frame must arrive within the body read timeout of the moment its
/// reader started waiting for it. The clock runs only while the reader waits on the client, not
/// while the reader is busy elsewhere (say, pushing the last frame upstream).
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    /// Allocated the first time the reader has to wait, then reset in place.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    timed_out: IntCounter,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration, timed_out: IntCounter) -> RequestBody {
        RequestBody {
            inner,
            timeout,
            sleep: None,
            armed: false,
            timed_out,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = Instant::now() + this.timeout;
                    match &mut this.sleep {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                let Some(sleep) = this.sleep.as_mut() else {
                    return Poll::Pending;
                };
                if sleep.as_mut().poll(cx).is_ready() {
                    this.armed = false;
                    this.timed_out.inc();
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts one request on its connection from the moment hyper hands it over until its response
/// is sent or dropped, and holds its in-flight permit as long.
pub(crate) struct RequestGuard {
    pub(crate) conn: Arc<ConnState>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.conn.request_finished();
    }
}

pin_project_lite::pin_project! {
    /// The handler's response body, or one of the server's own refusals.
    pub struct ResponseBody<B> {
        #[pin]
        inner: Either<B, Full<Bytes>>,
        guard: Option<RequestGuard>,
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn handler(inner: B, guard: RequestGuard) -> ResponseBody<B> {
        ResponseBody {
            inner: Either::Left(inner),
            guard: Some(guard),
        }
    }

    pub(crate) fn refusal(body: Full<Bytes>, guard: Option<RequestGuard>) -> ResponseBody<B> {
        ResponseBody {
            inner: Either::Right(body),
            guard,
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // Sent in full: the connection may count as idle from now on.
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
