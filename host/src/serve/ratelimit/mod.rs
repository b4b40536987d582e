//! Cost-weighted rate limits (GCRA) with reserve-then-refund, kept in process or in Redis.
//!
//! A `Quota` admits `burst` units at once and `per_second` units per second sustained; a
//! request reserves its cost (its fuel cap, or 1 for the request count) before running and
//! refunds what it did not use after.
//!
//! A request's quotas (requests, tokens, fuel) are reserved together, all or nothing, in one
//! step of the store ([`RateStore::reserve_all`]: one lock in process, one script call in Redis),
//! and refunded together in one step after the run: one round trip each way however many
//! quotas a tenant has.
//!
//! The algorithm is the generic cell rate algorithm: each key keeps one number, its
//! *theoretical arrival time* (TAT), the instant at which the quota would be full again. A unit
//! costs `1 / per_second` seconds of it; a reservation of `cost` units is admitted when the TAT
//! it would move to is at most `burst / per_second` seconds ahead of now. Refunding moves the TAT
//! back by the same amount, never below now (time already passed cannot be handed out twice).
//! [`governor`](https://docs.rs/governor) implements the same algorithm but has no refund, which
//! reserve-then-refund needs, so the dozen lines of arithmetic live here ([`gcra_reserve`],
//! [`gcra_refund`]) and the Redis script repeats them in Lua.
//!
//! Times are microseconds: Redis's `TIME` gives microseconds and Lua's numbers are doubles,
//! which hold every microsecond since the epoch exactly.
//!
//! The arithmetic is [`gcra`] (shared with the per-peer limits of `peers.rs`); [`memory_store`]
//! keeps its state in this process and [`redis_store`] in Redis (the same arithmetic as a Lua script,
//! `gcra.lua`); [`Limiter`] is what the server holds: a store, the fail policy, and the local
//! fallback.

mod gcra;
mod memory_store;
mod redis_store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub(crate) use gcra::{gcra_reserve, monotonic_clock, Clock};
use memory_store::MemoryStore;
use redis_store::RedisStore;
pub use redis_store::{REDIS_RECONNECT_BACKOFF, REDIS_TIMEOUT};

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

impl Decision {
    /// Whether the reservation was made.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

/// One quota a request is charged: the key of its bucket, the quota, and the units.
#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    pub key: String,
    pub quota: Quota,
    pub cost: u64,
}

impl Charge {
    pub fn new(key: impl Into<String>, quota: Quota, cost: u64) -> Charge {
        Charge {
            key: key.into(),
            quota,
            cost,
        }
    }
}

/// Whether every decision of an all-or-nothing reservation admitted (and so was reserved).
pub fn all_allowed(decisions: &[Decision]) -> bool {
    decisions.iter().all(Decision::is_allowed)
}

/// The shared store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("rate-limit backend unreachable: {0}")]
    Unreachable(String),
    /// The backend refused this server's credentials (or it has none and the backend needs
    /// some): a configuration error, so the server does not start, whatever the fail policy.
    #[error("rate-limit backend refused the server's credentials: {0}")]
    Credentials(String),
}

/// Where the GCRA state lives (one theoretical arrival time per key).
#[async_trait::async_trait]
pub trait RateStore: Send + Sync + 'static {
    /// Reserve every charge (distinct keys) or none, atomically: one decision per charge, in
    /// order. When any is `Limited` nothing was reserved, and the `Allowed` ones report what
    /// is left without this request.
    async fn reserve_all(&self, charges: &[Charge]) -> Result<Vec<Decision>, BackendError>;
    /// Give back each charge's units, reserved earlier (never more than its quota's burst).
    async fn refund_all(&self, charges: &[Charge]) -> Result<(), BackendError>;
    /// `memory` or `redis`, for metrics and logs.
    fn name(&self) -> &'static str;
}

/// Where the limiter keeps its state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process: each replica enforces its own copy of every quota.
    #[default]
    Memory,
    /// In Redis: every replica pointed at the same Redis enforces one quota.
    Redis,
}

/// What a reservation answers when the shared backend cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    /// Refuse (the server answers 503): no tenant can exceed its quota, at the price of
    /// availability while Redis is down.
    #[default]
    Closed,
    /// Fall back to a limiter in this process: requests keep flowing, each replica enforcing the
    /// quota on its own (so N replicas admit up to N times the quota until Redis is back).
    Open,
}

