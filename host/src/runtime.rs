//! The shared engine: one per process, configured once for metering and determinism, with the
//! epoch ticker that enforces wall-time limits and the precompiled-model cache location.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::accel::{Accel, AccelMode, DeviceUsage};
use crate::error::{Error, Result};
use crate::limits::MAX_TABLE_ELEMENTS;
use crate::sandbox::RunState;

/// Default epoch tick: 10 ms. A run ends at most one tick after its wall-time limit; each tick
/// also lets a long run yield to the async executor. Shorter ticks cost a little throughput
/// (every tick is a check in every running guest).
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(10);

/// How a [`Runtime`] is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled models are cached (`None`: no cache, compile on every load). Default:
    /// `$WASM_INFER_CACHE_DIR`, else `$XDG_CACHE_HOME/wasm-infer/precompiled`, else
    /// `~/.cache/wasm-infer/precompiled`.
    pub cache_dir: Option<PathBuf>,
    /// Epoch tick, the granularity of wall-time enforcement. Default: [`DEFAULT_EPOCH_TICK`].
    pub epoch_tick: Duration,
    /// Meter fuel (default `true`). Metering costs some speed (see the README's benchmark);
    /// without it runs report no fuel figure and a [`Limits::fuel`](crate::Limits::fuel) cap
    /// is refused, leaving wall time as the only compute bound.
    pub meter_fuel: bool,
    /// `Some(n)`: wasmtime's pooling allocator with slots for `n` concurrent sandboxes (linear
    /// memories, tables, instance state and async stacks reserved once and reused, memory
    /// images mapped copy-on-write into each slot); a run that finds every slot busy waits for
    /// one instead of failing, and the wait is reported as [`Usage::queue_time`]
    /// (crate::Usage::queue_time), outside its wall-time limit. Loading a model (its info call
    /// and pre-initialisation) takes a slot too. Each slot allows a component up to 20 core
    /// instances, 4 memories of up to 4 GiB and 8 tables.
    ///
    /// `None` (default): each run's instance is allocated on demand (still copy-on-write), the
    /// right choice for one-shot use such as the CLI.
    pub pool: Option<u32>,
    /// The device offered to guests on the accelerator path (default [`AccelMode::Auto`]:
    /// CUDA when built with the `cuda` feature and a GPU is present, else the CPU).
    pub accel: AccelMode,
    /// Host-wide device-memory budget shared by all concurrent runs, in bytes (default
    /// [`DEFAULT_HOST_DEVICE_MEMORY`]). Each run is also bounded by its own
    /// [`Limits::device_memory`](crate::Limits::device_memory).
    pub device_memory: u64,
}

/// Default host-wide device-memory budget: 2 GiB.
pub const DEFAULT_HOST_DEVICE_MEMORY: u64 = 2 << 30;

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            epoch_tick: DEFAULT_EPOCH_TICK,
            meter_fuel: true,
            pool: None,
            accel: AccelMode::Auto,
            device_memory: DEFAULT_HOST_DEVICE_MEMORY,
        }
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WASM_INFER_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("wasm-infer").join("precompiled"))
}

/// The engine and everything shared by all models and runs. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

pub(crate) struct RuntimeInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<RunState>,
    pub(crate) config: RuntimeConfig,
    pub(crate) accel: Arc<Accel>,
    /// One permit per pooled slot (`None` without a pool).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    ticker: Ticker,
}

impl Runtime {
    /// A runtime with the default configuration.
    pub fn new() -> Result<Self> {
        Self::with_config(RuntimeConfig::default())
    }

    /// A runtime with `config`.
    pub fn with_config(config: RuntimeConfig) -> Result<Self> {
        if config.pool == Some(0) {
            return Err(Error::Internal("a pool needs at least one slot".into()));
        }
        let engine =
            Engine::new(&engine_config(config.meter_fuel, config.pool)).map_err(internal)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(internal)?;
        crate::accel::add_to_linker(&mut linker).map_err(internal)?;
        let accel =
            Arc::new(Accel::new(config.accel, config.device_memory).map_err(Error::Internal)?);
        let ticker = Ticker::start(engine.clone(), config.epoch_tick);
        let slots = config
            .pool
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                accel,
                slots,
                ticker,
            }),
        })
    }

    /// The host-wide device-memory figures (all runs of this runtime).
    pub fn device_usage(&self) -> DeviceUsage {
        self.inner.accel.usage()
    }

    /// The offered device as `(kind, name)`: `("cpu", "host CPU (2 threads)")`, `("none", ..)`.
    pub fn device(&self) -> (&'static str, &str) {
        self.inner.accel.describe()
    }

    /// Waits for a free pooled slot (immediately `None` without a pool). Hold the permit for as
    /// long as the store lives.
    pub(crate) async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = self.inner.slots.clone()?;
        // The semaphore is never closed.
        slots.acquire_owned().await.ok()
    }

    /// The wasmtime engine (for embedders that want to share it).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    pub(crate) fn epoch_tick(&self) -> Duration {
        self.inner.ticker.tick
    }
}

/// The engine settings every run relies on.
///
/// - fuel metering: the deterministic compute cap and the fuel figure in every usage report;
/// - epoch interruption: the wall-time limit, and periodic yields so that async runs share
///   threads fairly (cheaper than fuel-based yielding, which would cost determinism nothing but
///   adds a check per yield interval);
/// - NaN canonicalisation and deterministic relaxed SIMD: the same bits on every machine.
fn engine_config(meter_fuel: bool, pool: Option<u32>) -> Config {
    let mut config = Config::new();
    if let Some(n) = pool {
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_component_instances(n)
            .total_core_instances(n.saturating_mul(20))
            .max_core_instances_per_component(20)
            .total_memories(n.saturating_mul(4))
            .max_memories_per_component(4)
            .max_memory_size(4 << 30)
            .total_tables(n.saturating_mul(8))
            .max_tables_per_component(8)
            .table_elements(MAX_TABLE_ELEMENTS as usize)
            .total_stacks(n);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    }
    config
        .consume_fuel(meter_fuel)
        .epoch_interruption(true)
        .cranelift_nan_canonicalization(true)
        .relaxed_simd_deterministic(true)
        .wasm_component_model(true);
    config
}

fn internal(e: wasmtime::Error) -> Error {
    Error::Internal(format!("{e:#}"))
}

/// A thread that advances the engine's epoch every tick until the runtime is dropped.
struct Ticker {
    tick: Duration,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wasm-infer-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .expect("spawning the epoch ticker thread")
        };
        Self {
            tick,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
