//! `serve.toml`: the whole service in one validated struct (listen addresses, body and queue
//! caps, the server's run limits, models, tenants and their rates, the rate-limit backend).
//!
//! Every table denies unknown fields, so a typo is a refusal to start, not a silent default.
//! Sizes and durations use the CLI's syntax (`"2MiB"`, `"30s"`, fuel `"10G"`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cgroup::CgroupLimits;
use crate::limits::{DeviceAccess, Limits};
use crate::serve::ratelimit::{Quota, RateLimitConfig};
pub use crate::worker::WorkerAffinity;

/// Default listen address: loopback only, so a server started without a config is not
/// reachable from the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default drain deadline: Kubernetes' default termination grace period.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Default request-body cap: 2 MiB, TEI's payload limit, above the default 1 MiB input limit
/// plus JSON overhead.
pub const DEFAULT_MAX_BODY: u64 = 2 << 20;
/// Default queue length per model: requests that wait for a free run slot before the queue is
/// full and new ones get 503.
pub const DEFAULT_QUEUE: u32 = 64;
/// Default connection limit on the API address: far above what the pool serves at once (the
/// queues absorb the difference), far below a process's usual 64 Ki file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Default header-read timeout: a client has this long from the first byte of a request's head
/// to its last. Ten seconds is generous for any real client over any real link (a full 64 KiB
/// head at 6.5 KB/s) and short enough that connections trickling a head hold their slot for
/// seconds, not for ever.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a head may have been arriving before, at `max_connections` with no connection
/// idle, it is closed for a new connection.
pub const DEFAULT_SLOW_HEAD_EVICTION: Duration = Duration::from_secs(1);
/// Default idle timeout: a keep-alive connection with no request open and no byte moving for
/// this long is closed. Above the common load balancers' own idle timeouts (AWS ALB 60 s,
/// nginx upstream keep-alive 60 s), so a pool's connection is normally closed by its owner first.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default body-read timeout: the whole body, from the handler's first read to its last byte.
/// A full default `max_body` (2 MiB) in 30 s is a minimum rate of ~70 KB/s.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on a connection's read buffer: a request head larger than this is answered 431.
/// 64 KiB is 8x nginx's default header buffer (8 KiB) and 1/6 of hyper's own default (~400
/// KiB), which is what `max_connections` idle-but-unfinished heads could otherwise pin.
pub const DEFAULT_MAX_READ_BUFFER: u64 = 64 << 10;
/// Default cap on an answer's encoded JSON: 4x the default `max_output` (16 MiB), which is what
/// floats (up to ~16 characters for 4 bytes) or bytes (up to 4 characters each) take as JSON.
pub const DEFAULT_MAX_ANSWER: u64 = 64 << 20;
/// Default cap on the connections one source address holds open: a quarter of the default
/// `max_connections`, so no single address can take every slot (idle ones are closed for new
/// clients anyway, but heads and bodies in progress are not).
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 256;
/// Default minimum body rate, bytes per second after [`DEFAULT_BODY_RATE_GRACE`]: a body
/// arriving slower is answered 408 and its connection closed. 8 KiB/s is a 64 kbit/s link,
/// far below any real client's; a 1 MiB body trickled a byte a second is cut after the grace,
/// not after the whole `body_read_timeout`.
pub const DEFAULT_MIN_BODY_RATE: u64 = 8 << 10;
/// Default grace before the minimum body rate applies (a client's first round trips, a
/// proxy's buffering).
pub const DEFAULT_BODY_RATE_GRACE: Duration = Duration::from_secs(5);
/// The smallest read buffer hyper accepts.
pub const MIN_READ_BUFFER: u64 = 8 << 10;
/// Default readiness interval: `/readyz` runs each model's probe at most once per interval
/// and answers from the last result in between (a kubelet probes every 10 s by default).
pub const DEFAULT_READINESS_INTERVAL: Duration = Duration::from_secs(5);
/// Default pool slots: concurrent sandboxes (and so the default concurrency cap per model).
pub const DEFAULT_POOL_SLOTS: u32 = 16;

