//! `wasm-infer serve`: the HTTP service. It only translates: every decision about a run is the
//! library's (`Error::kind()` maps to a status, see [`status`]).
//!
//! One pooled [`Runtime`], each model loaded (and pre-initialised) once at start; with
//! `isolation = "process"` (the default) every run, readiness probes included, goes to a
//! [`WorkerPool`] of locked-down worker processes started from the same compiled cache and the
//! same engine settings, and a worker lost mid-request answers 503 `worker_lost`. Each
//! connection is watched for slow heads and idleness ([`connections`]); per request, from its
//! head alone: the tenant from its API key ([`auth`]), its declared length, its request and fuel
//! quotas reserved ([`ratelimit`]); then its body read and parsed, its tokens reserved, a place
//! in the model's bounded queue ([`queue`]), the run under the tenant's limits, the unused fuel
//! refunded ([`execute`], the pipeline), the answer in OpenAI's shape ([`routes`], the HTTP
//! translation), the figures counted ([`metrics`]).
//! SIGTERM/SIGINT drains: `/readyz` turns false, new requests get 503, in-flight ones finish
//! within the drain deadline.

mod auth;
mod body;
mod chat;
pub mod config;
mod connections;
mod execute;
mod memory;
mod metrics;
mod peers;
mod queue;
pub mod ratelimit;
mod request;
mod routes;
mod status;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::model::{LoadOptions, Model};
use crate::runtime::{Runtime, RuntimeConfig};

pub use config::{Isolation, ServeConfig, Tenant};

use crate::data::Input;
use crate::error::RunError;
use crate::generate::{GenerateRequest, Generation, GenerationError, OnEmit};
use crate::limits::Limits;
use crate::model::Outcome;
use crate::worker::{stopped_by_caller, StopCheck, WorkerPool, WorkerPoolConfig, STOP_POLL};

/// One served model and its queue.
pub(crate) struct Served {
    pub(crate) name: String,
    /// The model as loaded in this process: its info, and its runs with
    /// `isolation = "in_process"`.
    pub(crate) model: Model,
    /// Its index in the worker pool's models.
    pub(crate) index: usize,
    pub(crate) queue: queue::Queue,
    pub(crate) fallback: Option<config::FallbackConfig>,
}

/// Everything a request handler reads.
pub struct State {
    pub(crate) config: ServeConfig,
    pub(crate) runtime: Runtime,
    /// The workers every run goes to (`isolation = "process"`).
    pub(crate) workers: Option<WorkerPool>,
    pub(crate) models: BTreeMap<String, Arc<Served>>,
    pub(crate) tenants: Vec<Tenant>,
    pub(crate) limiter: ratelimit::Limiter,
    pub(crate) metrics: metrics::Metrics,
    /// Set on SIGTERM/SIGINT: readyz false, new requests 503.
    pub(crate) draining: AtomicBool,
    /// Requests between admission and answer (what the drain waits for).
    pub(crate) in_flight: AtomicUsize,
    pub(crate) drained: tokio::sync::Notify,
    /// The last readiness check (`/readyz`); its lock is held while a check runs, so callers
    /// meanwhile wait for that one rather than start their own.
    pub(crate) readiness: tokio::sync::Mutex<Option<Readiness>>,
}

/// One readiness check's result.
pub(crate) struct Readiness {
    pub(crate) checked: std::time::Instant,
    pub(crate) ready: bool,
    /// What `/readyz` answers (each model's probe).
    pub(crate) body: serde_json::Value,
}

impl State {
    /// Runs `input` on `served` under `limits`: in a worker with `isolation = "process"`,
    /// else in this process.
    pub(crate) async fn run(
        &self,
        served: &Served,
        input: Input,
        limits: &Limits,
    ) -> Result<Outcome, RunError> {
        match &self.workers {
            Some(pool) => pool.run(served.index, input, limits).await,
            None => served.model.run_async(input, limits).await,
        }
    }

    /// Runs `tenant`'s `input` on `served`, as [`State::run`]; with workers and
    /// `worker_affinity = "tenant"`, only in a worker that ran no other tenant's request.
    pub(crate) async fn run_for_tenant(
        &self,
        served: &Served,
        tenant: &str,
        input: Input,
        limits: &Limits,
    ) -> Result<Outcome, RunError> {
        match &self.workers {
            Some(pool) => {
                pool.run_for_tenant(tenant, served.index, input, limits)
                    .await
            }
            None => served.model.run_async(input, limits).await,
        }
    }

