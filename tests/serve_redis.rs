//! Rate limits shared in Redis: several replicas (each its own `Limiter`) enforce one quota
//! through a real `redis-server` started on a loopback port for the test and stopped after;
//! Redis going down applies the configured policy and counts it; Redis coming back shares
//! again; and the same across two real `wasm-infer serve` processes. `scripts/setup.sh` installs
//! redis-server; without it these tests fail, not skip.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wasm_infer::serve::ratelimit::{
    Backend, BackendError, Decision, FailPolicy, Limiter, Quota, RateLimitConfig, SecretSource,
    REDIS_RECONNECT_BACKOFF,
};

/// One unit every 100 s: no unit drains back while a test runs, so admissions are exact counts.
const SLOW: Quota = Quota {
    per_second: 0.01,
    burst: 4,
};
const SLOW_PERIOD: Duration = Duration::from_secs(100);

/// A `redis-server` on a loopback port, with no persistence, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    /// `requirepass`, when it was started with one.
    password: Option<String>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(None)
    }

    /// A Redis that requires `password` (`requirepass`) when given one.
    fn start_with(password: Option<&str>) -> Redis {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        Redis::start_on(port, password)
    }

    fn start_on(port: u16, password: Option<&str>) -> Redis {
        let mut command = Command::new(redis_server());
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "notice"]);
        if let Some(password) = password {
            command.args(["--requirepass", password]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        // Ready when it says so (its log line), not after a guessed delay.
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Ready to accept connections") => break,
                Some(Ok(_)) => continue,
                _ => panic!("redis-server on port {port} exited before it was ready"),
            }
        }
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Redis {
            child,
            port,
            password: password.map(str::to_string),
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kill it (SIGKILL: a crash, not a clean shutdown) and wait until it is gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A plain connection, for looking at the keys the limiter wrote.
    fn client(&self) -> redis::Connection {
        let url = match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => self.url(),
        };
        redis::Client::open(url).unwrap().get_connection().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_server() -> String {
    let found = std::env::var("REDIS_SERVER").ok().or_else(|| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("redis-server"))
                .find(|candidate| candidate.is_file())
                .map(|candidate| candidate.display().to_string())
        })
    });
    found.expect("redis-server is not installed: run scripts/setup.sh (it installs the Debian package redis-server)")
}

fn config(redis: &Redis, policy: FailPolicy) -> RateLimitConfig {
    RateLimitConfig {
        backend: Backend::Redis,
        redis_url: Some(redis.url()),
        redis_password: None,
        on_backend_error: policy,
        key_prefix: "test".to_string(),
    }
}

/// Allowed with exactly `remaining` left, and a reset of `units` periods (less the
/// microseconds that passed since the first reservation: Redis's clock runs).
fn assert_allowed(decision: Decision, remaining: u64, units: u32) {
    match decision {
        Decision::Allowed {
            remaining: r,
            reset,
        } => {
            assert_eq!(r, remaining, "{decision:?}");
            let full = SLOW_PERIOD * units;
            assert!(
                reset <= full && reset > full - Duration::from_secs(5),
                "{decision:?}"
            );
        }
        other => panic!("expected Allowed with {remaining} remaining, got {other:?}"),
    }
}

/// Refused, with the retry-after of one period (less the time that passed).
fn assert_limited(decision: Decision) {
    match decision {
        Decision::Limited {
            retry_after: Some(retry_after),
            remaining: 0,
            reset,
        } => {
            assert!(
                retry_after <= SLOW_PERIOD && retry_after > SLOW_PERIOD - Duration::from_secs(5),
                "{retry_after:?}"
            );
            assert!(reset > SLOW_PERIOD * 3, "{reset:?}");
        }
        other => panic!("expected Limited with 0 remaining, got {other:?}"),
    }
}