/// The service's configuration (`serve.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// A separate address for `/metrics`; when set, `/metrics` is served there only, not on
    /// `listen` (it names every tenant).
    pub metrics_listen: Option<SocketAddr>,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[serde(with = "crate::units::serde::duration")]
    pub drain_deadline: Duration,
    /// Connections open at once on `listen`; past it, new ones wait in the kernel's accept
    /// backlog until one closes (see [`crate::serve::connections`]). The metrics address is
    /// not counted.
    pub max_connections: u32,
    /// Largest request body (413 past it): a declared `Content-Length` over it is refused
    /// before any body byte is read, a chunked body is cut when it passes it.
    #[serde(with = "crate::units::serde::size")]
    pub max_body: u64,
    /// From the first byte of a request's head to its last; past it the connection is closed
    /// without an answer (default [`DEFAULT_HEADER_READ_TIMEOUT`]).
    #[serde(with = "crate::units::serde::duration")]
    pub header_read_timeout: Duration,
    /// At `max_connections` with no connection idle, the connection whose head has been
    /// arriving longest is closed for a new one once its head is older than this (default
    /// [`DEFAULT_SLOW_HEAD_EVICTION`]).
    #[serde(with = "crate::units::serde::duration")]
    pub slow_head_eviction: Duration,
    /// A connection with no request open and no byte read or written for this long is closed
    /// (default [`DEFAULT_IDLE_TIMEOUT`]). Shorter frees slots sooner; longer than the load
    /// balancer's own idle timeout avoids closing a connection it is about to reuse.
    #[serde(with = "crate::units::serde::duration")]
    pub idle_timeout: Duration,
    /// From the first read of a request's body to its last byte; past it 408 and the
    /// connection is closed (default [`DEFAULT_BODY_READ_TIMEOUT`]). With `max_body` it sets
    /// the slowest rate a full body may arrive at.
    #[serde(with = "crate::units::serde::duration")]
    pub body_read_timeout: Duration,
    /// After `body_rate_grace`, a body must have arrived at this many bytes per second or
    /// more on average (counted from its first read; 0: no minimum); slower is 408 and the
    /// connection closed (default [`DEFAULT_MIN_BODY_RATE`]).
    #[serde(with = "crate::units::serde::size")]
    pub min_body_rate: u64,
    /// How long a body may take before `min_body_rate` applies (default
    /// [`DEFAULT_BODY_RATE_GRACE`]).
    #[serde(with = "crate::units::serde::duration")]
    pub body_rate_grace: Duration,
    /// Connections one source address may hold open on `listen` (0: no cap); one more is
    /// closed at once, unanswered (default [`DEFAULT_MAX_CONNECTIONS_PER_PEER`]). A
    /// `trusted_proxies` address is not capped. See [`crate::serve::peers`].
    pub max_connections_per_peer: u32,
    /// Requests per second one client address may make, whatever its tenant (absent: no
    /// limit); past it 429 with Retry-After. The client is the connection's address, or
    /// behind a trusted proxy the `X-Forwarded-For` one.
    pub peer_requests_per_second: Option<f64>,
    /// The burst of `peer_requests_per_second` (default one second's worth).
    pub peer_requests_burst: Option<u64>,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the client; any other
    /// peer's is ignored.
    pub trusted_proxies: Vec<crate::serve::peers::Cidr>,
    /// A connection's read buffer cap (at least 8 KiB): a request head that does not fit is
    /// answered 431 and the connection closed (default [`DEFAULT_MAX_READ_BUFFER`]). Bounds
    /// what `max_connections` unfinished heads hold.
    #[serde(with = "crate::units::serde::size")]
    pub max_read_buffer: u64,
    /// Largest answer body: a run's output whose JSON would be longer is refused (422
    /// `answer_too_large`) before the answer is built (default [`DEFAULT_MAX_ANSWER`]).
    #[serde(with = "crate::units::serde::size")]
    pub max_answer: u64,
    /// `/readyz` probes the models at most once per interval (one probe at a time; callers
    /// meanwhile get the last result), so probes cannot be used to run models for free
    /// (default [`DEFAULT_READINESS_INTERVAL`]).
    #[serde(with = "crate::units::serde::duration")]
    pub readiness_interval: Duration,
    /// Longest a request waits in a model's queue (default: its wall-time limit, which covers
    /// the wait anyway).
    #[serde(default, with = "opt_duration")]
    pub queue_wait: Option<Duration>,
    /// Pooled sandbox slots shared by all models.
    pub pool_slots: u32,
    /// Where guests run (default [`Isolation::Process`]).
    pub isolation: Isolation,
    /// Worker processes with `isolation = "process"` (default: the number of CPUs, at most
    /// `pool_slots`); each runs one request at a time.
    pub workers: Option<u32>,
    /// Put the workers in a cgroup where this process may create one (default `true`): a
    /// memory ceiling, swap included, and a pids cap for all workers together, joined by each
    /// worker before its first instruction and removed when the server stops. Where none can
    /// be made, one warning at start and the workers' rlimits still apply.
    pub worker_cgroup: bool,
    /// The cgroup's memory ceiling per worker, swap included (default: `limits.memory` plus
    /// the device budget plus
    /// [`WORKER_MEMORY_OVERHEAD`](crate::cgroup::WORKER_MEMORY_OVERHEAD), 512 MiB: 3.5 GiB
    /// with the default limits and device budget); the group
    /// gets `workers` times it.
    #[serde(default, with = "opt_size")]
    pub worker_memory: Option<u64>,
    /// The cgroup's processes and threads per worker (default: candle's CPU threads, the
    /// number of CPUs unless `RAYON_NUM_THREADS` says otherwise, plus
    /// [`WORKER_EXTRA_PIDS`](crate::cgroup::WORKER_EXTRA_PIDS), 16); the group gets
    /// `workers` times it.
    pub worker_pids: Option<u64>,
    /// Whether a worker may serve more than one tenant (default `shared`): `tenant` binds
    /// each worker to the first tenant it serves and replaces it, rather than reuse it, when
    /// another tenant's request needs its place ([`WorkerAffinity`]).
    pub worker_affinity: WorkerAffinity,
    /// The server's run limits: every tenant's limits are capped by these.
    pub limits: Limits,
    /// The models served (the command line's model paths are added to these).
    pub models: Vec<ModelConfig>,
    /// Where rate-limit state lives and what happens when it cannot be reached.
    pub rate_limit: RateLimitConfig,
    /// API keys and their tenants. None: one anonymous tenant, no key needed.
    pub tenants: Vec<TenantConfig>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            metrics_listen: None,
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_body: DEFAULT_MAX_BODY,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            slow_head_eviction: DEFAULT_SLOW_HEAD_EVICTION,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            min_body_rate: DEFAULT_MIN_BODY_RATE,
            body_rate_grace: DEFAULT_BODY_RATE_GRACE,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            peer_requests_per_second: None,
            peer_requests_burst: None,
            trusted_proxies: Vec::new(),
            max_read_buffer: DEFAULT_MAX_READ_BUFFER,
            max_answer: DEFAULT_MAX_ANSWER,
            readiness_interval: DEFAULT_READINESS_INTERVAL,
            queue_wait: None,
            pool_slots: DEFAULT_POOL_SLOTS,
            isolation: Isolation::default(),
            workers: None,
            worker_cgroup: true,
            worker_memory: None,
            worker_pids: None,
            worker_affinity: WorkerAffinity::Shared,
            limits: Limits::default(),
            models: Vec::new(),
            rate_limit: RateLimitConfig::default(),
            tenants: Vec::new(),
        }
    }
}