/// The prefix of every key the limiter writes, so that several deployments can share a Redis.
pub const DEFAULT_KEY_PREFIX: &str = "wasm-infer";

/// Where a secret is read from at start, so that the configuration file never holds it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretSource {
    /// An environment variable of the server process.
    Env(String),
    /// A file (one line; a trailing newline is not part of the secret).
    File(std::path::PathBuf),
}

/// The longest secret read from a file or the environment (Redis passwords are far shorter;
/// this bounds what a misconfigured path, e.g. a log file, makes the server read).
pub const MAX_SECRET_BYTES: u64 = 4096;

impl SecretSource {
    /// Reads the secret. Errors name where it was looked for, never its content.
    pub fn read(&self) -> Result<String, String> {
        let (value, place) = match self {
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(value) => (value, format!("environment variable {name}")),
                Err(std::env::VarError::NotPresent) => {
                    return Err(format!("environment variable {name} is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("environment variable {name} is not UTF-8"))
                }
            },
            SecretSource::File(path) => {
                use std::io::Read;
                let place = format!("file {}", path.display());
                let file = std::fs::File::open(path).map_err(|e| format!("{place}: {e}"))?;
                let mut bytes = Vec::new();
                file.take(MAX_SECRET_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("{place}: {e}"))?;
                if bytes.len() as u64 > MAX_SECRET_BYTES {
                    return Err(format!("{place} is longer than {MAX_SECRET_BYTES} bytes"));
                }
                let value =
                    String::from_utf8(bytes).map_err(|_| format!("{place} is not UTF-8"))?;
                (value, place)
            }
        };
        let value = value.strip_suffix('\n').unwrap_or(&value);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.is_empty() {
            return Err(format!("{place} is empty"));
        }
        if value.len() as u64 > MAX_SECRET_BYTES {
            return Err(format!("{place} is longer than {MAX_SECRET_BYTES} bytes"));
        }
        Ok(value.to_string())
    }
}

/// The `[rate_limit]` table of serve.toml.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `memory` (default) or `redis`.
    pub backend: Backend,
    /// `redis://host:port/db` (required with `backend = "redis"`). It may name a user but
    /// never holds the password (refused at start): that is `redis_password`.
    pub redis_url: Option<String>,
    /// Where the Redis password is read from at start: `{ env = "NAME" }` or
    /// `{ file = "/path" }` (e.g. a mounted Kubernetes Secret). Never the password itself.
    pub redis_password: Option<SecretSource>,
    /// `closed` (default) or `open`.
    pub on_backend_error: FailPolicy,
    /// Keys are `{key_prefix}:rl:{tenant}:{limit}`; default `wasm-infer`.
    pub key_prefix: String,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            backend: Backend::Memory,
            redis_url: None,
            redis_password: None,
            on_backend_error: FailPolicy::Closed,
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
        }
    }
}

fn unreachable(error: impl std::fmt::Display) -> BackendError {
    BackendError::Unreachable(error.to_string())
}

/// The server's rate limiter: a store, the fail policy, and the local fallback.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    store: Arc<dyn RateStore>,
    /// Used when `store` fails and the policy is `open`.
    fallback: MemoryStore,
    policy: FailPolicy,
    key_prefix: String,
    backend_failures: AtomicU64,
    /// Whether the last call to the backend failed: the warning is logged when it starts failing
    /// (not once per request while it is down), and an info line when it answers again.
    failing: AtomicBool,
}

