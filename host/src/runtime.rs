//! The shared engine: one per process, configured once for metering and determinism from one
//! set of [`EngineSettings`] (which also make the fingerprint snapshots carry), with the epoch
//! ticker that enforces wall-time limits, the pooled slots, the linker every model is checked
//! against, and [`block_on`] for the blocking entry points.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use serde::{Deserialize, Serialize};

use crate::accel::{Accel, AccelMode, DeviceUsage};
use crate::error::{Error, Result};
use crate::limits::{MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES, MAX_TABLE_ELEMENTS};
use crate::pressure::{Admission, Ticket};
use crate::store::RunState;

/// Default epoch tick: 10 ms. A run ends at most one tick after its wall-time limit; each tick
/// also lets a long run yield to the async executor. Shorter ticks cost a little throughput
/// (every tick is a check in every running guest).
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(10);

/// How a [`Runtime`] is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled models are cached (`None`: no cache, compile on every load). Default:
    /// `$WASM_INFER_CACHE_DIR`, else `$XDG_CACHE_HOME/wasm-infer/precompiled`, else
    /// `~/.cache/wasm-infer/precompiled`. Created 0700 if missing; a directory open to other
    /// users is refused ([`Error::Config`]); entries are authenticated under the key in
    /// `<dir>.key` (created 0600 on first use), see [`crate::cache`].
    pub cache_dir: Option<PathBuf>,
    /// Epoch tick, the granularity of wall-time enforcement. Default: [`DEFAULT_EPOCH_TICK`].
    pub epoch_tick: Duration,
    /// Meter fuel (default `true`). Metering costs some speed (see docs/benchmarks.md);
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
    /// Admission under memory pressure (default `None`: admit every run). With it, fewer
    /// concurrent runs are admitted and lower memory ceilings granted as pressure rises, and
    /// runs past the cap are refused with [`Error::Overloaded`] (see [`crate::pressure`]).
    pub admission: Option<crate::pressure::AdmissionConfig>,
    /// Most bytes the cache directory may hold (default [`DEFAULT_CACHE_MAX_BYTES`]); after a
    /// write, the least recently used entries are removed until it fits. `None`: no cap.
    pub cache_max_bytes: Option<u64>,
    /// Canonicalise every NaN a float operation produces to the one bit pattern `0x7fc00000`
    /// (`f32`; `0x7ff8000000000000` for `f64`), scalar and SIMD (default
    /// [`DEFAULT_NAN_CANONICALIZATION`], off).
    ///
    /// What it buys: WebAssembly float arithmetic is bit-exact IEEE 754 on every x86-64 CPU
    /// except for the sign and payload of a NaN result, which follow the instruction the
    /// compiler picked (which operand's payload propagates, the CPU's default NaN
    /// `0xffc00000` for an invalid operation, a library call where the CPU lacks the
    /// instruction). Off, those bits can differ between machines with different CPU features,
    /// and only a guest that reads a NaN's bits as an integer (or returns them raw) can tell;
    /// on, every machine gives the same bits to every guest. What it costs: Cranelift adds a
    /// compare and a blend after every float operation, about half the in-sandbox time of a
    /// matmul-bound model (docs/determinism.md). Recorded in snapshots' engine fingerprint
    /// and part of the compiled-code cache key.
    pub nan_canonicalization: bool,
    /// The CPU features compiled code may use (default [`CpuFeatures::Host`]). Results and
    /// fuel do not depend on it (see `tests/determinism.rs`); speed does.
    pub cpu_features: CpuFeatures,
}

/// Default for [`RuntimeConfig::nan_canonicalization`]: off. The promise it would add (NaN
/// payload bits equal across machines) is one no output of a model that treats NaN as a
/// number can observe, and it halves in-sandbox speed; docs/determinism.md
/// gives the whole argument.
pub const DEFAULT_NAN_CANONICALIZATION: bool = false;