/// Where the server runs its guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// In locked-down worker processes ([`crate::worker`]): a guest that escaped wasmtime
    /// finds itself in a process with no files, sockets or new processes, and a worker that
    /// dies costs only its request (503 `worker_lost`).
    #[default]
    Process,
    /// In the server process itself (wasmtime is the only wall).
    InProcess,
}

impl ServeConfig {
    /// The worker processes `isolation = "process"` starts: `workers`, else the number of
    /// CPUs at most `pool_slots`.
    pub fn worker_count(&self) -> u32 {
        self.workers.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            u32::try_from(cpus)
                .unwrap_or(u32::MAX)
                .min(self.pool_slots)
                .max(1)
        })
    }
}

impl ServeConfig {
    /// The workers' cgroup for `workers` workers with `device_memory` each (see
    /// `worker_cgroup`), or none.
    pub fn worker_cgroup_limits(&self, workers: u32, device_memory: u64) -> Option<CgroupLimits> {
        if !self.worker_cgroup {
            return None;
        }
        let mut limits = CgroupLimits::for_workers(workers, self.limits.memory, device_memory);
        if let Some(memory) = self.worker_memory {
            limits.memory = memory.saturating_mul(u64::from(workers));
        }
        if let Some(pids) = self.worker_pids {
            limits.pids = Some(pids.saturating_mul(u64::from(workers)));
        }
        Some(limits)
    }
}

