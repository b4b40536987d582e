//! The GCRA state in Redis, shared by every replica pointed at it: the arithmetic of
//! [`gcra`](super::gcra) as one atomic Lua script (`gcra.lua`) over all of a request's quotas.

use std::time::{Duration, Instant};

use super::{unreachable, BackendError, Charge, Decision, RateStore};

/// [`gcra_reserve`](super::gcra::gcra_reserve) and [`gcra_refund`](super::gcra::gcra_refund) as
/// one atomic Redis script (the same arithmetic and
/// slack, so that both backends answer alike).
const GCRA_LUA: &str = include_str!("gcra.lua");

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
    pub(super) async fn check(&self) -> Result<(), BackendError> {
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