    /// Generates for `request` on `served` under `limits` (for `tenant`, as
    /// [`State::run_for_tenant`] runs; `None` for the server's own probes), each piece handed
    /// to `on_emit`; `stop` is asked while it runs. In a worker, a stop kills the worker
    /// ([`WorkerPool::generate_for_tenant`]); in this process it drops the generation, which
    /// wasmtime cancels at the guest's next yield. Either way what the run used is not known.
    pub(crate) async fn generate_for_tenant(
        &self,
        served: &Served,
        tenant: Option<&str>,
        request: GenerateRequest,
        limits: &Limits,
        on_emit: OnEmit,
        stop: StopCheck,
    ) -> Result<Generation, Box<GenerationError>> {
        if let Some(pool) = &self.workers {
            return pool
                .generate_for_tenant(tenant, served.index, request, limits, on_emit, stop)
                .await;
        }
        let generation = served.model.generate_async(request, limits, Some(on_emit));
        tokio::pin!(generation);
        loop {
            tokio::select! {
                result = &mut generation => return result,
                () = tokio::time::sleep(STOP_POLL) => {
                    if stop() {
                        return Err(Box::new(GenerationError {
                            error: RunError::new(
                                stopped_by_caller(),
                                crate::usage::Usage::default(),
                            ),
                            partial: Default::default(),
                            token_fuel: Default::default(),
                        }));
                    }
                }
            }
        }
    }

