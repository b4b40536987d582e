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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

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

const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// Comparisons of accumulated TATs allow this much rounding (in microseconds): `burst` single
/// units of a quota whose period is not a whole number of microseconds (3/s: 333333.33 µs) add
/// up to the tolerance give or take a last bit, and must all be admitted.
const ROUNDING_SLACK_MICROS: f64 = 1e-3;

/// How long one unit of `quota` occupies, in microseconds.
fn unit_micros(quota: Quota) -> f64 {
    MICROS_PER_SECOND / quota.per_second
}

fn micros_to_duration(micros: f64) -> Duration {
    if micros <= ROUNDING_SLACK_MICROS {
        Duration::ZERO
    } else {
        Duration::from_micros((micros - ROUNDING_SLACK_MICROS).ceil() as u64)
    }
}

/// Units that fit now when the TAT is `ahead` microseconds past now.
fn remaining_units(quota: Quota, ahead: f64) -> u64 {
    let tolerance = quota.burst as f64 * unit_micros(quota);
    // A millionth of a unit of slack: enough for the rounding of accumulated TATs, never a
    // whole unit even when a unit is a nanosecond of a fuel quota.
    let free = ((tolerance - ahead) / unit_micros(quota) + 1e-6).floor();
    (free.max(0.0) as u64).min(quota.burst)
}

/// One GCRA reservation: from the stored TAT (`None`: a new or expired key) and now, the
/// decision and, when admitted, the TAT to store.
pub fn gcra_reserve(
    quota: Quota,
    tat: Option<f64>,
    now: f64,
    cost: u64,
) -> (Decision, Option<f64>) {
    let unit = unit_micros(quota);
    let tolerance = quota.burst as f64 * unit;
    let tat = tat.map_or(now, |tat| tat.max(now));
    let new_tat = tat + cost as f64 * unit;
    let over = new_tat - now - tolerance;
    if over > ROUNDING_SLACK_MICROS {
        let retry_after = (cost <= quota.burst).then(|| micros_to_duration(over));
        let decision = Decision::Limited {
            retry_after,
            remaining: remaining_units(quota, tat - now),
            reset: micros_to_duration(tat - now),
        };
        (decision, None)
    } else {
        let decision = Decision::Allowed {
            remaining: remaining_units(quota, new_tat - now),
            reset: micros_to_duration(new_tat - now),
        };
        (decision, Some(new_tat))
    }
}

/// One GCRA refund: the TAT to store (`None`: the quota is full, the key can go).
pub fn gcra_refund(quota: Quota, tat: Option<f64>, now: f64, cost: u64) -> Option<f64> {
    let unit = unit_micros(quota);
    let refunded = tat? - cost.min(quota.burst) as f64 * unit;
    (refunded > now + ROUNDING_SLACK_MICROS).then_some(refunded)
}

/// A source of microseconds (monotonic for the in-process store; tests inject their own).
pub type Clock = Arc<dyn Fn() -> f64 + Send + Sync>;

/// A clock in microseconds since it was made.
pub fn monotonic_clock() -> Clock {
    let start = Instant::now();
    Arc::new(move || start.elapsed().as_micros() as f64)
}

/// Below this many keys the in-process store never sweeps; above, it sweeps when the map has
/// doubled since the last sweep, so sweeping costs O(1) per reservation amortised.
const SWEEP_MIN_KEYS: usize = 1024;

/// The GCRA state in this process.
pub struct MemoryStore {
    clock: Clock,
    state: Mutex<MemoryState>,
}