impl Limiter {
    /// A limiter as configured. `memory` never fails.
    pub async fn new(config: &RateLimitConfig) -> Result<Limiter, BackendError> {
        let store: Arc<dyn RateStore> = match config.backend {
            Backend::Memory => Arc::new(MemoryStore::new()),
            Backend::Redis => {
                let url = config.redis_url.as_deref().ok_or_else(|| {
                    unreachable("rate_limit.backend = \"redis\" needs rate_limit.redis_url")
                })?;
                let password = match &config.redis_password {
                    Some(source) => Some(source.read().map_err(|why| {
                        BackendError::Credentials(format!("rate_limit.redis_password: {why}"))
                    })?),
                    None => None,
                };
                let password = password.as_deref();
                match config.on_backend_error {
                    FailPolicy::Closed => Arc::new(RedisStore::connect(url, password).await?),
                    // Fail-open serves from the local limiter until Redis is up: starting is
                    // no different from Redis going down later. Wrong credentials are not an
                    // outage: they stop the start under either policy.
                    FailPolicy::Open => {
                        let store = RedisStore::lazy(url, password)?;
                        match store.check().await {
                            Err(error @ BackendError::Credentials(_)) => return Err(error),
                            Err(error) => tracing::warn!(
                                %error,
                                "rate-limit backend down at start; failing open"
                            ),
                            Ok(()) => {}
                        }
                        Arc::new(store)
                    }
                }
            }
        };
        Ok(Limiter::with_store(store, config))
    }

    /// A limiter over any store (tests, or a store built elsewhere).
    pub fn with_store(store: Arc<dyn RateStore>, config: &RateLimitConfig) -> Limiter {
        Limiter {
            inner: Arc::new(LimiterInner {
                store,
                fallback: MemoryStore::new(),
                policy: config.on_backend_error,
                key_prefix: config.key_prefix.clone(),
                backend_failures: AtomicU64::new(0),
                failing: AtomicBool::new(false),
            }),
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}:rl:{}", self.inner.key_prefix, key)
    }