/// Which CPU features compiled guest code may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuFeatures {
    /// Every feature this CPU has (AVX2, FMA, ... as detected): the fastest code.
    #[default]
    Host,
    /// The target's baseline, raised on x86-64 to the x86-64-v2 level (SSE2 up to SSE4.2 and
    /// POPCNT: every x86-64 CPU since about 2009) so that the rounding instructions
    /// (`ceil`, `floor`, `trunc`, `nearest`, scalar and SIMD) compile to the same `roundss`/
    /// `roundps` family as on any newer CPU, never to SSE2 library calls whose NaN results
    /// differ. Instructions it lacks (AVX, FMA, ...) become longer sequences that compute the
    /// same bits (`tests/determinism.rs`).
    Baseline,
}

/// Default cap on the compiled-model cache: 2 GiB, room for a few models with their snapshots
/// (MiniLM's entries take about 350 MiB together) without growing forever as versions change.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 2 << 30;

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
            cache_max_bytes: Some(DEFAULT_CACHE_MAX_BYTES),
            admission: None,
            nan_canonicalization: DEFAULT_NAN_CANONICALIZATION,
            cpu_features: CpuFeatures::Host,
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
    accel: Arc<Accel>,
    /// One permit per pooled slot (`None` without a pool).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    admission: Option<Admission>,
    ticker: Ticker,
    /// The key of the compiled-model cache (read when the runtime is made).
    cache_key: Option<crate::cache::CacheKey>,
}

impl Runtime {
    /// A runtime with the default configuration.
    pub fn new() -> Result<Self> {
        Self::with_config(RuntimeConfig::default())
    }

    /// A runtime with `config`.
    pub fn with_config(config: RuntimeConfig) -> Result<Self> {
        if config.pool == Some(0) {
            return Err(Error::Config("a pool needs at least one slot".into()));
        }
        // The cache is checked (private to this user) and its key read before anything else.
        let cache_key = config
            .cache_dir
            .as_deref()
            .map(crate::cache::open)
            .transpose()?;
        let engine = Engine::new(&config.engine_settings().config()?).map_err(internal)?;
        if crate::cache::CODEGEN_PATCH == "absent" {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "built without wasm-infer's code-generation patch (vendor/README.md): \
                     results and fuel are the same, in-sandbox kernels run slower"
                )
            });
        }
        let mut linker = Linker::new(&engine);
        crate::wasi::add_to_linker(&mut linker).map_err(internal)?;
        crate::accel::add_to_linker(&mut linker).map_err(internal)?;
        crate::sink::add_to_linker(&mut linker).map_err(internal)?;
        let accel =
            Arc::new(Accel::new(config.accel, config.device_memory).map_err(Error::Config)?);
        let ticker = Ticker::start(engine.clone(), config.epoch_tick);
        let slots = config
            .pool
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
        let admission = config.admission.clone().map(Admission::new);
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                accel,
                slots,
                admission,
                ticker,
                cache_key,
            }),
        })
    }

    /// The device every run of this runtime is offered, and its host-wide pool.
    pub(crate) fn accel(&self) -> &Arc<Accel> {
        &self.inner.accel
    }

    /// The host-wide device-memory figures (all runs of this runtime).
    pub fn device_usage(&self) -> DeviceUsage {
        self.inner.accel.usage()
    }

    /// The offered device as `(kind, name)`: `("cpu", "host CPU (2 threads)")`, `("none", ..)`.
    pub fn device(&self) -> (&'static str, &str) {
        self.inner.accel.describe()
    }

    /// Pooled slots free now (`None` when the runtime is not pooled): the permits of the
    /// semaphore every pooled run holds for as long as its store lives.
    pub fn slots_free(&self) -> Option<usize> {
        self.inner
            .slots
            .as_ref()
            .map(|slots| slots.available_permits())
    }

    /// Waits for a free pooled slot (immediately `None` without a pool). Hold the permit for as
    /// long as the store lives.
    pub(crate) async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = self.inner.slots.clone()?;
        // The semaphore is never closed.
        slots.acquire_owned().await.ok()
    }

    /// Admits a run under `limits` (see [`RuntimeConfig::admission`]): its place, held until
    /// dropped, and the limits it is granted; or [`Error::Overloaded`].
    pub(crate) fn admit(&self, limits: &crate::Limits) -> Result<(Option<Ticket>, crate::Limits)> {
        match &self.inner.admission {
            Some(admission) => admission
                .admit(limits)
                .map(|(ticket, granted)| (Some(ticket), granted)),
            None => Ok((None, limits.clone())),
        }
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

    /// The fingerprint of this runtime's engine settings.
    pub fn fingerprint(&self) -> EngineFingerprint {
        self.inner.config.engine_settings().fingerprint()
    }

    /// The compiled-model cache, if this runtime has one.
    pub fn cache(&self) -> Option<crate::cache::Cache> {
        let dir = self.inner.config.cache_dir.clone()?;
        let key = self.inner.cache_key.clone()?;
        Some(crate::cache::Cache::with_key(
            dir,
            self.inner.config.cache_max_bytes,
            key,
        ))
    }
}