/// One served model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name requests use (`model` in `/v1/embeddings`).
    pub name: String,
    /// The component.
    pub path: PathBuf,
    /// Runs at once (default: the pool's slots).
    pub max_concurrent: Option<u32>,
    /// Requests waiting beyond those (default [`DEFAULT_QUEUE`]); a full queue answers 503.
    #[serde(default = "default_queue")]
    pub queue: u32,
    /// What answers when a run trips its fuel, memory, wall-time or device limit.
    pub fallback: Option<FallbackConfig>,
    /// A calibration profile (`wasm-infer calibrate --out`): a request whose predicted fuel or
    /// memory is over its tenant's limits is refused before it queues, with that limit's
    /// status, and the fuel quota holds the prediction instead of the cap while it runs.
    pub profile: Option<PathBuf>,
}

fn default_queue() -> u32 {
    DEFAULT_QUEUE
}

/// A model's fallback: retried once, with one of these, after a fuel, memory, wall-time or
/// device-memory trip. In `serve.toml` a table that sets exactly one of `model`, `truncate` and
/// `in_sandbox = true`; any other table is refused when the file is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "FallbackTable")]
pub enum FallbackConfig {
    /// Another served model (`model = "NAME"`).
    Model(String),
    /// The same model with each text cut to this many bytes, at a character boundary
    /// (`truncate = "2KiB"`).
    Truncate(u64),
    /// The same model and input with the accelerator hidden from the run, so a guest with an
    /// in-sandbox path takes it ([`crate::DeviceAccess::Hidden`]) (`in_sandbox = true`).
    InSandbox,
}

/// A `[models.fallback]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FallbackTable {
    model: Option<String>,
    #[serde(default, with = "opt_size")]
    truncate: Option<u64>,
    #[serde(default)]
    in_sandbox: bool,
}

impl TryFrom<FallbackTable> for FallbackConfig {
    type Error = String;

    fn try_from(table: FallbackTable) -> Result<Self, String> {
        match table {
            FallbackTable {
                model: Some(model),
                truncate: None,
                in_sandbox: false,
            } => Ok(FallbackConfig::Model(model)),
            FallbackTable {
                model: None,
                truncate: Some(bytes),
                in_sandbox: false,
            } => Ok(FallbackConfig::Truncate(bytes)),
            FallbackTable {
                model: None,
                truncate: None,
                in_sandbox: true,
            } => Ok(FallbackConfig::InSandbox),
            FallbackTable {
                model,
                truncate,
                in_sandbox,
            } => {
                let set = usize::from(model.is_some())
                    + usize::from(truncate.is_some())
                    + usize::from(in_sandbox);
                Err(format!(
                    "a fallback sets exactly one of model, truncate, in_sandbox = true ({set} set)"
                ))
            }
        }
    }
}