    fn record_failure(&self, action: &str, key: &str, error: &BackendError) {
        let failures = self.inner.backend_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let backend = self.inner.store.name();
        let policy = self.inner.policy;
        if !self.inner.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(backend, ?policy, action, key, failures, %error, "rate-limit backend failed");
        } else {
            tracing::debug!(backend, ?policy, action, key, failures, %error, "rate-limit backend failed");
        }
    }

    fn record_success(&self) {
        if self.inner.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(
                backend = self.inner.store.name(),
                failures = self.backend_failures(),
                "rate-limit backend answers again"
            );
        }
    }

    /// Reserve `cost` units of `quota` for `key` (`"{tenant}:{limit}"`): [`Limiter::reserve_all`]
    /// of one charge.
    pub async fn reserve(
        &self,
        key: &str,
        quota: Quota,
        cost: u64,
    ) -> Result<Decision, BackendError> {
        let mut decisions = self.reserve_all(&[Charge::new(key, quota, cost)]).await?;
        Ok(decisions.pop().expect("one decision per charge"))
    }

    /// Reserve every charge (keys `"{tenant}:{limit}"`, distinct) or none, in one step of the
    /// store: one decision per charge (see [`RateStore::reserve_all`]). With fail-open a
    /// backend failure is answered by the in-process limiter; with fail-closed it is returned.
    pub async fn reserve_all(&self, charges: &[Charge]) -> Result<Vec<Decision>, BackendError> {
        if charges.is_empty() {
            return Ok(Vec::new());
        }
        let charges = self.full_keys(charges);
        match self.inner.store.reserve_all(&charges).await {
            Ok(decisions) => {
                self.record_success();
                Ok(decisions)
            }
            Err(error) => {
                self.record_failure("reserve", &charges[0].key, &error);
                match self.inner.policy {
                    FailPolicy::Closed => Err(error),
                    FailPolicy::Open => Ok(self.inner.fallback.reserve_all_now(&charges)),
                }
            }
        }
    }

    /// Give back `cost` units of an earlier reservation: [`Limiter::refund_all`] of one charge.
    pub async fn refund(&self, key: &str, quota: Quota, cost: u64) {
        self.refund_all(&[Charge::new(key, quota, cost)]).await
    }

    /// Give back each charge's units in one step of the store (charges of nothing are left
    /// out; none left, no call). A failure is logged and counted: the units stay spent until
    /// the quota refills on its own.
    pub async fn refund_all(&self, charges: &[Charge]) {
        let charges: Vec<Charge> = self
            .full_keys(charges)
            .into_iter()
            .filter(|charge| charge.cost > 0)
            .collect();
        if charges.is_empty() {
            return;
        }
        match self.inner.store.refund_all(&charges).await {
            Ok(()) => self.record_success(),
            Err(error) => {
                self.record_failure("refund", &charges[0].key, &error);
                if self.inner.policy == FailPolicy::Open {
                    // The reservation was likely answered by the fallback too; a refund of a
                    // key the fallback does not hold changes nothing.
                    self.inner.fallback.refund_all_now(&charges);
                }
            }
        }
    }

    fn full_keys(&self, charges: &[Charge]) -> Vec<Charge> {
        charges
            .iter()
            .map(|charge| Charge {
                key: self.full_key(&charge.key),
                ..*charge
            })
            .collect()
    }

    /// Reservations and refunds the backend failed to answer since start.
    pub fn backend_failures(&self) -> u64 {
        self.inner.backend_failures.load(Ordering::Relaxed)
    }

    /// `memory` or `redis`.
    pub fn backend(&self) -> &'static str {
        self.inner.store.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_PER_SECOND_BURST_5: Quota = Quota {
        per_second: 10.0,
        burst: 5,
    };

    struct Down;

    #[async_trait::async_trait]
    impl RateStore for Down {
        async fn reserve_all(&self, _: &[Charge]) -> Result<Vec<Decision>, BackendError> {
            Err(BackendError::Unreachable("down".into()))
        }
        async fn refund_all(&self, _: &[Charge]) -> Result<(), BackendError> {
            Err(BackendError::Unreachable("down".into()))
        }
        fn name(&self) -> &'static str {
            "redis"
        }
    }

    fn run<F: std::future::Future>(future: F) -> F::Output {
        futures::executor::block_on(future)
    }

    #[test]
    fn fail_closed_returns_the_error_and_counts_it() {
        let limiter = Limiter::with_store(Arc::new(Down), &RateLimitConfig::default());
        assert!(run(limiter.reserve("t:requests", TEN_PER_SECOND_BURST_5, 1)).is_err());
        run(limiter.refund("t:requests", TEN_PER_SECOND_BURST_5, 1));
        assert_eq!(limiter.backend_failures(), 2);
        assert_eq!(limiter.backend(), "redis");
    }

    #[test]
    fn fail_open_answers_from_the_local_limiter() {
        let config = RateLimitConfig {
            on_backend_error: FailPolicy::Open,
            ..RateLimitConfig::default()
        };
        let limiter = Limiter::with_store(Arc::new(Down), &config);
        for _ in 0..5 {
            assert!(
                run(limiter.reserve("t:requests", TEN_PER_SECOND_BURST_5, 1))
                    .unwrap()
                    .is_allowed()
            );
        }
        assert!(
            !run(limiter.reserve("t:requests", TEN_PER_SECOND_BURST_5, 1))
                .unwrap()
                .is_allowed()
        );
        assert_eq!(limiter.backend_failures(), 6);
    }

    #[test]
    fn the_memory_limiter_prefixes_keys_per_tenant_and_limit() {
        let limiter = run(Limiter::new(&RateLimitConfig::default())).unwrap();
        assert_eq!(limiter.backend(), "memory");
        assert_eq!(limiter.full_key("acme:fuel"), "wasm-infer:rl:acme:fuel");
        for _ in 0..5 {
            assert!(
                run(limiter.reserve("acme:requests", TEN_PER_SECOND_BURST_5, 1))
                    .unwrap()
                    .is_allowed()
            );
        }
        assert!(
            !run(limiter.reserve("acme:requests", TEN_PER_SECOND_BURST_5, 1))
                .unwrap()
                .is_allowed()
        );
        // Another tenant's quota is its own.
        assert!(
            run(limiter.reserve("other:requests", TEN_PER_SECOND_BURST_5, 1))
                .unwrap()
                .is_allowed()
        );
        assert_eq!(limiter.backend_failures(), 0);
    }

    #[test]
    fn config_defaults_and_refuses_unknown_fields() {
        let config: RateLimitConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, RateLimitConfig::default());
        assert_eq!(config.key_prefix, "wasm-infer");
        let config: RateLimitConfig = serde_json::from_str(
            r#"{"backend":"redis","redis_url":"redis://127.0.0.1:6379","on_backend_error":"open"}"#,
        )
        .unwrap();
        assert_eq!(config.backend, Backend::Redis);
        assert_eq!(config.on_backend_error, FailPolicy::Open);
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"backnd":"redis"}"#).is_err());
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"backend":"etcd"}"#).is_err());
    }
}