/// The engine settings that decide what a run computes, what its figures mean, and which
/// compiled code and snapshots are interchangeable. The engine's `Config` and the fingerprint
/// recorded in snapshots are both derived from here, so they cannot disagree.
///
/// - fuel metering: the deterministic compute cap and the fuel figure in every usage report;
/// - epoch interruption: the wall-time limit, and periodic yields so that async runs share
///   threads fairly (cheaper than fuel-based yielding, which adds a check per yield interval);
/// - SIMD, with relaxed SIMD made deterministic: the same bits on every machine, up to NaN
///   payloads, which NaN canonicalisation fixes too when it is on.
///
/// Worker processes receive these whole, serialised ([`crate::worker`]), so a worker's engine
/// is the parent's by construction, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSettings {
    /// Fuel metering on.
    pub meter_fuel: bool,
    /// Pooled slots, if any (see [`RuntimeConfig::pool`]).
    pub pool: Option<u32>,
    /// NaN results canonicalised (see [`RuntimeConfig::nan_canonicalization`]).
    pub nan_canonicalization: bool,
    /// The CPU features compiled code may use (see [`RuntimeConfig::cpu_features`]).
    pub cpu_features: CpuFeatures,
}

/// The x86-64-v2 level's features, the floor of [`CpuFeatures::Baseline`] on x86-64: with
/// SSE4.1 the rounding instructions are `roundss`/`roundps` on every CPU, whose NaN results
/// (the operand's payload, quieted) are what a newer CPU's `vroundss` gives too.
const X86_64_V2: [&str; 5] = [
    "has_sse3",
    "has_ssse3",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
];

/// Epoch interruption: always on (the wall-time limit depends on it).
const EPOCHS: bool = true;
/// WebAssembly SIMD (v128): on (candle's wasm kernels use it).
const SIMD: bool = true;
/// Relaxed SIMD: on (the MiniLM guest's matmul uses `f32x4.relaxed_madd`, a fused
/// multiply-add: twice the arithmetic per instruction of mul-then-add).
const RELAXED_SIMD: bool = true;
/// Relaxed-SIMD instructions give one result on every CPU (`relaxed_madd` is a real,
/// single-rounding FMA everywhere, emulated where the CPU has none), instead of whatever the
/// host's instruction happens to compute.
const RELAXED_SIMD_DETERMINISTIC: bool = true;

