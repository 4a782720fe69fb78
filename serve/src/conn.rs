//! One client connection: what it is doing ([`ConnState`], kept up to date by the request
//! guards and by [`Tracked`], its socket), and the watchdog that closes it when it idles, when a
//! request head trickles in too slowly, when it is evicted to make room, or at shutdown.
//!
//! hyper's own HTTP/1 `header_read_timeout` is not used: it also runs while a keep-alive
//! connection waits for its next request, which would make the idle timeout and the header
//! timeout one setting, and it does not exist for HTTP/2.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// After the server decides to close a connection gently (`graceful_shutdown`: HTTP/1 closes
/// once idle, HTTP/2 sends GOAWAY), how long a connection with no request in progress may take
/// to go before it is dropped.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// At shutdown, how long an idle connection is left alone first, so that a request whose bytes
/// were already on their way (or not yet noticed by the reactor) is read and answered.
pub(crate) const SHUTDOWN_SETTLE: Duration = Duration::from_millis(100);
/// How often a connection is looked at while the server shuts down.
pub(crate) const SHUTDOWN_TICK: Duration = Duration::from_millis(50);

/// What one connection is doing, shared by its watchdog, its socket and its requests' guards.
/// Times are milliseconds since the server's epoch plus one, so that 0 means "never".
pub(crate) struct ConnState {
    epoch: Instant,
    /// Requests handed to the handler whose response has not been sent (or dropped) yet.
    pub(crate) active: AtomicUsize,
    /// When `active` last fell to zero (or the connection opened).
    idle_since: AtomicU64,
    /// When bytes arrived while no request was in progress: a request head is on its way (or,
    /// on HTTP/2, any frame). Cleared when the request reaches the handler.
    head_started: AtomicU64,
    evicting: AtomicBool,
    pub(crate) evict: Notify,
}

impl ConnState {
    pub(crate) fn new(epoch: Instant) -> ConnState {
        let state = ConnState {
            epoch,
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
        };
        state.idle_since.store(state.now(), Ordering::Relaxed);
        state
    }

    fn now(&self) -> u64 {
        self.stamp(Instant::now())
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_millis(stamp.saturating_sub(1))
    }