/// One tenant: who it is, how it proves it, what it may spend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Its name in metrics and logs.
    pub name: String,
    /// SHA-256 of its API key, hex (`wasm-infer serve hash-key` prints it).
    pub key_sha256: String,
    /// Its run limits, in `Limits`' field names; each is capped by the server's, and a field
    /// left out is the server's.
    #[serde(default)]
    pub limits: serde_json::Map<String, serde_json::Value>,
    /// Its rates (absent: unlimited).
    #[serde(default)]
    pub rates: Rates,
}

/// A tenant's rates: each pair is a GCRA quota (sustained per second, burst); a pair left out
/// is unlimited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    pub requests_per_second: Option<f64>,
    pub requests_burst: Option<u64>,
    #[serde(default, with = "opt_fuel")]
    pub fuel_per_second: Option<u64>,
    #[serde(default, with = "opt_fuel")]
    pub fuel_burst: Option<u64>,
    pub tokens_per_second: Option<f64>,
    pub tokens_burst: Option<u64>,
}

/// One tenant's rates, validated: a quota per limited resource.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TenantRates {
    pub requests: Option<Quota>,
    pub fuel: Option<Quota>,
    pub tokens: Option<Quota>,
}

impl Rates {
    fn quotas(&self, tenant: &str) -> Result<TenantRates, String> {
        let pair =
            |what: &str, per_second: Option<f64>, burst: Option<u64>| match (per_second, burst) {
                (None, None) => Ok(None),
                (Some(per_second), burst) if per_second > 0.0 && per_second.is_finite() => {
                    // A burst left out is one second's worth (at least one unit).
                    let burst = burst.unwrap_or((per_second.ceil() as u64).max(1));
                    if burst == 0 {
                        return Err(format!("tenant {tenant}: {what}_burst must be at least 1"));
                    }
                    Ok(Some(Quota { per_second, burst }))
                }
                (Some(_), _) => Err(format!(
                    "tenant {tenant}: {what}_per_second must be a positive number"
                )),
                (None, Some(_)) => Err(format!(
                    "tenant {tenant}: {what}_burst needs {what}_per_second"
                )),
            };
        Ok(TenantRates {
            requests: pair("requests", self.requests_per_second, self.requests_burst)?,
            fuel: pair(
                "fuel",
                self.fuel_per_second.map(|f| f as f64),
                self.fuel_burst,
            )?,
            tokens: pair("tokens", self.tokens_per_second, self.tokens_burst)?,
        })
    }
}

/// A tenant, validated: its key hash as bytes, its limits capped, its quotas.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub key_sha256: Option<[u8; 32]>,
    pub limits: Limits,
    pub rates: TenantRates,
}

/// The tenant a server without `[[tenants]]` serves everyone as.
pub const ANONYMOUS: &str = "anonymous";

impl ServeConfig {
    /// Reads and parses `path`.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a config's text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The edge's settings a server cannot run with.
    pub fn check_edge(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_read_buffer < MIN_READ_BUFFER {
            return Err(format!(
                "max_read_buffer must be at least {MIN_READ_BUFFER} bytes (hyper's minimum)"
            ));
        }
        for (name, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("slow_head_eviction", self.slow_head_eviction),
            ("idle_timeout", self.idle_timeout),
            ("body_read_timeout", self.body_read_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{name} must be more than zero"));
            }
        }
        self.peer_limits()?;
        Ok(())
    }