impl EngineSettings {
    /// The wasmtime configuration.
    pub fn config(&self) -> Result<Config> {
        let mut config = Config::new();
        if self.cpu_features == CpuFeatures::Baseline {
            // An explicit target turns off wasmtime's detection of the host's features, leaving
            // Cranelift's baseline for the triple; the triple is this build's own, so the code
            // still runs here.
            config
                .target(env!("WASM_INFER_TARGET"))
                .map_err(|e| Error::Config(format!("compilation target: {e}")))?;
            if env!("WASM_INFER_TARGET").starts_with("x86_64") {
                for flag in X86_64_V2 {
                    // SAFETY: each flag is a CPU feature Cranelift knows for x86-64; code
                    // compiled with them runs only on CPUs that have them, which wasmtime
                    // checks against the host before it runs (or loads) any.
                    unsafe {
                        config.cranelift_flag_enable(flag);
                    }
                }
            }
        }
        if let Some(n) = self.pool {
            let mut pooling = PoolingAllocationConfig::new();
            pooling
                .total_component_instances(n)
                .total_core_instances(n.saturating_mul(MAX_CORE_INSTANCES))
                .max_core_instances_per_component(MAX_CORE_INSTANCES)
                .total_memories(n.saturating_mul(MAX_MEMORIES))
                .max_memories_per_component(MAX_MEMORIES)
                .max_memories_per_module(MAX_MEMORIES)
                .max_memory_size(4 << 30)
                .total_tables(n.saturating_mul(MAX_TABLES))
                .max_tables_per_component(MAX_TABLES)
                .max_tables_per_module(MAX_TABLES)
                .table_elements(MAX_TABLE_ELEMENTS as usize)
                .total_stacks(n);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        }
        config
            .consume_fuel(self.meter_fuel)
            .epoch_interruption(EPOCHS)
            .wasm_simd(SIMD)
            .wasm_relaxed_simd(RELAXED_SIMD)
            .cranelift_nan_canonicalization(self.nan_canonicalization)
            .relaxed_simd_deterministic(RELAXED_SIMD_DETERMINISTIC)
            .wasm_component_model(true);
        Ok(config)
    }

    /// What a snapshot made under these settings records about them.
    pub fn fingerprint(&self) -> EngineFingerprint {
        EngineFingerprint {
            wasmtime: env!("WASM_INFER_WASMTIME_VERSION").to_string(),
            fuel: self.meter_fuel,
            epochs: EPOCHS,
            simd: SIMD,
            relaxed_simd: RELAXED_SIMD,
            relaxed_simd_deterministic: RELAXED_SIMD_DETERMINISTIC,
            nan_canonicalization: self.nan_canonicalization,
        }
    }
}

/// The engine settings that decide what initialisation computes and what its figures mean,
/// as a snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineFingerprint {
    /// wasmtime's version.
    pub wasmtime: String,
    /// Fuel metering on (the recorded init fuel is only meaningful then).
    pub fuel: bool,
    /// Epoch interruption on.
    pub epochs: bool,
    /// WebAssembly SIMD (v128) enabled.
    pub simd: bool,
    /// Relaxed SIMD enabled.
    #[serde(default)]
    pub relaxed_simd: bool,
    /// Relaxed-SIMD instructions give the same result on every CPU.
    pub relaxed_simd_deterministic: bool,
    /// NaN results canonicalised.
    pub nan_canonicalization: bool,
}

impl EngineFingerprint {
    /// Human-readable list of the settings that differ, `self` (a snapshot's) vs `runtime`.
    pub fn differences(&self, runtime: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if self.wasmtime != runtime.wasmtime {
            out.push(format!(
                "wasmtime {} (this build: {})",
                self.wasmtime, runtime.wasmtime
            ));
        }
        let flags = [
            ("fuel", self.fuel, runtime.fuel),
            ("epochs", self.epochs, runtime.epochs),
            ("simd", self.simd, runtime.simd),
            ("relaxed-simd", self.relaxed_simd, runtime.relaxed_simd),
            (
                "relaxed-simd-deterministic",
                self.relaxed_simd_deterministic,
                runtime.relaxed_simd_deterministic,
            ),
            (
                "nan-canonicalization",
                self.nan_canonicalization,
                runtime.nan_canonicalization,
            ),
        ];
        let on = |flag: bool| if flag { "on" } else { "off" };
        for (name, snap, this) in flags {
            if snap != this {
                out.push(format!(
                    "{name}={} (this runtime: {name}={})",
                    on(snap),
                    on(this)
                ));
            }
        }
        out
    }
}