/// Reserve on a probe key until the backend answers again (it reconnects after
/// `REDIS_RECONNECT_BACKOFF`), counting the failures on the way.
async fn until_backend_answers(limiter: &Limiter) {
    let deadline = Instant::now() + REDIS_RECONNECT_BACKOFF * 20;
    let probe = Quota {
        per_second: 1e6,
        burst: 1_000_000,
    };
    loop {
        let failures = limiter.backend_failures();
        match limiter.reserve("probe:requests", probe, 1).await {
            Ok(_) if limiter.backend_failures() == failures => return,
            _ if Instant::now() > deadline => panic!("the limiter did not reconnect to Redis"),
            _ => tokio::time::sleep(REDIS_RECONNECT_BACKOFF / 5).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_one_burst_between_them() {
    let redis = Redis::start();
    let a = Limiter::new(&config(&redis, FailPolicy::Closed))
        .await
        .unwrap();
    let b = Limiter::new(&config(&redis, FailPolicy::Closed))
        .await
        .unwrap();
    assert_eq!((a.backend(), b.backend()), ("redis", "redis"));

    // Alternating replicas: 4 admitted in all, the 5th refused on either.
    assert_allowed(a.reserve("acme:requests", SLOW, 1).await.unwrap(), 3, 1);
    assert_allowed(b.reserve("acme:requests", SLOW, 1).await.unwrap(), 2, 2);
    assert_allowed(a.reserve("acme:requests", SLOW, 1).await.unwrap(), 1, 3);
    assert_allowed(b.reserve("acme:requests", SLOW, 1).await.unwrap(), 0, 4);
    assert_limited(a.reserve("acme:requests", SLOW, 1).await.unwrap());
    assert_limited(b.reserve("acme:requests", SLOW, 1).await.unwrap());

    // Another tenant, and another limit of the same tenant, have their own buckets.
    assert_allowed(b.reserve("other:requests", SLOW, 1).await.unwrap(), 3, 1);
    assert_allowed(b.reserve("acme:fuel", SLOW, 4).await.unwrap(), 0, 4);

    // A refund on one replica is visible to the other, and only what was refunded.
    a.refund("acme:requests", SLOW, 1).await;
    assert_allowed(b.reserve("acme:requests", SLOW, 1).await.unwrap(), 0, 4);
    assert_limited(a.reserve("acme:requests", SLOW, 1).await.unwrap());

    // A cost above the burst never fits, and reserves nothing.
    match a.reserve("fresh:fuel", SLOW, 5).await.unwrap() {
        Decision::Limited {
            retry_after: None,
            remaining: 4,
            ..
        } => {}
        other => panic!("expected a refusal that never fits, got {other:?}"),
    }

    // Keys are {prefix}:rl:{tenant}:{limit}, each expiring when its bucket is full again (a
    // full 4-unit bucket of 100 s units: 400 s), so idle tenants vanish.
    let mut client = redis.client();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:rl:*")
        .query(&mut client)
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "test:rl:acme:fuel",
            "test:rl:acme:requests",
            "test:rl:other:requests"
        ]
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("test:rl:acme:requests")
        .query(&mut client)
        .unwrap();
    assert!(ttl > 395_000 && ttl <= 400_000, "PTTL {ttl} ms");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("test:rl:other:requests")
        .query(&mut client)
        .unwrap();
    assert!(ttl > 95_000 && ttl <= 100_000, "PTTL {ttl} ms");

    // Refunding everything empties the bucket: the key goes at once.
    b.refund("other:requests", SLOW, 1).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg("test:rl:other:requests")
        .query(&mut client)
        .unwrap();
    assert_eq!(exists, 0);
    assert_eq!(a.backend_failures() + b.backend_failures(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fuel_quota_is_shared_by_weight() {
    // 1e8 fuel/s with a burst of 3e9: requests capped at 1e9 fuel, three fit across both
    // replicas (each cap takes 10 s to drain back); a run that used 1e8 refunds 9e8, which the
    // other replica can spend.
    let redis = Redis::start();
    let a = Limiter::new(&config(&redis, FailPolicy::Closed))
        .await
        .unwrap();
    let b = Limiter::new(&config(&redis, FailPolicy::Closed))
        .await
        .unwrap();
    let fuel = Quota {
        per_second: 1e8,
        burst: 3_000_000_000,
    };
    let cap = 1_000_000_000;
    assert!(a
        .reserve("acme:fuel", fuel, cap)
        .await
        .unwrap()
        .is_allowed());
    assert!(b
        .reserve("acme:fuel", fuel, cap)
        .await
        .unwrap()
        .is_allowed());
    assert!(a
        .reserve("acme:fuel", fuel, cap)
        .await
        .unwrap()
        .is_allowed());
    // The fourth waits for one cap to drain: 10 s less the time these calls took.
    let refused = b.reserve("acme:fuel", fuel, cap).await.unwrap();
    let Decision::Limited {
        retry_after: Some(retry_after),
        ..
    } = refused
    else {
        panic!("expected the 4th cap to be refused, got {refused:?}");
    };
    assert!(retry_after > Duration::from_secs(5) && retry_after <= Duration::from_secs(10));
    a.refund("acme:fuel", fuel, 900_000_000).await;
    assert!(b
        .reserve("acme:fuel", fuel, 900_000_000)
        .await
        .unwrap()
        .is_allowed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_counts_it_and_shares_again_when_back() {
    let mut redis = Redis::start();
    let port = redis.port;
    let a = Limiter::new(&config(&redis, FailPolicy::Closed))
        .await
        .unwrap();
    let b = Limiter::new(&config(&redis, FailPolicy::Closed))
        .await
        .unwrap();
    assert_allowed(a.reserve("acme:requests", SLOW, 1).await.unwrap(), 3, 1);

    redis.kill();
    assert!(a.reserve("acme:requests", SLOW, 1).await.is_err());
    assert_eq!(a.backend_failures(), 1);
    assert!(b.reserve("acme:requests", SLOW, 1).await.is_err());
    assert_eq!(b.backend_failures(), 1);
    // A refund that cannot reach Redis is counted, not returned.
    a.refund("acme:requests", SLOW, 1).await;
    assert_eq!(a.backend_failures(), 2);
    // While down, every reservation fails (none is admitted on the side).
    for n in 3..6 {
        assert!(a.reserve("acme:requests", SLOW, 1).await.is_err());
        assert_eq!(a.backend_failures(), n);
    }

    // Back (empty: no persistence): both replicas reconnect and share one burst again.
    let _redis = Redis::start_on(port, None);
    until_backend_answers(&a).await;
    until_backend_answers(&b).await;
    let failures = (a.backend_failures(), b.backend_failures());
    assert_allowed(a.reserve("acme:requests", SLOW, 1).await.unwrap(), 3, 1);
    assert_allowed(b.reserve("acme:requests", SLOW, 1).await.unwrap(), 2, 2);
    assert_allowed(a.reserve("acme:requests", SLOW, 1).await.unwrap(), 1, 3);
    assert_allowed(b.reserve("acme:requests", SLOW, 1).await.unwrap(), 0, 4);
    assert_limited(a.reserve("acme:requests", SLOW, 1).await.unwrap());
    assert_eq!((a.backend_failures(), b.backend_failures()), failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_open_to_each_replicas_own_limit() {
    let mut redis = Redis::start();
    let port = redis.port;
    let a = Limiter::new(&config(&redis, FailPolicy::Open))
        .await
        .unwrap();
    let b = Limiter::new(&config(&redis, FailPolicy::Open))
        .await
        .unwrap();
    assert_allowed(a.reserve("acme:requests", SLOW, 1).await.unwrap(), 3, 1);

    redis.kill();
    // Each replica now enforces the quota on its own: a full burst each, then refusals, and
    // every reservation counted as a backend failure.
    for replica in [&a, &b] {
        for remaining in (0..4).rev() {
            assert_allowed(
                replica.reserve("acme:requests", SLOW, 1).await.unwrap(),
                remaining,
                4 - remaining as u32,
            );
        }
        assert_limited(replica.reserve("acme:requests", SLOW, 1).await.unwrap());
        assert_eq!(replica.backend_failures(), 5);
    }

    // Back: shared again (the restarted Redis is empty).
    let _redis = Redis::start_on(port, None);
    until_backend_answers(&a).await;
    until_backend_answers(&b).await;
    let failures = (a.backend_failures(), b.backend_failures());
    for (n, replica) in [&a, &b, &a, &b].into_iter().enumerate() {
        assert_allowed(
            replica.reserve("acme:requests", SLOW, 1).await.unwrap(),
            3 - n as u64,
            n as u32 + 1,
        );
    }
    assert_limited(b.reserve("acme:requests", SLOW, 1).await.unwrap());
    assert_eq!((a.backend_failures(), b.backend_failures()), failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_at_start_refuses_fail_closed_and_serves_fail_open() {
    let mut redis = Redis::start();
    redis.kill();
    let closed = Limiter::new(&config(&redis, FailPolicy::Closed)).await;
    assert!(
        closed.is_err(),
        "fail-closed must refuse to start without its Redis"
    );
    let open = Limiter::new(&config(&redis, FailPolicy::Open))
        .await
        .unwrap();
    assert_allowed(open.reserve("acme:requests", SLOW, 1).await.unwrap(), 3, 1);
    assert_eq!(open.backend_failures(), 1);

    let missing = RateLimitConfig {
        redis_url: None,
        ..config(&redis, FailPolicy::Open)
    };
    assert!(Limiter::new(&missing).await.is_err());
}

#[test]
fn the_deployed_config_parses_with_the_servers_parser_and_shares_limits_in_redis() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/serve.toml");
    let config = wasm_infer::serve::ServeConfig::from_file(&path).unwrap();
    assert_eq!(
        config.rate_limit,
        RateLimitConfig {
            backend: Backend::Redis,
            redis_url: Some("redis://wasm-infer-redis:6379/0".to_string()),
            redis_password: Some(SecretSource::File(
                "/run/secrets/wasm-infer-redis/password".into()
            )),
            on_backend_error: FailPolicy::Closed,
            key_prefix: "wasm-infer".to_string(),
        }
    );
    assert_eq!(config.drain_deadline, Duration::from_secs(30));
    let tenants = config.tenants().unwrap();
    assert_eq!(tenants.len(), 1);
    assert_eq!(
        tenants[0].rates.requests,
        Some(Quota {
            per_second: 20.0,
            burst: 40
        })
    );
    assert_eq!(
        tenants[0].rates.fuel,
        Some(Quota {
            per_second: 5e9,
            burst: 5_000_000_000 * 2
        })
    );
}

/// A running `wasm-infer serve` (serving the hostile test guest), killed on drop.
struct Server {
    child: Child,
    base: String,
    config: std::path::PathBuf,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts a replica whose one tenant `a` (key `KEY`) may make `SLOW` requests, its limits
    /// in `redis` under `policy` (with `redis`'s password, read from a file, if it has one).
    fn start(redis: &Redis, policy: &str) -> Server {
        let config = Server::config(redis, policy, redis.password.as_deref());
        let support::ServeProcess { child, base, log } =
            support::spawn_serve(&config, &[], Duration::from_secs(120));
        Server {
            child,
            base,
            config,
            log,
        }
    }

    /// Writes a replica's config; with `password`, the password goes to a file beside it
    /// (`<config>.password`, 0600) that the config names, never into the config itself.
    fn config(redis: &Redis, policy: &str, password: Option<&str>) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = std::env::temp_dir().join(format!(
            "wasm-infer-serve-redis-{}-{n}.toml",
            std::process::id()
        ));
        let secret = config.with_extension("password");
        let password_line = match password {
            Some(password) => {
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&secret)
                    .unwrap();
                std::io::Write::write_all(&mut file, format!("{password}\n").as_bytes()).unwrap();
                format!("redis_password = {{ file = \"{}\" }}\n", secret.display())
            }
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                r#"listen = "127.0.0.1:0"
[[models]]
name = "hostile"
path = "{model}"
[rate_limit]
backend = "redis"
redis_url = "{url}"
{password_line}on_backend_error = "{policy}"
key_prefix = "e2e"
[[tenants]]
name = "a"
key_sha256 = "{hash}"
[tenants.rates]
requests_per_second = {per_second}
requests_burst = {burst}
"#,
                model = support::hostile_wasm().display(),
                url = redis.url(),
                hash = wasm_infer::serve::hash_key(KEY),
                per_second = SLOW.per_second,
                burst = SLOW.burst,
            ),
        )
        .unwrap();
        config
    }

    /// One request as tenant `a`: its status and `RateLimit` header.
    fn request(&self) -> (u16, Option<String>, String) {
        let result = ureq::post(&format!("{}/v1/infer", self.base))
            .set("Authorization", &format!("Bearer {KEY}"))
            .send_json(serde_json::json!({"model": "hostile", "input": {"text": "echo:x"}}));
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(error) => panic!("HTTP transport error: {error}"),
        };
        let status = response.status();
        let header = response.header("ratelimit").map(str::to_string);
        (status, header, response.into_string().unwrap_or_default())
    }

    fn backend_failures(&self) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.base))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("wasm_infer_rate_limit_backend_failures_total "))
            .unwrap_or_else(|| panic!("no backend failure counter in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(self.config.with_extension("password"));
    }
}

const KEY: &str = "sk-test-shared-quota";

/// 200 with `remaining` requests left in the shared bucket.
fn assert_served(reply: (u16, Option<String>, String), remaining: u64) {
    let (status, header, body) = reply;
    assert_eq!(status, 200, "{body}");
    let header = header.expect("a RateLimit header");
    assert!(
        header.starts_with(&format!("\"requests\";r={remaining};")),
        "{header}"
    );
}

fn assert_status(reply: (u16, Option<String>, String), status: u16, code: &str) {
    assert_eq!(reply.0, status, "{}", reply.2);
    assert!(
        reply.2.contains(&format!("\"code\":\"{code}\"")),
        "{}",
        reply.2
    );
}

#[test]
fn two_servers_share_a_tenants_quota_and_fail_closed_with_503_when_redis_dies() {
    let mut redis = Redis::start();
    let port = redis.port;
    let (one, two) = (
        Server::start(&redis, "closed"),
        Server::start(&redis, "closed"),
    );

    assert_served(one.request(), 3);
    assert_served(two.request(), 2);
    assert_served(one.request(), 1);
    assert_served(two.request(), 0);
    assert_status(one.request(), 429, "rate_limit_exceeded");
    assert_status(two.request(), 429, "rate_limit_exceeded");
    assert_eq!((one.backend_failures(), two.backend_failures()), (0.0, 0.0));

    redis.kill();
    assert_status(one.request(), 503, "rate_limit_unavailable");
    assert_status(one.request(), 503, "rate_limit_unavailable");
    assert_status(two.request(), 503, "rate_limit_unavailable");
    assert_eq!((one.backend_failures(), two.backend_failures()), (2.0, 1.0));

    // Back (empty): once each replica has reconnected, one quota again.
    let _redis = Redis::start_on(port, None);
    let deadline = Instant::now() + REDIS_RECONNECT_BACKOFF * 20;
    let mut first = one.request();
    while first.0 == 503 {
        assert!(
            Instant::now() < deadline,
            "server one did not reconnect to Redis"
        );
        std::thread::sleep(REDIS_RECONNECT_BACKOFF / 5);
        first = one.request();
    }
    assert_served(first, 3);
    let mut second = two.request();
    while second.0 == 503 {
        assert!(
            Instant::now() < deadline,
            "server two did not reconnect to Redis"
        );
        std::thread::sleep(REDIS_RECONNECT_BACKOFF / 5);
        second = two.request();
    }
    assert_served(second, 2);
    assert_served(one.request(), 1);
    assert_served(two.request(), 0);
    assert_status(one.request(), 429, "rate_limit_exceeded");
}

#[test]
fn two_servers_fail_open_to_a_quota_each_while_redis_is_down() {
    let mut redis = Redis::start();
    let (one, two) = (Server::start(&redis, "open"), Server::start(&redis, "open"));
    assert_served(one.request(), 3);
    redis.kill();
    for server in [&one, &two] {
        for remaining in (0..4).rev() {
            assert_served(server.request(), remaining);
        }
        assert_status(server.request(), 429, "rate_limit_exceeded");
        assert_eq!(server.backend_failures(), 5.0);
    }
}

/// The calls of `command` since the last `CONFIG RESETSTAT`, from `INFO commandstats` (0 when
/// it was not called).
fn command_calls(redis: &Redis, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.client())
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[test]
fn each_request_reserves_from_its_head_then_its_tokens_and_refunds_one_round_trip_each() {
    const FUEL_CAP: u64 = 1_000_000;
    const REQUESTS: u64 = 10;
    let redis = Redis::start();
    let config = std::env::temp_dir().join(format!(
        "wasm-infer-serve-redis-trips-{}.toml",
        std::process::id()
    ));
    // Tenant a: three quotas, roomy enough for every request here. Tenant b: a fuel burst of
    // one cap at 1 fuel/s, so after one run that burns its cap the fuel quota refuses.
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
[[models]]
name = "hostile"
path = "{model}"
[rate_limit]
backend = "redis"
redis_url = "{url}"
key_prefix = "trips"
[[tenants]]
name = "a"
key_sha256 = "{hash_a}"
[tenants.limits]
fuel = {FUEL_CAP}
[tenants.rates]
requests_per_second = 0.01
requests_burst = 100
tokens_per_second = 0.01
tokens_burst = 10000
fuel_per_second = 1
fuel_burst = {fuel_burst_a}
[[tenants]]
name = "b"
key_sha256 = "{hash_b}"
[tenants.limits]
fuel = {FUEL_CAP}
[tenants.rates]
requests_per_second = 0.01
requests_burst = 4
fuel_per_second = 1
fuel_burst = {FUEL_CAP}
"#,
            model = support::hostile_wasm().display(),
            url = redis.url(),
            hash_a = wasm_infer::serve::hash_key(KEY),
            hash_b = wasm_infer::serve::hash_key("sk-b"),
            fuel_burst_a = 100 * FUEL_CAP,
        ),
    )
    .unwrap();
    let support::ServeProcess {
        mut child, base, ..
    } = support::spawn_serve(&config, &[], Duration::from_secs(120));
    let request = |key: &str, command: &str| {
        let result = ureq::post(&format!("{base}/v1/infer"))
            .set("Authorization", &format!("Bearer {key}"))
            .send_json(serde_json::json!({"model": "hostile", "input": {"text": command}}));
        match result {
            Ok(response) | Err(ureq::Error::Status(_, response)) => response,
            Err(error) => panic!("HTTP transport error: {error}"),
        }
    };
    // The first call loads the script into Redis (EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA):
    // counting starts after it.
    assert_eq!(request(KEY, "echo:x").status(), 200);
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut redis.client())
        .unwrap();

    for _ in 0..REQUESTS {
        let reply = request(KEY, "echo:x");
        assert_eq!(reply.status(), 200);
        let header = reply.header("ratelimit").unwrap().to_string();
        assert!(
            header.starts_with("\"requests\";") && header.contains("\"tokens\";"),
            "{header}"
        );
        assert!(header.contains("\"fuel\";"), "{header}");
    }
    // Three quotas each: the request and fuel reserved from the head (before the body is
    // read), the tokens once the body is parsed, and one refund of the unburnt fuel.
    assert_eq!(command_calls(&redis, "evalsha"), 3 * REQUESTS);
    assert_eq!(command_calls(&redis, "eval"), 0);
    assert_eq!(command_calls(&redis, "script"), 0);

    // Tenant b: one run that burns its whole fuel cap (a trip, nothing to refund), then a
    // request the fuel quota refuses.
    assert_eq!(request("sk-b", "spin").status(), 422);
    let requests_tat = || -> Option<String> {
        redis::cmd("GET")
            .arg("trips:rl:b:requests")
            .query(&mut redis.client())
            .unwrap()
    };
    let before = requests_tat().expect("b's request quota holds one request");
    let refused = request("sk-b", "echo:x");
    assert_eq!(refused.status(), 429);
    assert!(refused.header("retry-after").is_some());
    let header = refused.header("ratelimit").unwrap().to_string();
    let body: serde_json::Value = serde_json::from_str(&refused.into_string().unwrap()).unwrap();
    assert_eq!(body["error"]["type"], "fuel", "{body}");
    // The request quota is untouched: the same TAT, and 3 of its 4 left as the header says.
    assert_eq!(requests_tat().unwrap(), before);
    assert!(header.starts_with("\"requests\";r=3;"), "{header}");
    // Tenant b's run: one reservation and no refund (its fuel was all burnt); its refusal:
    // one reservation, nothing to give back.
    assert_eq!(command_calls(&redis, "evalsha"), 3 * REQUESTS + 2);

    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&config);
}