    pub(crate) fn request_started(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Relaxed);
    }

    pub(crate) fn request_finished(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.now(), Ordering::Relaxed);
        }
    }

    fn bytes_arrived(&self) {
        if self.active.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(self.now(), Ordering::Relaxed);
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0
    }

    /// The eviction order: idle connections before ones whose head trickles in, the longest
    /// idle (or slowest) first; `None` when it is busy or already going.
    pub(crate) fn eviction_rank(&self) -> Option<(bool, u64)> {
        if !self.is_idle() || self.evicting.load(Ordering::Relaxed) {
            return None;
        }
        match self.head_started.load(Ordering::Relaxed) {
            0 => Some((false, self.idle_since.load(Ordering::Relaxed))),
            started => Some((true, started)),
        }
    }

    pub(crate) fn start_eviction(&self) {
        self.evicting.store(true, Ordering::Relaxed);
        self.evict.notify_one();
    }

    /// What the watchdog does now. `closing` is when the connection was asked to close gently.
    pub(crate) fn verdict(
        &self,
        now: Instant,
        limits: &crate::Limits,
        stopping: bool,
        closing: Option<Instant>,
    ) -> Verdict {
        let active = self.active.load(Ordering::Acquire);
        if let Some(closing) = closing {
            if active == 0 && now >= closing + CLOSE_WAIT {
                return Verdict::Drop(Why::Lingered);
            }
            return Verdict::Check(now + if stopping { SHUTDOWN_TICK } else { CLOSE_WAIT });
        }
        let every = if stopping {
            SHUTDOWN_TICK
        } else {
            limits.idle_timeout.min(limits.header_read_timeout)
        };
        if active > 0 {
            // A request is in progress; at shutdown its answer is the last on this connection.
            return if stopping {
                Verdict::Close(Why::Shutdown)
            } else {
                Verdict::Check(now + every)
            };
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != 0 {
            // Wait for the head (also at shutdown: it may be a request sent before SIGTERM).
            let deadline = self.at(head) + limits.header_read_timeout;
            return if now >= deadline {
                Verdict::Drop(Why::HeaderTimeout)
            } else {
                Verdict::Check(deadline.min(now + every))
            };
        }
        if stopping {
            return Verdict::Close(Why::Shutdown);
        }
        let deadline = self.at(self.idle_since.load(Ordering::Relaxed)) + limits.idle_timeout;
        if now >= deadline {
            Verdict::Close(Why::Idle)
        } else {
            Verdict::Check(deadline.min(now + every))
        }
    }

    /// What an eviction does to this connection: a trickling head is cut, an idle one closed.
    pub(crate) fn eviction(&self) -> Verdict {
        if self.head_started.load(Ordering::Relaxed) != 0 {
            Verdict::Drop(Why::Evicted)
        } else {
            Verdict::Close(Why::Evicted)
        }
    }

    #[cfg(test)]
    fn set_head_started(&self, at: Instant) {
        self.head_started.store(self.stamp(at), Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Idle,
    HeaderTimeout,
    Evicted,
    Shutdown,
    /// Asked to close, it did not (say, an HTTP/2 client that keeps a half-sent stream).
    Lingered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Look again at this instant.
    Check(Instant),
    /// `graceful_shutdown`: HTTP/1 closes when idle (or after the answer in progress, with
    /// `Connection: close`), HTTP/2 sends GOAWAY and lets open streams finish.
    Close(Why),
    /// Drop the connection now: nothing is being answered on it.
    Drop(Why),
}

/// A client socket that tells its [`ConnState`] when bytes arrive.
pub(crate) struct Tracked {
    pub(crate) stream: TcpStream,
    pub(crate) state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;

    fn limits() -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            ..Limits::default()
        }
    }

    #[test]
    fn watchdog_verdicts() {
        let epoch = Instant::now();
        let limits = limits();
        let s = |secs: u64| epoch + Duration::from_secs(secs);
        let state = ConnState::new(epoch);
        // Fresh and idle: looked at again before a trickling head could outlast its timeout.
        assert_eq!(
            state.verdict(s(1), &limits, false, None),
            Verdict::Check(s(11))
        );
        assert_eq!(
            state.verdict(s(60), &limits, false, None),
            Verdict::Close(Why::Idle)
        );
        assert_eq!(
            state.verdict(s(1), &limits, true, None),
            Verdict::Close(Why::Shutdown)
        );
        // Bytes of a head arrived at 5 s.
        state.set_head_started(s(5));
        assert_eq!(
            state.verdict(s(6), &limits, false, None),
            Verdict::Check(s(15))
        );
        assert_eq!(
            state.verdict(s(15), &limits, false, None),
            Verdict::Drop(Why::HeaderTimeout)
        );
        assert_eq!(
            state.verdict(s(6), &limits, true, None),
            Verdict::Check(s(6) + SHUTDOWN_TICK)
        );
        assert_eq!(state.eviction(), Verdict::Drop(Why::Evicted));
        // The request arrived: no timeout applies while it is answered.
        state.request_started();
        assert_eq!(state.eviction_rank(), None);
        assert_eq!(
            state.verdict(s(100), &limits, false, None),
            Verdict::Check(s(110))
        );
        assert_eq!(
            state.verdict(s(100), &limits, true, None),
            Verdict::Close(Why::Shutdown)
        );
        assert_eq!(
            state.verdict(s(100), &limits, true, Some(s(99))),
            Verdict::Check(s(100) + SHUTDOWN_TICK)
        );
        state.request_finished();
        assert_eq!(state.eviction(), Verdict::Close(Why::Evicted));
        assert!(state.eviction_rank().is_some());
        assert_eq!(
            state.verdict(s(100) + CLOSE_WAIT, &limits, true, Some(s(100))),
            Verdict::Drop(Why::Lingered)
        );
    }
}
