//! Cost-weighted rate limits (GCRA) with reserve-then-refund, kept in process or in Redis.
//!
//! Interface agreed between the server (routes, tenants) and the limiter; the bodies are
//! being written. A `Quota` admits `burst` units at once and `per_second` units per second
//! sustained; a request reserves its cost (its fuel cap, or 1 for the request count) before
//! running and refunds what it did not use after.

use std::time::Duration;

/// A GCRA quota: `burst` units at once, `per_second` units per second sustained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quota {
    pub per_second: f64,
    pub burst: u64,
}

/// The answer to a reservation.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Reserved. `remaining` units could still be reserved now; `reset` is how long until the
    /// quota is full again.
    Allowed { remaining: u64, reset: Duration },
    /// Refused, nothing reserved. `retry_after` is how long until `cost` would fit (`None`
    /// when `cost` exceeds the burst and never fits).
    Limited {
        retry_after: Option<Duration>,
        remaining: u64,
        reset: Duration,
    },
}

/// The shared store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("rate-limit backend unreachable: {0}")]
    Unreachable(String),
}

/// Where the GCRA state lives (one theoretical arrival time per key).
#[async_trait::async_trait]
pub trait RateStore: Send + Sync + 'static {
    /// Reserve `cost` units of `quota` under `key`, or refuse without reserving.
    async fn reserve(&self, key: &str, quota: Quota, cost: u64) -> Result<Decision, BackendError>;
    /// Give back `cost` units reserved earlier (never more than the quota's burst).
    async fn refund(&self, key: &str, quota: Quota, cost: u64) -> Result<(), BackendError>;
    /// `memory` or `redis`, for metrics and logs.
    fn name(&self) -> &'static str;
}