const REDIS_PASSWORD: &str = "correct-horse-battery-staple-7f3a";

#[tokio::test]
async fn a_limiter_authenticates_with_the_password_it_reads_and_refuses_to_start_without_it() {
    let redis = Redis::start_with(Some(REDIS_PASSWORD));
    let var = "WASM_INFER_TEST_REDIS_PASSWORD_LIMITER";
    std::env::set_var(var, REDIS_PASSWORD);
    let right = RateLimitConfig {
        redis_password: Some(SecretSource::Env(var.to_string())),
        ..config(&redis, FailPolicy::Closed)
    };
    let limiter = Limiter::new(&right).await.unwrap();
    assert_allowed(
        limiter.reserve("acme:requests", SLOW, 1).await.unwrap(),
        3,
        1,
    );

    // No password, a wrong one, one in the URL, an unset variable: refused at start under
    // either policy (credentials are configuration, not an outage), never echoing a secret.
    for policy in [FailPolicy::Closed, FailPolicy::Open] {
        let none = config(&redis, policy);
        let error = Limiter::new(&none)
            .await
            .err()
            .expect("no password refused");
        assert!(
            matches!(error, BackendError::Credentials(_)),
            "{policy:?}: {error}"
        );
        assert!(error.to_string().contains("NOAUTH"), "{error}");

        std::env::set_var("WASM_INFER_TEST_REDIS_PASSWORD_WRONG", "not-the-password");
        let wrong = RateLimitConfig {
            redis_password: Some(SecretSource::Env(
                "WASM_INFER_TEST_REDIS_PASSWORD_WRONG".into(),
            )),
            ..config(&redis, policy)
        };
        let error = Limiter::new(&wrong)
            .await
            .err()
            .expect("a wrong password refused");
        assert!(
            matches!(error, BackendError::Credentials(_)),
            "{policy:?}: {error}"
        );
        assert!(!error.to_string().contains("not-the-password"), "{error}");

        let in_url = RateLimitConfig {
            redis_url: Some(format!(
                "redis://:{REDIS_PASSWORD}@127.0.0.1:{}/",
                redis.port
            )),
            ..config(&redis, policy)
        };
        let error = Limiter::new(&in_url)
            .await
            .err()
            .expect("a password in the URL refused");
        assert!(
            error.to_string().contains("redis_url holds a password"),
            "{error}"
        );
        assert!(!error.to_string().contains(REDIS_PASSWORD), "{error}");

        let unset = RateLimitConfig {
            redis_password: Some(SecretSource::Env("WASM_INFER_TEST_UNSET_VARIABLE".into())),
            ..config(&redis, policy)
        };
        let error = Limiter::new(&unset)
            .await
            .err()
            .expect("an unset variable refused");
        assert_eq!(
            error.to_string(),
            "rate-limit backend refused the server's credentials: rate_limit.redis_password: \
             environment variable WASM_INFER_TEST_UNSET_VARIABLE is not set"
        );
    }
}

