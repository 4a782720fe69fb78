//! Settles that could not reach Redis in time, retried in the background until they land: a
//! refund (or a reserved upload's commit) is never dropped because one call timed out under a
//! burst. Exactly once still holds — `settle.lua` acts on the request's marker once — and it is
//! given up only when the marker itself has expired (the settle window after the app answered),
//! because then nothing is left to give back. The shutdown sequence waits for what is pending
//! (`flush`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::routes::Quota;
use crate::store::{SettleInput, Store};

/// A settle that owns what it needs to be retried later.
pub struct PendingSettle {
    pub refund: bool,
    pub user: Uuid,
    pub settle_id: String,
    pub quota: Arc<Quota>,
    pub decided_ms: i64,
    pub actual: u64,
    pub marker_ttl_ms: u64,
    /// After this the marker has expired and there is nothing left to settle.
    pub deadline: Instant,
}

impl PendingSettle {
    fn input(&self) -> SettleInput<'_> {
        SettleInput {
            refund: self.refund,
            user: self.user,
            settle_id: &self.settle_id,
            quota: &self.quota,
            decided_ms: self.decided_ms,
            actual: self.actual,
            marker_ttl_ms: self.marker_ttl_ms,
        }
    }
}

pub struct Refunds {
    store: Store,
    metrics: Arc<Metrics>,
    pending: AtomicUsize,
    idle: Notify,
}

impl Refunds {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Refunds {
        Refunds {
            store,
            metrics,
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Retries `settle` in the background with backoff until it lands or its marker expires.
    pub fn retry(self: &Arc<Self>, settle: PendingSettle) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.metrics.refunds_pending.inc();
        let this = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(20);
            let landed = loop {
                tokio::time::sleep(wait).await;
                match this.store.settle(&settle.input()).await {
                    Ok(_) => break true,
                    Err(e) if e.is_transient() && Instant::now() + wait < settle.deadline => {
                        this.metrics.redis_errors.with_label_values(&[e.op]).inc();
                        tracing::debug!(error = %e, user = %settle.user, "settle not landed yet; retrying");
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => {
                        this.metrics.redis_errors.with_label_values(&[e.op]).inc();
                        tracing::error!(error = %e, user = %settle.user, refund = settle.refund, "settle given up: the charge stands");
                        break false;
                    }
                }
            };
            if !landed {
                this.metrics.refunds_given_up.inc();
            }
            this.metrics.refunds_pending.dec();
            if this.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                this.idle.notify_waiters();
            }
        });
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Waits until nothing is pending, or `grace` has passed; returns what is still pending.
    pub async fn flush(&self, grace: Duration) -> usize {
        let until = tokio::time::Instant::now() + grace;
        loop {
            let idle = self.idle.notified();
            if self.pending() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                return self.pending();
            }
        }
    }
}