struct MemoryState {
    tats: HashMap<String, f64>,
    sweep_at: usize,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::with_clock(monotonic_clock())
    }

    pub fn with_clock(clock: Clock) -> MemoryStore {
        MemoryStore {
            clock,
            state: Mutex::new(MemoryState {
                tats: HashMap::new(),
                sweep_at: SWEEP_MIN_KEYS,
            }),
        }
    }

    /// Keys held (a full quota holds none once swept).
    pub fn len(&self) -> usize {
        self.lock().tats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // The state is a map of plain numbers, valid after any panic in another holder.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    fn reserve_now(&self, key: &str, quota: Quota, cost: u64) -> Decision {
        let mut decisions = self.reserve_all_now(&[Charge::new(key, quota, cost)]);
        decisions.pop().expect("one decision per charge")
    }

    /// [`RateStore::reserve_all`] under one lock: every charge decided against the same now,
    /// stored only when all admit.
    fn reserve_all_now(&self, charges: &[Charge]) -> Vec<Decision> {
        let now = (self.clock)();
        let mut state = self.lock();
        let decided: Vec<(Decision, Option<f64>)> = charges
            .iter()
            .map(|c| gcra_reserve(c.quota, state.tats.get(&c.key).copied(), now, c.cost))
            .collect();
        let admitted = decided.iter().all(|(decision, _)| decision.is_allowed());
        let decisions = decided
            .into_iter()
            .zip(charges)
            .map(|((decision, new_tat), charge)| match new_tat {
                Some(new_tat) if admitted => {
                    state.tats.insert(charge.key.clone(), new_tat);
                    decision
                }
                // Admitted alone but not reserved: what is left now, as a reservation of
                // nothing answers it.
                Some(_) => {
                    let tat = state.tats.get(&charge.key).copied();
                    gcra_reserve(charge.quota, tat, now, 0).0
                }
                None => decision,
            })
            .collect();
        if state.tats.len() >= state.sweep_at {
            // Idle keys (TAT in the past: the quota is full) carry no information.
            state.tats.retain(|_, tat| *tat > now);
            state.sweep_at = (state.tats.len() * 2).max(SWEEP_MIN_KEYS);
        }
        decisions
    }

    #[cfg(test)]
    fn refund_now(&self, key: &str, quota: Quota, cost: u64) {
        self.refund_all_now(&[Charge::new(key, quota, cost)]);
    }

    /// [`RateStore::refund_all`] under one lock.
    fn refund_all_now(&self, charges: &[Charge]) {
        let now = (self.clock)();
        let mut state = self.lock();
        for Charge { key, quota, cost } in charges {
            match gcra_refund(*quota, state.tats.get(key).copied(), now, *cost) {
                Some(tat) => state.tats.insert(key.clone(), tat),
                None => state.tats.remove(key),
            };
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

#[async_trait::async_trait]
impl RateStore for MemoryStore {
    async fn reserve_all(&self, charges: &[Charge]) -> Result<Vec<Decision>, BackendError> {
        Ok(self.reserve_all_now(charges))
    }

    async fn refund_all(&self, charges: &[Charge]) -> Result<(), BackendError> {
        self.refund_all_now(charges);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

/// [`gcra_reserve`] and [`gcra_refund`] as one atomic Redis script (the same arithmetic and
/// slack, so that both backends answer alike).
const GCRA_LUA: &str = r#"
-- The GCRA of ratelimit.rs (gcra_reserve, gcra_refund) over all of a request's quotas as one
-- atomic step in Redis: reserve all or none, or refund all.
-- KEYS[i]: bucket i, holding its theoretical arrival time (TAT) in microseconds.
-- ARGV[1]: "reserve" or "refund"; then per_second, burst, cost for each key, in order.
-- Reserve returns {all allowed (1 or 0)} followed, for each key, by {allowed (1 or 0),
-- remaining, reset_us, retry_after_us (-1: never fits)}; when not all are allowed nothing is
-- stored, and an allowed key reports what is left without this request. Refund returns 0.
-- Time is the server's (TIME), so that every replica agrees; counted from 2023-11-14 rather than
-- 1970 so that a double keeps sub-microsecond precision (1/64 us in 2026, 1/8 us until 2041)
-- where microseconds since 1970 would round to a quarter.
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
local slack = 0.001

-- A key lives until its quota is full again: idle tenants vanish.
local function store(key, tat)
  redis.call('SET', key, string.format('%.17g', tat), 'PX', math.max(1, math.ceil((tat - now) / 1000)))
end
local function micros(x)
  if x <= slack then return 0 end
  return math.ceil(x - slack)
end
local function quota(i)
  local per_second = tonumber(ARGV[3 * i - 1])
  return 1000000 / per_second, tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
end
local function stored(i)
  local value = redis.call('GET', KEYS[i])
  if value then return tonumber(value) end
  return nil
end

if ARGV[1] == 'refund' then
  for i = 1, #KEYS do
    local unit, burst, cost = quota(i)
    local tat = stored(i)
    if tat then
      local refunded = tat - math.min(cost, burst) * unit
      if refunded > now + slack then store(KEYS[i], refunded) else redis.call('DEL', KEYS[i]) end
    end
  end
  return 0
end

local out = {1}
local new_tats = {}
local without = {}
for i = 1, #KEYS do
  local unit, burst, cost = quota(i)
  local tolerance = burst * unit
  local function remaining(ahead)
    local free = math.floor((tolerance - ahead) / unit + 0.000001)
    if free < 0 then return 0 end
    if free > burst then return burst end
    return free
  end
  local tat = now
  local old = stored(i)
  if old and old > now then tat = old end
  local new_tat = tat + cost * unit
  local over = new_tat - now - tolerance
  local base = 4 * i - 2
  if over > slack then
    out[1] = 0
    local retry = -1
    if cost <= burst then retry = micros(over) end
    out[base], out[base + 1], out[base + 2], out[base + 3] = 0, remaining(tat - now), micros(tat - now), retry
  else
    new_tats[i] = new_tat
    without[i] = {remaining(tat - now), micros(tat - now)}
    out[base], out[base + 1], out[base + 2], out[base + 3] = 1, remaining(new_tat - now), micros(new_tat - now), -1
  end
end
for i, new_tat in pairs(new_tats) do
  if out[1] == 1 then
    store(KEYS[i], new_tat)
  else
    out[4 * i - 1], out[4 * i] = without[i][1], without[i][2]
  end
end
return out
"#;

/// A Redis that answers slower than this is treated as down: each rate check costs a request at
/// most this much while Redis hangs (a Redis beside the server answers in well under 1 ms).
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// After a failed connection, reservations fail at once (and the policy answers them) for this
/// long before the next attempt, so that a Redis that is down costs each request nothing.
pub const REDIS_RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// The GCRA state in Redis, shared by every replica pointed at it. One round trip per request's
/// check of all its quotas, and one per refund (`EVALSHA`, loading the script the first time a
/// server has not seen it).
pub struct RedisStore {
    client: redis::Client,
    script: redis::Script,
    connection: tokio::sync::Mutex<RedisConnection>,
}

#[derive(Default)]
struct RedisConnection {
    live: Option<redis::aio::MultiplexedConnection>,
    /// No new attempt before this instant (after a failed one).
    retry_at: Option<Instant>,
}

fn unreachable(error: impl std::fmt::Display) -> BackendError {
    BackendError::Unreachable(error.to_string())
}

/// A refused password (`WRONGPASS`, a failed `AUTH`) or a missing one (`NOAUTH`) is the
/// configuration's fault; anything else is the backend being unreachable.
fn classify(error: redis::RedisError) -> BackendError {
    let credentials = error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"));
    if credentials {
        BackendError::Credentials(error.to_string())
    } else {
        unreachable(error)
    }
}

impl RedisStore {
    /// A store for `url` (`redis://host:port/db`). Connects now; an unreachable Redis is an
    /// error here, and later, after a failure, is reconnected to on demand.
    /// With `password`, every connection authenticates with it; a Redis that refuses it (or that
    /// needs one when none is given) is [`BackendError::Credentials`].
    pub async fn connect(url: &str, password: Option<&str>) -> Result<RedisStore, BackendError> {
        let store = RedisStore::lazy(url, password)?;
        store.check().await?;
        Ok(store)
    }

    /// A store for `url` that connects on its first use. A password inside `url` is refused
    /// (configuration files are not where secrets live; `password` is).
    pub fn lazy(url: &str, password: Option<&str>) -> Result<RedisStore, BackendError> {
        use redis::IntoConnectionInfo;
        // The URL is not echoed: a malformed one may still hold a password.
        let info = url
            .into_connection_info()
            .map_err(|error| unreachable(format!("invalid redis_url: {error}")))?;
        if info.redis_settings().password().is_some() {
            return Err(BackendError::Credentials(
                "redis_url holds a password; name where to read it with rate_limit.redis_password \
                 ({ env = \"NAME\" } or { file = \"/path\" }) instead"
                    .into(),
            ));
        }
        let info = match password {
            Some(password) => {
                let settings = info.redis_settings().clone().set_password(password);
                info.set_redis_settings(settings)
            }
            None => info,
        };
        let client = redis::Client::open(info)
            .map_err(|error| unreachable(format!("invalid redis_url: {error}")))?;
        Ok(RedisStore {
            client,
            script: redis::Script::new(GCRA_LUA),
            connection: tokio::sync::Mutex::new(RedisConnection::default()),
        })
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, BackendError> {
        let mut state = self.connection.lock().await;
        if let Some(live) = &state.live {
            return Ok(live.clone());
        }
        if let Some(retry_at) = state.retry_at {
            if Instant::now() < retry_at {
                return Err(unreachable("not connected (waiting to reconnect)"));
            }
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(live) => {
                state.live = Some(live.clone());
                state.retry_at = None;
                Ok(live)
            }
            Err(error) => {
                state.retry_at = Some(Instant::now() + REDIS_RECONNECT_BACKOFF);
                Err(classify(error))
            }
        }
    }

    /// Connects and asks Redis for a `PING`: a Redis that needs a password answers `NOAUTH`
    /// only to the first command, not to the connection.
    async fn check(&self) -> Result<(), BackendError> {
        let mut connection = self.connection().await?;
        let reply: Result<String, _> = redis::cmd("PING").query_async(&mut connection).await;
        reply.map(drop).map_err(classify)
    }

    /// Run the script once; a failure drops the connection so that the next call reconnects.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        charges: &[Charge],
        action: &str,
    ) -> Result<T, BackendError> {
        let mut connection = self.connection().await?;
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(action);
        for Charge { key, quota, cost } in charges {
            invocation
                .key(key)
                .arg(quota.per_second)
                .arg(quota.burst)
                .arg(*cost);
        }
        let result = invocation.invoke_async(&mut connection).await;
        if result.is_err() {
            let mut state = self.connection.lock().await;
            state.live = None;
            state.retry_at = Some(Instant::now() + REDIS_RECONNECT_BACKOFF);
        }
        result.map_err(unreachable)
    }
}

#[async_trait::async_trait]
impl RateStore for RedisStore {
    async fn reserve_all(&self, charges: &[Charge]) -> Result<Vec<Decision>, BackendError> {
        if charges.is_empty() {
            return Ok(Vec::new());
        }
        let reply: Vec<i64> = self.invoke(charges, "reserve").await?;
        if reply.len() != 1 + 4 * charges.len() {
            return Err(unreachable(format!(
                "the rate-limit script answered {} numbers for {} quotas",
                reply.len(),
                charges.len()
            )));
        }
        let micros = |value: i64| Duration::from_micros(value.max(0) as u64);
        Ok(reply[1..]
            .chunks_exact(4)
            .map(|answer| {
                let (allowed, remaining, reset, retry_after) =
                    (answer[0], answer[1], answer[2], answer[3]);
                let remaining = remaining.max(0) as u64;
                if allowed == 1 {
                    Decision::Allowed {
                        remaining,
                        reset: micros(reset),
                    }
                } else {
                    Decision::Limited {
                        retry_after: (retry_after >= 0).then(|| micros(retry_after)),
                        remaining,
                        reset: micros(reset),
                    }
                }
            })
            .collect())
    }

    async fn refund_all(&self, charges: &[Charge]) -> Result<(), BackendError> {
        if charges.is_empty() {
            return Ok(());
        }
        self.invoke::<i64>(charges, "refund").await.map(drop)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
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

    /// A clock the test moves by hand, in microseconds.
    fn manual_clock() -> (Clock, Arc<Mutex<f64>>) {
        let now = Arc::new(Mutex::new(0.0));
        let read = now.clone();
        (Arc::new(move || *read.lock().unwrap()), now)
    }

    fn advance(now: &Mutex<f64>, by: Duration) {
        *now.lock().unwrap() += by.as_micros() as f64;
    }

    const TEN_PER_SECOND_BURST_5: Quota = Quota {
        per_second: 10.0,
        burst: 5,
    };

    fn reserve(store: &MemoryStore, cost: u64) -> Decision {
        store.reserve_now("t:requests", TEN_PER_SECOND_BURST_5, cost)
    }

    #[test]
    fn burst_passes_and_the_next_waits_exactly_one_period() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        for n in 1..=5u64 {
            assert_eq!(
                reserve(&store, 1),
                Decision::Allowed {
                    remaining: 5 - n,
                    reset: Duration::from_millis(100 * n),
                }
            );
        }
        assert_eq!(
            reserve(&store, 1),
            Decision::Limited {
                retry_after: Some(Duration::from_millis(100)),
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
    }

    #[test]
    fn waiting_the_retry_after_admits_exactly_one_more() {
        let (clock, now) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        for _ in 0..5 {
            assert!(reserve(&store, 1).is_allowed());
        }
        advance(&now, Duration::from_micros(99_999));
        assert_eq!(
            reserve(&store, 1),
            Decision::Limited {
                retry_after: Some(Duration::from_micros(1)),
                remaining: 0,
                reset: Duration::from_micros(400_001),
            }
        );
        advance(&now, Duration::from_micros(1));
        assert_eq!(
            reserve(&store, 1),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert!(!reserve(&store, 1).is_allowed());
    }

    #[test]
    fn cost_weighs_the_reservation() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        assert_eq!(
            reserve(&store, 3),
            Decision::Allowed {
                remaining: 2,
                reset: Duration::from_millis(300),
            }
        );
        // 3 more do not fit until 1 unit has drained: 100 ms.
        assert_eq!(
            reserve(&store, 3),
            Decision::Limited {
                retry_after: Some(Duration::from_millis(100)),
                remaining: 2,
                reset: Duration::from_millis(300),
            }
        );
        assert!(reserve(&store, 2).is_allowed());
    }

    #[test]
    fn cost_above_the_burst_never_fits() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        assert_eq!(
            reserve(&store, 6),
            Decision::Limited {
                retry_after: None,
                remaining: 5,
                reset: Duration::ZERO,
            }
        );
        // Nothing was reserved.
        assert!(store.is_empty());
        assert!(reserve(&store, 5).is_allowed());
    }

    #[test]
    fn refund_restores_exactly_what_was_not_used() {
        let (clock, now) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        assert!(reserve(&store, 5).is_allowed());
        store.refund_now("t:requests", TEN_PER_SECOND_BURST_5, 3);
        assert_eq!(
            reserve(&store, 3),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert!(!reserve(&store, 1).is_allowed());
        // A full refund after time has passed restores the quota to full, not beyond: the
        // 200 ms that passed are not handed out twice.
        advance(&now, Duration::from_millis(200));
        store.refund_now("t:requests", TEN_PER_SECOND_BURST_5, 5);
        assert!(store.is_empty());
        assert_eq!(
            reserve(&store, 5),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert!(!reserve(&store, 1).is_allowed());
    }

    #[test]
    fn a_period_that_is_not_a_whole_microsecond_still_admits_the_whole_burst() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let quota = Quota {
            per_second: 3.0,
            burst: 3,
        };
        for n in 1..=3u64 {
            let decision = store.reserve_now("k", quota, 1);
            assert!(decision.is_allowed(), "unit {n}: {decision:?}");
        }
        assert_eq!(
            store.reserve_now("k", quota, 1),
            Decision::Limited {
                retry_after: Some(Duration::from_micros(333_334)),
                remaining: 0,
                reset: Duration::from_secs(1),
            }
        );
    }

    #[test]
    fn a_fuel_quota_admits_by_weight() {
        // 1e9 fuel/s, burst 3e9: three requests capped at 1e9 fuel, not four.
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let quota = Quota {
            per_second: 1e9,
            burst: 3_000_000_000,
        };
        for _ in 0..3 {
            assert!(store
                .reserve_now("t:fuel", quota, 1_000_000_000)
                .is_allowed());
        }
        assert_eq!(
            store.reserve_now("t:fuel", quota, 1_000_000_000),
            Decision::Limited {
                retry_after: Some(Duration::from_secs(1)),
                remaining: 0,
                reset: Duration::from_secs(3),
            }
        );
        // The run used 1e8 of its 1e9: the rest comes back at once.
        store.refund_now("t:fuel", quota, 900_000_000);
        assert_eq!(
            store.reserve_now("t:fuel", quota, 900_000_000),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_secs(3),
            }
        );
    }

    /// A request's three quotas: 1 request (burst 5), 4 tokens (burst 10), 1e9 fuel (burst 2e9).
    fn request_charges(fuel: u64) -> Vec<Charge> {
        vec![
            Charge::new("t:requests", TEN_PER_SECOND_BURST_5, 1),
            Charge::new(
                "t:tokens",
                Quota {
                    per_second: 10.0,
                    burst: 10,
                },
                4,
            ),
            Charge::new(
                "t:fuel",
                Quota {
                    per_second: 1e9,
                    burst: 2_000_000_000,
                },
                fuel,
            ),
        ]
    }

    #[test]
    fn a_request_reserves_all_its_quotas_at_once() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let decisions = store.reserve_all_now(&request_charges(1_000_000_000));
        assert!(all_allowed(&decisions));
        assert_eq!(
            decisions,
            vec![
                Decision::Allowed {
                    remaining: 4,
                    reset: Duration::from_millis(100),
                },
                Decision::Allowed {
                    remaining: 6,
                    reset: Duration::from_millis(400),
                },
                Decision::Allowed {
                    remaining: 1_000_000_000,
                    reset: Duration::from_secs(1),
                },
            ]
        );
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn a_refusal_by_one_quota_reserves_nothing_in_the_others() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        // The fuel burst (2e9) holds one request capped at 1.5e9, not two.
        assert!(all_allowed(
            &store.reserve_all_now(&request_charges(1_500_000_000))
        ));
        let refused = store.reserve_all_now(&request_charges(1_500_000_000));
        assert!(!all_allowed(&refused));
        // The quotas that would have admitted say what is left without this request.
        assert_eq!(
            refused,
            vec![
                Decision::Allowed {
                    remaining: 4,
                    reset: Duration::from_millis(100),
                },
                Decision::Allowed {
                    remaining: 6,
                    reset: Duration::from_millis(400),
                },
                Decision::Limited {
                    retry_after: Some(Duration::from_secs(1)),
                    remaining: 500_000_000,
                    reset: Duration::from_millis(1500),
                },
            ]
        );
        // Nothing was taken from the request or token quotas: 4 more requests and 1 more
        // 4-token input fit exactly as after the first.
        for n in 0..4u64 {
            assert_eq!(
                store.reserve_now("t:requests", TEN_PER_SECOND_BURST_5, 1),
                Decision::Allowed {
                    remaining: 3 - n,
                    reset: Duration::from_millis(200 + 100 * n),
                }
            );
        }
        assert!(!store
            .reserve_now("t:requests", TEN_PER_SECOND_BURST_5, 1)
            .is_allowed());
        let tokens = request_charges(0)[1].clone();
        assert_eq!(
            store.reserve_now(&tokens.key, tokens.quota, 4),
            Decision::Allowed {
                remaining: 2,
                reset: Duration::from_millis(800),
            }
        );
    }

    #[test]
    fn a_refusal_by_several_quotas_reports_each_and_reserves_nothing() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        // 5 requests fill the request quota; fuel 2e9 fills the fuel quota.
        for _ in 0..5 {
            store.reserve_now("t:requests", TEN_PER_SECOND_BURST_5, 1);
        }
        let fuel = request_charges(0)[2].clone();
        assert!(store
            .reserve_now(&fuel.key, fuel.quota, 2_000_000_000)
            .is_allowed());
        let refused = store.reserve_all_now(&request_charges(2_000_000_000));
        assert_eq!(
            refused[0],
            Decision::Limited {
                retry_after: Some(Duration::from_millis(100)),
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert_eq!(
            refused[2],
            Decision::Limited {
                retry_after: Some(Duration::from_secs(2)),
                remaining: 0,
                reset: Duration::from_secs(2),
            }
        );
        // The token quota, which admitted alone, holds no key: nothing was reserved there.
        assert!(refused[1].is_allowed());
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn one_refund_gives_back_every_charge() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let charges = request_charges(2_000_000_000);
        assert!(all_allowed(&store.reserve_all_now(&charges)));
        store.refund_all_now(&charges);
        // Every quota is full again: its key is gone.
        assert!(store.is_empty());
    }

    #[test]
    fn idle_keys_are_swept() {
        let (clock, now) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        for n in 0..SWEEP_MIN_KEYS - 1 {
            store.reserve_now(&format!("k{n}"), TEN_PER_SECOND_BURST_5, 1);
        }
        assert_eq!(store.len(), SWEEP_MIN_KEYS - 1);
        advance(&now, Duration::from_millis(100));
        store.reserve_now("last", TEN_PER_SECOND_BURST_5, 1);
        assert_eq!(store.len(), 1);
    }

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