    /// The per-peer limits, validated.
    pub fn peer_limits(&self) -> Result<crate::serve::peers::PeerLimits, String> {
        let requests = match (self.peer_requests_per_second, self.peer_requests_burst) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err("peer_requests_burst needs peer_requests_per_second".into())
            }
            (Some(rate), burst) => {
                if !(rate > 0.0 && rate.is_finite()) {
                    return Err("peer_requests_per_second must be a positive number".into());
                }
                let burst = burst.unwrap_or((rate.ceil() as u64).max(1));
                if burst == 0 {
                    return Err("peer_requests_burst must be at least 1".into());
                }
                Some(Quota {
                    per_second: rate,
                    burst,
                })
            }
        };
        Ok(crate::serve::peers::PeerLimits {
            max_connections: self.max_connections_per_peer,
            requests,
            trusted_proxies: self.trusted_proxies.clone(),
        })
    }

    /// The tenants, validated (one anonymous tenant with the server's limits when none are
    /// configured).
    pub fn tenants(&self) -> Result<Vec<Tenant>, String> {
        if self.tenants.is_empty() {
            return Ok(vec![Tenant {
                name: ANONYMOUS.into(),
                key_sha256: None,
                limits: self.limits.clone(),
                rates: TenantRates::default(),
            }]);
        }
        let mut names = std::collections::HashSet::new();
        self.tenants
            .iter()
            .map(|t| {
                if !names.insert(t.name.as_str()) {
                    return Err(format!("tenant {} is configured twice", t.name));
                }
                let hash = hex::decode(t.key_sha256.trim())
                    .ok()
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .ok_or_else(|| {
                        format!(
                            "tenant {}: key_sha256 must be 64 hex digits (wasm-infer serve \
                             hash-key prints it)",
                            t.name
                        )
                    })?;
                Ok(Tenant {
                    name: t.name.clone(),
                    key_sha256: Some(hash),
                    limits: capped_limits(&self.limits, &t.limits)
                        .map_err(|e| format!("tenant {}: limits: {e}", t.name))?,
                    rates: t.rates.quotas(&t.name)?,
                })
            })
            .collect()
    }
}

/// `server`'s limits with `overrides` applied, each field capped by the server's.
pub fn capped_limits(
    server: &Limits,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<Limits, String> {
    let mut merged = match serde_json::to_value(server).map_err(|e| e.to_string())? {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("Limits serialises as an object"),
    };
    merged.extend(overrides.clone());
    let asked: Limits =
        serde_json::from_value(serde_json::Value::Object(merged)).map_err(|e| e.to_string())?;
    Ok(Limits {
        fuel: match (asked.fuel, server.fuel) {
            (Some(a), Some(s)) => Some(a.min(s)),
            (a, s) => a.or(s),
        },
        memory: asked.memory.min(server.memory),
        wall_time: asked.wall_time.min(server.wall_time),
        max_input: asked.max_input.min(server.max_input),
        max_batch: asked.max_batch.min(server.max_batch),
        max_output: asked.max_output.min(server.max_output),
        device_memory: asked.device_memory.min(server.device_memory),
        // Hidden is the tighter of the two, as a cap takes the smaller.
        device: if asked.device == DeviceAccess::Hidden {
            asked.device
        } else {
            server.device
        },
    })
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "crate::units::serde::duration")] Duration);
        Ok(Some(W::deserialize(d)?.0))
    }
}

mod opt_size {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "crate::units::serde::size")] u64);
        Ok(Some(W::deserialize(d)?.0))
    }
}

mod opt_fuel {
    use serde::Deserializer;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        crate::units::serde::fuel::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_cgroup_is_on_by_default_with_figures_per_worker() {
        let threads = candle_core::utils::get_num_threads() as u64;
        let config = ServeConfig::from_toml("").unwrap();
        // 1 GiB of guest memory, the 2 GiB device budget and 512 MiB, per worker.
        assert_eq!(
            config.worker_cgroup_limits(4, 2 << 30),
            Some(CgroupLimits {
                memory: 4 * (3584 << 20),
                cpus: None,
                pids: Some(4 * (threads + 16)),
            })
        );
        let config = ServeConfig::from_toml(
            "worker_memory = \"300MiB\"\nworker_pids = 40\n[limits]\nmemory = \"64MiB\"",
        )
        .unwrap();
        assert_eq!(
            config.worker_cgroup_limits(3, 2 << 30),
            Some(CgroupLimits {
                memory: 3 * (300 << 20),
                cpus: None,
                pids: Some(120),
            })
        );
        let config = ServeConfig::from_toml("worker_cgroup = false").unwrap();
        assert_eq!(config.worker_cgroup_limits(3, 2 << 30), None);
    }