impl RuntimeConfig {
    /// The engine settings this configuration asks for.
    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            meter_fuel: self.meter_fuel,
            pool: self.pool,
            nan_canonicalization: self.nan_canonicalization,
            cpu_features: self.cpu_features,
        }
    }

    /// This configuration with every engine setting taken from `settings` (the inverse of
    /// [`RuntimeConfig::engine_settings`]; destructured, so that a new setting cannot be
    /// forgotten here).
    pub fn with_engine_settings(self, settings: EngineSettings) -> Self {
        let EngineSettings {
            meter_fuel,
            pool,
            nan_canonicalization,
            cpu_features,
        } = settings;
        Self {
            meter_fuel,
            pool,
            nan_canonicalization,
            cpu_features,
            ..self
        }
    }
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

/// Drives `future` to completion on a private current-thread tokio runtime (with the time
/// driver the wall-time limit needs). Inside an async runtime, where blocking the thread with a
/// nested runtime would panic, it does so on a scoped helper thread instead.
pub(crate) fn block_on<F>(future: F) -> Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let drive = move || -> Result<F::Output> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(format!("starting an executor: {e}")))?;
        Ok(rt.block_on(future))
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|scope| scope.spawn(drive).join())
            .unwrap_or_else(|_| Err(Error::Internal("the executor thread panicked".into())))
    } else {
        drive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_differences_name_each_setting() {
        let a = EngineSettings {
            meter_fuel: true,
            pool: None,
            nan_canonicalization: false,
            cpu_features: CpuFeatures::Host,
        }
        .fingerprint();
        let b = EngineFingerprint {
            wasmtime: "47.0.0".into(),
            fuel: false,
            ..a.clone()
        };
        assert_eq!(
            b.differences(&a),
            [
                format!("wasmtime 47.0.0 (this build: {})", a.wasmtime),
                "fuel=off (this runtime: fuel=on)".to_string()
            ]
        );
        assert!(a.differences(&a).is_empty());
        let canonical = EngineFingerprint {
            nan_canonicalization: true,
            ..a.clone()
        };
        assert_eq!(
            canonical.differences(&a),
            ["nan-canonicalization=on (this runtime: nan-canonicalization=off)"]
        );
    }

    #[test]
    fn loop_checks_call_their_builtins_through_the_preserve_all_trampolines() {
        // The vendored code-generation patch (vendor/README.md) is in effect: a loop's fuel and
        // epoch slow paths reference the `PreserveAll` trampolines, and nothing references the
        // clobber-everything ones. Without the `[patch]` this fails, not just runs slower.
        let settings = EngineSettings {
            meter_fuel: true,
            pool: None,
            nan_canonicalization: false,
            cpu_features: CpuFeatures::Host,
        };
        let engine = Engine::new(&settings.config().unwrap()).unwrap();
        let wat = r#"(module (func (export "spin") (param i32) (result v128)
            (local v128)
            (loop $l
                (local.set 1 (f32x4.add (local.get 1) (local.get 1)))
                (br_if $l (local.tee 0 (i32.sub (local.get 0) (i32.const 1)))))
            (local.get 1)))"#;
        let code = wasmtime::Module::new(&engine, wat)
            .unwrap()
            .serialize()
            .unwrap();
        let has = |symbol: &str| code.windows(symbol.len()).any(|w| w == symbol.as_bytes());
        assert!(has("wasmtime_patchable_builtin_out_of_gas"));
        assert!(has("wasmtime_patchable_builtin_new_epoch"));
        assert!(!has("wasmtime_builtin_out_of_gas"));
        assert!(!has("wasmtime_builtin_new_epoch"));
    }

    #[test]
    fn nan_canonicalization_and_cpu_features_change_the_compiled_code_key() {
        let key = |nan_canonicalization, cpu_features| {
            use std::hash::{Hash, Hasher};
            let settings = EngineSettings {
                meter_fuel: true,
                pool: None,
                nan_canonicalization,
                cpu_features,
            };
            let engine = Engine::new(&settings.config().unwrap()).unwrap();
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            hasher.finish()
        };
        let host = key(false, CpuFeatures::Host);
        assert_ne!(host, key(true, CpuFeatures::Host));
        assert_ne!(host, key(false, CpuFeatures::Baseline));
        assert_eq!(host, key(false, CpuFeatures::Host));
    }
}