    /// Refreshes the gauges that are read from elsewhere (device memory, free slots).
    fn refresh_gauges(&self) {
        let device = self.runtime.device_usage();
        self.metrics.device_memory_used.set(device.used as i64);
        // The runtime's own count (the serve runtime is always pooled): a run holds its slot
        // from store to drop, which the queues' counts do not see.
        let free = self
            .runtime
            .slots_free()
            .unwrap_or(self.config.pool_slots as usize);
        self.metrics.pool_slots_free.set(free as i64);
        if let Some(pool) = &self.workers {
            let stats = pool.stats();
            self.metrics.workers.set(pool.places() as i64);
            self.metrics
                .workers_started
                .inner()
                .store(stats.started, Ordering::Relaxed);
            self.metrics
                .workers_lost
                .inner()
                .store(stats.lost, Ordering::Relaxed);
            for (reason, count) in [
                ("abnormal", stats.recycled_abnormal),
                ("runs", stats.recycled_runs),
                ("memory", stats.recycled_memory),
                ("tenant", stats.recycled_tenant),
                ("stopped", stats.recycled_stopped),
            ] {
                self.metrics
                    .workers_recycled
                    .get_or_create(&metrics::ReasonLabels {
                        reason: reason.into(),
                    })
                    .inner()
                    .store(count, Ordering::Relaxed);
            }
        }
    }
}

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A model failed to load (its [`Error::kind`] gives the CLI's exit status).
    #[error("{path}: {error}")]
    Model { path: PathBuf, error: Error },
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A model to serve: name, path, concurrency, queue, fallback, profile.
type ModelEntry = (
    Option<String>,
    PathBuf,
    Option<u32>,
    u32,
    Option<config::FallbackConfig>,
    Option<PathBuf>,
);

/// Loads the models and builds the shared state. `models` are added to the config's (each
/// named by its model info's name).
pub async fn prepare(
    mut config: ServeConfig,
    models: &[PathBuf],
    runtime_config: RuntimeConfig,
    load: &LoadOptions,
) -> Result<Arc<State>, ServeError> {
    config.check_edge().map_err(ServeError::Config)?;
    let runtime = Runtime::with_config(RuntimeConfig {
        pool: Some(config.pool_slots),
        ..runtime_config
    })
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let tenants = config.tenants().map_err(ServeError::Config)?;
    for tenant in &tenants {
        if tenant.rates.fuel.is_some() && tenant.limits.fuel.is_none() {
            return Err(ServeError::Config(format!(
                "tenant {}: a fuel rate needs a fuel limit (limits.fuel), which is what a request \
                 reserves",
                tenant.name
            )));
        }
    }
    let mut loaded = BTreeMap::new();
    let mut paths = Vec::new();
    let process = config.isolation == Isolation::Process;
    let workers = config.worker_count();
    if process && workers == 0 {
        return Err(ServeError::Config("workers must be at least 1".into()));
    }
    let mut entries: Vec<ModelEntry> = config
        .models
        .iter()
        .map(|m| {
            (
                Some(m.name.clone()),
                m.path.clone(),
                m.max_concurrent,
                m.queue,
                m.fallback.clone(),
                m.profile.clone(),
            )
        })
        .collect();
    entries.extend(
        models
            .iter()
            .map(|p| (None, p.clone(), None, config::DEFAULT_QUEUE, None, None)),
    );
    if entries.is_empty() {
        return Err(ServeError::Config("no model to serve".into()));
    }
    for (name, path, max_concurrent, queue, fallback, profile) in entries {
        let bytes = std::fs::read(&path).map_err(|error| ServeError::Model {
            path: path.clone(),
            error: Error::Io {
                path: path.clone(),
                error,
            },
        })?;
        let model = Model::from_bytes_async(&runtime, &bytes, load)
            .await
            .map_err(|error| ServeError::Model {
                path: path.clone(),
                error,
            })?;
        // A profile admits this model's requests by prediction (execute.rs, before they queue).
        let model = match profile {
            Some(profile_path) => crate::profile::Profile::read(&profile_path)
                .map_err(|e| ServeError::Config(e.to_string()))
                .and_then(|profile| {
                    model
                        .with_profile(profile)
                        .map_err(|e| ServeError::Config(format!("{}: {e}", profile_path.display())))
                })?,
            None => model,
        };
        let name = name.unwrap_or_else(|| model.info().name.clone());
        // With workers, a run holds one of them: more at once would only wait for one.
        let default_concurrency = if process { workers } else { config.pool_slots };
        let concurrency = max_concurrent.unwrap_or(default_concurrency).max(1);
        tracing::info!(model = %name, path = %path.display(), concurrency, queue, "model loaded");
        let served = Served {
            name: name.clone(),
            model,
            index: paths.len(),
            queue: queue::Queue::new(concurrency, queue),
            fallback,
        };
        if loaded.insert(name.clone(), Arc::new(served)).is_some() {
            return Err(ServeError::Config(format!("model {name} is served twice")));
        }
        paths.push(path);
    }
    for served in loaded.values() {
        if let Some(config::FallbackConfig::Model(other)) = &served.fallback {
            if !loaded.contains_key(other) {
                return Err(ServeError::Config(format!(
                    "model {}: fallback model {other} is not served",
                    served.name
                )));
            }
        }
    }
    let limiter = ratelimit::Limiter::new(&config.rate_limit)
        .await
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let workers = if process {
        let cgroup = config.worker_cgroup_limits(workers, runtime.config().device_memory);
        let affinity = config.worker_affinity;
        Some(start_workers(&runtime, paths, workers, load, cgroup, affinity).await?)
    } else {
        None
    };
    config.models.clear();
    Ok(Arc::new(State {
        config,
        runtime,
        workers,
        models: loaded,
        tenants,
        limiter,
        metrics: metrics::Metrics::new(),
        draining: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        drained: tokio::sync::Notify::new(),
        readiness: tokio::sync::Mutex::new(None),
    }))
}

/// Starts `count` workers over the models at `paths` (already compiled into the runtime's
/// cache by loading them here), with this runtime's settings: its engine settings whole, but
/// one pooled slot per worker (a worker runs one request at a time).
async fn start_workers(
    runtime: &Runtime,
    paths: Vec<PathBuf>,
    count: u32,
    load: &LoadOptions,
    cgroup: Option<crate::cgroup::CgroupLimits>,
    affinity: crate::worker::WorkerAffinity,
) -> Result<WorkerPool, ServeError> {
    let parent = runtime.config();
    let binary = std::env::current_exe()
        .map_err(|e| ServeError::Config(format!("cannot find this binary for the workers: {e}")))?;
    let mut pool = WorkerPoolConfig::new(count, binary, paths);
    pool.cache_dir = parent.cache_dir.clone();
    pool.accel = parent.accel;
    pool.device_memory = parent.device_memory;
    pool.resident_memory = load.resident_memory;
    pool.engine = crate::runtime::EngineSettings {
        pool: Some(1),
        ..parent.engine_settings()
    };
    pool.preinit = load.preinit;
    pool.cgroup = cgroup;
    pool.affinity = affinity;
    let pool = tokio::task::spawn_blocking(move || WorkerPool::start(pool))
        .await
        .map_err(|e| ServeError::Config(format!("starting the workers: {e}")))?
        .map_err(|e| ServeError::Config(format!("starting the workers: {e}")))?;
    match pool.cgroup() {
        Ok(dirs) => tracing::info!(workers = count, cgroup = ?dirs, "workers started"),
        Err(why) => tracing::info!(workers = count, no_cgroup = why, "workers started"),
    }
    Ok(pool)
}

/// Serves until SIGTERM/SIGINT, then drains: `/readyz` false and new requests 503 while the
/// in-flight ones finish, for at most the drain deadline; what is still running then is
/// cancelled (and counted). Returns how many were cancelled.
pub async fn serve(state: Arc<State>) -> Result<usize, ServeError> {
    let app = routes::router(state.clone());
    memory::return_freed_memory();
    let listener = tokio::net::TcpListener::bind(state.config.listen).await?;
    let local = listener.local_addr()?;
    let peer_limits = state.config.peer_limits().map_err(ServeError::Config)?;
    let refused = |reason: &str| {
        state
            .metrics
            .peer_refused
            .get_or_create(&metrics::CloseLabels {
                reason: reason.into(),
            })
            .clone()
    };
    let listener = connections::Limited::new(
        listener,
        state.config.max_connections,
        state.config.slow_head_eviction,
        state.metrics.connections_open.clone(),
        Arc::new(peers::Peers::new(peer_limits)),
        refused("connections"),
    );
    let edge = connections::Edge {
        header_read_timeout: state.config.header_read_timeout,
        idle_timeout: state.config.idle_timeout,
        max_read_buffer: state.config.max_read_buffer as usize,
    };
    let closed = state.metrics.connections_closed.clone();
    let (shutdown, shutdown_seen) = tokio::sync::watch::channel(false);
    let mut api = tokio::spawn(connections::serve(
        listener,
        app,
        edge,
        closed,
        refused("requests"),
        shutdown_seen,
    ));
    let mut servers = tokio::task::JoinSet::new();
    if let Some(metrics_addr) = state.config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(metrics_addr).await?;
        let metrics_local: SocketAddr = listener.local_addr()?;
        tracing::info!(%metrics_local, "metrics listening");
        eprintln!("metrics on http://{metrics_local}/metrics");
        let app = routes::metrics_router(state.clone());
        servers.spawn(async move { axum::serve(listener, app).await });
    }
    tracing::info!(%local, models = ?state.models.keys().collect::<Vec<_>>(), "listening");
    // The line tests and scripts wait for.
    eprintln!("listening on http://{local}");
    tokio::select! {
        _ = &mut api => {}
        Some(finished) = servers.join_next() => {
            if let Ok(Err(error)) = finished {
                return Err(error.into());
            }
        }
        () = shutdown_signal() => {}
    }
    state.draining.store(true, Ordering::SeqCst);
    let deadline = state.config.drain_deadline;
    let drain_started = tokio::time::Instant::now();
    tracing::info!(
        in_flight = state.in_flight.load(Ordering::SeqCst),
        ?deadline,
        "draining"
    );
    let wait_idle = async {
        loop {
            let notified = state.drained.notified();
            if state.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    };
    let cancelled = match tokio::time::timeout(deadline, wait_idle).await {
        Ok(()) => 0,
        Err(_) => state.in_flight.load(Ordering::SeqCst),
    };
    state.metrics.drain_cancelled.inc_by(cancelled as u64);
    if cancelled > 0 {
        tracing::warn!(
            cancelled,
            "drain deadline passed: cancelling what still runs"
        );
    }
    // Answers already produced are written out before the connections are dropped: each
    // connection finishes the answer it is writing and closes, within what is left of the
    // deadline (a client that does not read is the one cut off).
    let _ = shutdown.send(true);
    let left = deadline.saturating_sub(drain_started.elapsed());
    if tokio::time::timeout(left.max(DRAIN_FLUSH), &mut api)
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed: closing connections still writing");
    }
    api.abort();
    servers.abort_all();
    tracing::info!(cancelled, "stopped");
    Ok(cancelled)
}

/// The least time connections get to write out answers already produced, even when the
/// runs took the whole drain deadline.
const DRAIN_FLUSH: Duration = Duration::from_millis(100);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// `wasm-infer serve hash-key`: the SHA-256 hex of an API key, as `key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}