#[test]
fn two_servers_share_a_quota_in_a_redis_with_a_password_and_a_wrong_one_stops_the_start() {
    let redis = Redis::start_with(Some(REDIS_PASSWORD));
    let (one, two) = (
        Server::start(&redis, "closed"),
        Server::start(&redis, "closed"),
    );
    // SLOW's burst of 4, shared: two from each replica, then the fifth is refused by either.
    assert_served(one.request(), 3);
    assert_served(two.request(), 2);
    assert_served(one.request(), 1);
    assert_served(two.request(), 0);
    assert_status(one.request(), 429, "rate_limit_exceeded");
    assert_status(two.request(), 429, "rate_limit_exceeded");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("e2e:*")
        .query(&mut redis.client())
        .unwrap();
    assert_eq!(keys, vec!["e2e:rl:a:requests".to_string()]);

    for (policy, password) in [
        ("closed", None),
        ("open", None),
        ("closed", Some("not-the-password")),
        ("open", Some("not-the-password")),
    ] {
        let config = Server::config(&redis, policy, password);
        let output = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("WASM_INFER_CACHE_DIR", support::cache_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&config);
        let _ = std::fs::remove_file(config.with_extension("password"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{policy} {password:?}: {stderr}"
        );
        assert!(
            stderr.contains("rate-limit backend refused the server's credentials"),
            "{policy} {password:?}: {stderr}"
        );
        assert!(!stderr.contains("not-the-password"), "{stderr}");
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
}

#[test]
fn with_redis_down_clients_get_a_fixed_message_and_the_log_one_line_per_outage() {
    let mut redis = Redis::start();
    let server = Server::start(&redis, "closed");
    assert_served(server.request(), 3);
    redis.kill();
    let before = server.log.lock().unwrap().len();
    for _ in 0..20 {
        let (status, _, body) = server.request();
        assert_eq!(status, 503, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        // Nothing of the backend's own error (address, script, server message) reaches clients.
        assert_eq!(
            body["error"]["message"],
            "Rate limits cannot be checked now; retry later."
        );
        assert_eq!(body["error"]["code"], "rate_limit_unavailable");
    }
    // The log is read from the server's stderr by another thread: let it catch up.
    std::thread::sleep(Duration::from_millis(200));
    let log = server.log.lock().unwrap()[before..].to_vec();
    assert_eq!(
        log.iter()
            .filter(|line| line.contains("rate-limit backend failed"))
            .count(),
        1,
        "{log:#?}"
    );
    assert_eq!(log.len(), 1, "twenty refusals, one line: {log:#?}");
}