    #[test]
    fn worker_affinity_is_shared_unless_set_to_tenant() {
        let default = ServeConfig::from_toml("").unwrap();
        assert_eq!(default.worker_affinity, WorkerAffinity::Shared);
        let tenant = ServeConfig::from_toml("worker_affinity = \"tenant\"").unwrap();
        assert_eq!(tenant.worker_affinity, WorkerAffinity::Tenant);
        let error = ServeConfig::from_toml("worker_affinity = \"model\"").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("unknown variant `model`, expected `shared` or `tenant`"),
            "{error}"
        );
    }

    #[test]
    fn a_full_config_parses_and_tenant_limits_are_capped_by_the_servers() {
        let config = ServeConfig::from_toml(
            r#"
            listen = "127.0.0.1:9000"
            drain_deadline = "5s"
            max_body = "1MiB"
            [limits]
            fuel = "10G"
            memory = "1GiB"
            [[models]]
            name = "minilm"
            path = "minilm.wasm"
            max_concurrent = 4
            [[tenants]]
            name = "acme"
            key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            [tenants.limits]
            fuel = "20G"
            memory = "512MiB"
            [tenants.rates]
            requests_per_second = 2.0
            requests_burst = 5
            fuel_per_second = "1G"
            "#,
        )
        .unwrap();
        assert_eq!(config.max_body, 1 << 20);
        assert_eq!(config.drain_deadline, Duration::from_secs(5));
        assert_eq!(config.models[0].queue, DEFAULT_QUEUE);
        let tenants = config.tenants().unwrap();
        assert_eq!(tenants[0].limits.fuel, Some(10_000_000_000));
        assert_eq!(tenants[0].limits.memory, 512 << 20);
        assert_eq!(tenants[0].limits.wall_time, config.limits.wall_time);
        assert_eq!(
            tenants[0].rates.requests,
            Some(Quota {
                per_second: 2.0,
                burst: 5
            })
        );
        assert_eq!(
            tenants[0].rates.fuel,
            Some(Quota {
                per_second: 1e9,
                burst: 1_000_000_000
            })
        );
        assert_eq!(tenants[0].rates.tokens, None);
    }

    #[test]
    fn typos_and_bad_keys_refuse_to_start() {
        assert!(ServeConfig::from_toml("listn = \"127.0.0.1:1\"").is_err());
        assert!(ServeConfig::from_toml("[limits]\nmemry = \"1G\"").is_err());
        let config =
            ServeConfig::from_toml("[[tenants]]\nname = \"a\"\nkey_sha256 = \"abc\"").unwrap();
        assert!(config.tenants().unwrap_err().contains("64 hex digits"));
        let config = ServeConfig::from_toml(
            "[[tenants]]\nname = \"a\"\nkey_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n[tenants.limits]\nmemry = 1",
        )
        .unwrap();
        assert!(config.tenants().unwrap_err().contains("memry"));
    }

    #[test]
    fn no_tenants_is_one_anonymous_tenant_with_the_server_limits() {
        let config = ServeConfig::default();
        let tenants = config.tenants().unwrap();
        assert_eq!(tenants.len(), 1);
        assert_eq!(tenants[0].name, ANONYMOUS);
        assert_eq!(tenants[0].key_sha256, None);
        assert_eq!(tenants[0].limits, Limits::default());
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.slow_head_eviction, Duration::from_secs(1));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.max_read_buffer, 64 << 10);
        assert_eq!(config.max_connections_per_peer, 256);
        assert_eq!(config.min_body_rate, 8 << 10);
        assert_eq!(config.body_rate_grace, Duration::from_secs(5));
        assert_eq!(config.peer_limits().unwrap().requests, None);
        assert!(config.trusted_proxies.is_empty());
        assert_eq!(config.check_edge(), Ok(()));
    }

    #[test]
    fn edge_settings_parse_and_unusable_ones_refuse_to_start() {
        let config = ServeConfig::from_toml(
            "header_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nbody_read_timeout = \"3s\"\n\
             slow_head_eviction = \"250ms\"\nmax_read_buffer = \"16KiB\"\nreadiness_interval = \"1m\"",
        )
        .unwrap();
        assert_eq!(config.header_read_timeout, Duration::from_secs(1));
        assert_eq!(config.slow_head_eviction, Duration::from_millis(250));
        assert_eq!(config.idle_timeout, Duration::from_secs(2));
        assert_eq!(config.body_read_timeout, Duration::from_secs(3));
        assert_eq!(config.max_read_buffer, 16 << 10);
        assert_eq!(config.readiness_interval, Duration::from_secs(60));
        let small = ServeConfig::from_toml("max_read_buffer = \"4KiB\"").unwrap();
        assert!(small.check_edge().unwrap_err().contains("max_read_buffer"));
        let zero = ServeConfig::from_toml("idle_timeout = \"0s\"").unwrap();
        assert!(zero.check_edge().unwrap_err().contains("idle_timeout"));
        let peers = ServeConfig::from_toml(
            "max_connections_per_peer = 8\npeer_requests_per_second = 2.5\n\
             trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\nmin_body_rate = \"1KiB\"\n\
             body_rate_grace = \"2s\"",
        )
        .unwrap();
        let limits = peers.peer_limits().unwrap();
        assert_eq!(limits.max_connections, 8);
        assert_eq!(
            limits.requests,
            Some(Quota {
                per_second: 2.5,
                burst: 3
            })
        );
        assert_eq!(limits.trusted_proxies.len(), 2);
        assert_eq!(peers.min_body_rate, 1024);
        assert_eq!(peers.body_rate_grace, Duration::from_secs(2));
        assert!(ServeConfig::from_toml("trusted_proxies = [\"10.0.0.0/40\"]").is_err());
        let burst_alone = ServeConfig::from_toml("peer_requests_burst = 3").unwrap();
        assert!(burst_alone
            .check_edge()
            .unwrap_err()
            .contains("peer_requests"));
    }

    #[test]
    fn a_fallback_sets_exactly_one_of_model_truncate_and_in_sandbox() {
        let fallback = |table: &str| {
            let text = format!("[[models]]\nname = \"m\"\npath = \"m.wasm\"\nfallback = {table}");
            ServeConfig::from_toml(&text).map(|config| config.models[0].fallback.clone())
        };
        for (one, expected) in [
            ("{ in_sandbox = true }", FallbackConfig::InSandbox),
            (
                "{ model = \"small\" }",
                FallbackConfig::Model("small".into()),
            ),
            ("{ truncate = \"2KiB\" }", FallbackConfig::Truncate(2048)),
            ("{ truncate = 8 }", FallbackConfig::Truncate(8)),
        ] {
            assert_eq!(fallback(one), Ok(Some(expected)), "{one}");
        }
        for (bad, set) in [
            ("{}", 0),
            ("{ in_sandbox = false }", 0),
            ("{ in_sandbox = true, truncate = 8 }", 2),
            ("{ model = \"small\", truncate = 8 }", 2),
            ("{ model = \"small\", truncate = 8, in_sandbox = true }", 3),
        ] {
            let why = fallback(bad).unwrap_err();
            assert!(
                why.contains(&format!(
                    "a fallback sets exactly one of model, truncate, in_sandbox = true ({set} set)"
                )),
                "{bad}: {why}"
            );
        }
        // An unknown key is still refused.
        assert!(fallback("{ modle = \"small\" }")
            .unwrap_err()
            .contains("modle"));
    }
}
