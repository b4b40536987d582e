//! A model: a component compiled once, then run many times, each run in a fresh sandbox.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Store, Trap, UpdateDeadline};

use crate::bindings::{Model as ModelBindings, ModelPre};
use crate::cache;
use crate::data::{Input, ModelInfo, Output};
use crate::error::{Error, InvalidModel, LimitExceeded, Result, RunError};
use crate::limits::{Limits, DEFAULT_MAX_LOG_BYTES, MAX_TABLE_ELEMENTS};
use crate::runtime::Runtime;
use crate::sandbox::RunState;
use crate::snapshot::{self, InitReport, SnapshotInfo};
use crate::usage::Usage;

/// How a model's compiled code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodeSource {
    /// Compiled now (and written to the cache, if there is one).
    Compiled,
    /// Loaded from the precompiled cache.
    Cached,
}

/// What loading a model cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Compiled now or loaded from the cache.
    pub code: CodeSource,
    /// Time to obtain the code that runs: compile (and pre-initialise, when a snapshot is made
    /// now) or load it from the cache.
    #[serde(rename = "code_time_us", serialize_with = "micros")]
    pub code_time: Duration,
    /// SHA-256 of the component's bytes (as given, before any snapshot).
    pub component_sha256: String,
    /// Component size in bytes (as given).
    pub component_bytes: u64,
    /// Whether runs start from a pre-initialised snapshot, and what initialisation cost.
    pub preinit: Option<Preinit>,
}

/// How a model's runs come to start pre-initialised.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Preinit {
    /// Where the snapshot came from.
    pub source: PreinitSource,
    /// What the one-time initialisation cost (recorded when the snapshot was made).
    pub init: InitReport,
}

/// Where a model's snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreinitSource {
    /// Made now, while loading (and written to the cache, if there is one).
    Made,
    /// Made by an earlier load, loaded from the precompiled cache.
    Cached,
    /// The file given was already a snapshot (`wasm-infer snapshot`).
    File,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pre-initialise a component that exports `wizer-initialize` and start every run from the
    /// snapshot (default `true`). With `false`, every run initialises the model itself, as a
    /// component without that export always does.
    pub preinit: bool,
    /// Limits for the one-time initialisation (default: [`Limits::default`], no fuel cap).
    pub init_limits: Limits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            preinit: true,
            init_limits: Limits::default(),
        }
    }
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

/// A successful run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What the model returned.
    pub output: Output,
    /// What the run used.
    pub usage: Usage,
}

/// A compiled, validated model. Cheap to clone, `Send + Sync`: share one across threads and
/// tasks; every [`run`](Model::run) gets its own fresh store and limits.
#[derive(Clone)]
pub struct Model {
    inner: Arc<ModelInner>,
}

struct ModelInner {
    runtime: Runtime,
    pre: ModelPre<RunState>,
    info: ModelInfo,
    load: LoadReport,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("info", &self.inner.info)
            .field("load", &self.inner.load)
            .finish()
    }
}

impl Model {
    /// Loads the component at `path` with the default [`LoadOptions`] (see
    /// [`Model::from_bytes_with`]).
    pub fn load(runtime: &Runtime, path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(runtime, path, &LoadOptions::default())
    }

    /// Loads the component at `path` (see [`Model::from_bytes_with`]).
    pub fn load_with(
        runtime: &Runtime,
        path: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes_with(runtime, &bytes, options)
    }

    /// [`Model::from_bytes_with`] with the default [`LoadOptions`].
    pub fn from_bytes(runtime: &Runtime, wasm: &[u8]) -> Result<Self> {
        Self::from_bytes_with(runtime, wasm, &LoadOptions::default())
    }

    /// Validates `wasm` as a component of the `wasm-infer:model` world, compiles it (or loads the
    /// compiled code from the cache) and asks it for its [`ModelInfo`].
    ///
    /// A component that exports `wizer-initialize` is pre-initialised first (unless
    /// `options.preinit` is off): initialised once under `options.init_limits`, snapshotted,
    /// and the snapshot is what runs (and what the cache keeps, so this happens once per
    /// component and engine). A snapshot made by `wasm-infer snapshot` is checked against this
    /// runtime's engine and refused with [`InvalidModel::SnapshotMismatch`] if it differs.
    pub fn from_bytes_with(runtime: &Runtime, wasm: &[u8], options: &LoadOptions) -> Result<Self> {
        check_header(wasm)?;
        let component_sha256 = cache::component_digest(wasm);
        let started = Instant::now();
        let snapshot_file = snapshot::read_info(wasm)?;
        if let Some(info) = &snapshot_file {
            info.check(runtime)?;
        }
        let make_snapshot =
            snapshot_file.is_none() && options.preinit && snapshot::exports_init(wasm)?;
        let (component, code, preinit) = if make_snapshot {
            let (component, code, source, init) =
                load_preinitialised(runtime, wasm, &component_sha256, &options.init_limits)?;
            (component, code, Some(Preinit { source, init }))
        } else {
            let (component, code) = load_component(runtime, wasm, &component_sha256)?;
            let preinit = snapshot_file.map(|info| Preinit {
                source: PreinitSource::File,
                init: info.init,
            });
            (component, code, preinit)
        };
        let code_time = started.elapsed();
        let instance_pre = runtime
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| InvalidModel::UnsupportedImport(format!("{e:#}")))?;
        let pre =
            ModelPre::new(instance_pre).map_err(|e| InvalidModel::WrongWorld(format!("{e:#}")))?;
        let load = LoadReport {
            code,
            code_time,
            component_sha256,
            component_bytes: wasm.len() as u64,
            preinit,
        };
        let info = fetch_info(runtime, &pre)?;
        Ok(Self {
            inner: Arc::new(ModelInner {
                runtime: runtime.clone(),
                pre,
                info,
                load,
            }),
        })
    }

    /// The model's self-description.
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The runtime this model was loaded into.
    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    /// How the model's code was obtained and what that cost.
    pub fn load_report(&self) -> &LoadReport {
        &self.inner.load
    }

    /// Runs `input` in a fresh sandbox under `limits`, blocking the calling thread.
    ///
    /// In async code prefer [`Model::run_async`]; called from within a tokio runtime this
    /// still works, but blocks that executor thread for the whole run.
    pub fn run(&self, input: Input, limits: &Limits) -> Result<Outcome, RunError> {
        block_on(self.run_async(input, limits)).unwrap_or_else(|error| {
            Err(RunError {
                error,
                usage: Box::default(),
            })
        })
    }

    /// Runs `input` in a fresh sandbox under `limits`, on the caller's tokio runtime (which
    /// must have its time driver enabled, as `#[tokio::main]` does). The guest yields to the
    /// executor at every epoch tick, so many runs can share a few threads.
    pub async fn run_async(&self, input: Input, limits: &Limits) -> Result<Outcome, RunError> {
        let queued = Instant::now();
        let _slot = self.inner.runtime.slot().await;
        let started = Instant::now();
        let mut usage = Usage {
            input_bytes: input.payload_bytes(),
            queue_time: started - queued,
            ..Usage::default()
        };
        if usage.input_bytes > limits.max_input {
            usage.wall_time = started.elapsed();
            return Err(RunError {
                error: LimitExceeded::Input {
                    limit: limits.max_input,
                    size: usage.input_bytes,
                }
                .into(),
                usage: Box::new(usage),
            });
        }
        let mut store = match new_store(&self.inner.runtime, limits, started) {
            Ok(store) => store,
            Err(error) => {
                return Err(RunError {
                    error,
                    usage: Box::new(usage),
                })
            }
        };
        let deadline = started + limits.wall_time + self.inner.runtime.epoch_tick();
        let call = async {
            let instance = self.inner.pre.instantiate_async(&mut store).await;
            let instantiated = (Instant::now(), store.data().limiter.peak);
            let result = match instance {
                Ok(instance) => instance.call_infer(&mut store, &input.into_wit()).await,
                Err(e) => Err(e),
            };
            (result, instantiated)
        };
        // The epoch callback stops runaway wasm; this outer timeout also ends a run that is
        // blocked in a host call, where no epoch check happens.
        let result = tokio::time::timeout_at(deadline.into(), call).await;
        let elapsed = started.elapsed();
        usage.wall_time = elapsed;
        let (fuel_consumed, out_of_fuel) = fuel_used(&store, limits);
        usage.fuel_consumed = fuel_consumed;
        let state = store.data();
        usage.peak_memory_bytes = state.limiter.peak;
        usage.device_peak_bytes = state.device.peak;
        usage.device_uploaded_bytes = state.device.uploaded;
        usage.device_downloaded_bytes = state.device.downloaded;
        usage.accel_ops = state.device.ops;
        usage.accel_refusals = state.device.refusals;
        usage.guest_stdout_bytes = state.stdout.written();
        usage.guest_stderr_bytes = state.stderr.written();
        let fail = |error: Error, usage: Usage| {
            Err(RunError {
                error,
                usage: Box::new(usage),
            })
        };
        let (result, instantiated) = match result {
            Ok(r) => r,
            Err(_elapsed) => {
                return fail(
                    LimitExceeded::WallTime {
                        limit: limits.wall_time,
                        elapsed,
                    }
                    .into(),
                    usage,
                )
            }
        };
        usage.instantiate_time = instantiated.0 - started;
        usage.initial_memory_bytes = instantiated.1;
        match (result, out_of_fuel) {
            (Err(e), _) => fail(classify(e, state, limits), usage),
            (Ok(_), Some(out_of_fuel)) => fail(out_of_fuel.into(), usage),
            (Ok(Err(model_error)), _) => fail(
                Error::Model {
                    code: model_error.code.into(),
                    message: model_error.message,
                },
                usage,
            ),
            (Ok(Ok(output)), _) => {
                let output = Output::from_wit(output);
                let size = output.payload_bytes();
                if size > limits.max_output {
                    return fail(
                        LimitExceeded::Output {
                            limit: limits.max_output,
                            size,
                        }
                        .into(),
                        usage,
                    );
                }
                usage.output_bytes = size;
                Ok(Outcome { output, usage })
            }
        }
    }
}

/// Where the runtime's cache keeps the compiled code for `material` (a component digest, or
/// one qualified by what was done to the component), if the runtime has a cache.
fn cache_entry(runtime: &Runtime, material: &str) -> Option<std::path::PathBuf> {
    let dir = runtime.config().cache_dir.as_deref()?;
    Some(cache::entry_path(
        dir,
        &cache::key(runtime.engine(), material),
    ))
}

/// Compiles `wasm` as it is, or loads its compiled code from the cache.
fn load_component(runtime: &Runtime, wasm: &[u8], digest: &str) -> Result<(Component, CodeSource)> {
    let engine = runtime.engine();
    let cache_path = cache_entry(runtime, digest);
    if let Some(component) = cache_path.as_deref().and_then(|p| cache::load(engine, p)) {
        return Ok((component, CodeSource::Cached));
    }
    let component =
        Component::new(engine, wasm).map_err(|e| InvalidModel::Malformed(format!("{e:#}")))?;
    if let Some(path) = &cache_path {
        cache::store(&component, path);
    }
    Ok((component, CodeSource::Compiled))
}

/// Loads the compiled snapshot of `wasm` from the cache, or makes, compiles and caches it.
/// The cache keeps the snapshot's compiled code and its [`SnapshotInfo`] side by side, under
/// a key derived from the source component's digest and the snapshot format.
fn load_preinitialised(
    runtime: &Runtime,
    wasm: &[u8],
    digest: &str,
    init_limits: &Limits,
) -> Result<(Component, CodeSource, PreinitSource, InitReport)> {
    let engine = runtime.engine();
    let cache_path = cache_entry(
        runtime,
        &format!("{digest}+preinit-v{}", snapshot::SNAPSHOT_FORMAT),
    );
    if let Some(path) = &cache_path {
        let info: Option<SnapshotInfo> = std::fs::read(path.with_extension("json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        if let Some(info) = info.filter(|info| info.check(runtime).is_ok()) {
            if let Some(component) = cache::load(engine, path) {
                return Ok((
                    component,
                    CodeSource::Cached,
                    PreinitSource::Cached,
                    info.init,
                ));
            }
        }
    }
    let snap = snapshot::snapshot(runtime, wasm, init_limits)?;
    let component = Component::new(engine, &snap.wasm)
        .map_err(|e| Error::Internal(format!("compiling the snapshot: {e:#}")))?;
    if let Some(path) = &cache_path {
        // Description first: an entry counts only once its code is there.
        let json = serde_json::to_vec_pretty(&snap.info).expect("snapshot info serialises");
        if cache::store_bytes(&json, &path.with_extension("json")) {
            cache::store(&component, path);
        }
    }
    Ok((
        component,
        CodeSource::Compiled,
        PreinitSource::Made,
        snap.info.init,
    ))
}

/// The fuel a store gets under `limits`. wasmtime checks fuel only at function entries and loop
/// headers, and `get_fuel` clamps at zero, so a run may end slightly past its fuel and still
/// "succeed". Giving it limit + 1 and treating a zero balance as a trip makes the cap exact: a
/// run that needs N units succeeds with `--fuel N` and fails with `--fuel N-1`.
fn fuel_budget(limits: &Limits) -> u64 {
    limits.fuel.map_or(u64::MAX, |f| f.saturating_add(1))
}

/// The fuel a store has used, and the fuel trip if a capped run ended with none left (0 used
/// without fuel metering).
pub(crate) fn fuel_used(store: &Store<RunState>, limits: &Limits) -> (u64, Option<LimitExceeded>) {
    let budget = fuel_budget(limits);
    let remaining = store.get_fuel().unwrap_or(budget);
    let tripped = match limits.fuel {
        Some(limit) if remaining == 0 => Some(LimitExceeded::Fuel {
            limit,
            consumed: budget,
        }),
        _ => None,
    };
    (budget - remaining, tripped)
}

/// A fresh store for one run: its own WASI context, memory limiter, fuel ([`fuel_budget`]),
/// and a wall-time check at every epoch tick that also yields to the executor. A fuel cap on a
/// runtime without fuel metering is refused.
pub(crate) fn new_store(
    runtime: &Runtime,
    limits: &Limits,
    started: Instant,
) -> Result<Store<RunState>> {
    let log_capacity = DEFAULT_MAX_LOG_BYTES as usize;
    let mut store = Store::new(
        runtime.engine(),
        RunState::new(limits, runtime.inner.accel.clone(), log_capacity, started),
    );
    store.limiter(|state| &mut state.limiter);
    store.set_hostcall_fuel(hostcall_budget(limits));
    let wall_limit = limits.wall_time;
    store.epoch_deadline_callback(move |mut ctx| {
        let elapsed = ctx.data().started.elapsed();
        if elapsed >= wall_limit {
            ctx.data_mut().timed_out = Some(elapsed);
            Ok(UpdateDeadline::Interrupt)
        } else {
            // Let other tasks on this executor thread run, then check again next tick.
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store.set_epoch_deadline(1);
    if runtime.config().meter_fuel {
        store
            .set_fuel(fuel_budget(limits))
            .map_err(|e| Error::Internal(format!("{e:#}")))?;
    } else if limits.fuel.is_some() {
        return Err(Error::Internal(
            "a fuel limit needs a runtime with fuel metering (RuntimeConfig::meter_fuel)".into(),
        ));
    }
    Ok(store)
}

/// Bytes the host may copy out of the guest in one call (its output, an accel upload, or a
/// WASI call's arguments): the larger of the output limit and the device budget (an upload
/// bigger than that is refused anyway), plus 1 MiB for the host-side list and string headers.
/// Bounds the host memory a guest can make the host allocate.
pub(crate) fn hostcall_budget(limits: &Limits) -> usize {
    let largest = limits.max_output.max(limits.device_memory);
    usize::try_from(largest.saturating_add(1 << 20)).unwrap_or(usize::MAX)
}

/// Decides what a failed call means, from what the host observed rather than the message.
pub(crate) fn classify(e: wasmtime::Error, state: &RunState, limits: &Limits) -> Error {
    if let Some(elapsed) = state.timed_out {
        return LimitExceeded::WallTime {
            limit: limits.wall_time,
            elapsed,
        }
        .into();
    }
    // A refused growth usually surfaces as the guest allocator's `unreachable`, or as an
    // instantiation failure: either way the limiter's record is the truth.
    if let Some(requested) = state.limiter.refused {
        return LimitExceeded::Memory {
            limit: limits.memory,
            requested,
        }
        .into();
    }
    if let Some(requested) = state.limiter.table_refused {
        return LimitExceeded::Table {
            limit: MAX_TABLE_ELEMENTS,
            requested,
        }
        .into();
    }
    // The one case classified by message: wasmtime stops copying data out of the guest past
    // the store's hostcall budget (`hostcall_budget`, set in `new_store`) and exposes no type
    // for it. tests/hostile.rs pins the behaviour, so a wasmtime change cannot slip by.
    if e.chain()
        .any(|cause| cause.to_string().contains("fuel allocated for hostcalls"))
    {
        return LimitExceeded::Output {
            limit: limits.max_output,
            size: hostcall_budget(limits) as u64 + 1,
        }
        .into();
    }
    let code = e.downcast_ref::<Trap>().copied();
    // A guest that does not fall back after a device-budget refusal and fails instead.
    if let (Some(refusal), false) = (state.device.refused, code == Some(Trap::OutOfFuel)) {
        return LimitExceeded::DeviceMemory {
            requested: refusal.requested,
            used: refusal.used,
            budget: refusal.budget,
        }
        .into();
    }
    if code == Some(Trap::OutOfFuel) {
        if let Some(limit) = limits.fuel {
            return LimitExceeded::Fuel {
                limit,
                consumed: fuel_budget(limits),
            }
            .into();
        }
    }
    let stderr = state.stderr.contents();
    let tail = &stderr[stderr.len().saturating_sub(GUEST_STDERR_TAIL_BYTES)..];

    Error::Trap {
        code,
        message: trap_message(&e, code),
        guest_stderr: String::from_utf8_lossy(tail).into_owned(),
    }
}

/// How much of the guest's stderr a trap error carries: enough for a panic message.
const GUEST_STDERR_TAIL_BYTES: usize = 4096;

/// The trap in wasmtime's words ("wasm trap: call stack exhausted"); the full guest backtrace
/// goes to the debug log (`WASM_INFER_LOG=debug`), not into the error.
fn trap_message(e: &wasmtime::Error, code: Option<Trap>) -> String {
    tracing::debug!("guest trap: {e:?}");
    match code {
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    }
}

/// Checks the 8-byte preamble: `\0asm`, then version/layer. Core modules are `01 00 00 00`,
/// components `0d 00 01 00`.
pub(crate) fn check_header(wasm: &[u8]) -> Result<(), InvalidModel> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(InvalidModel::NotWasm);
    }
    match wasm[4..8] {
        [_, _, 0, 0] => Err(InvalidModel::NotAComponent),
        _ => Ok(()),
    }
}

/// Instantiates once under default limits to ask the model for its `info`.
fn fetch_info(runtime: &Runtime, pre: &ModelPre<RunState>) -> Result<ModelInfo> {
    let limits = Limits::default();
    block_on(async {
        let _slot = runtime.slot().await;
        let mut store = new_store(runtime, &limits, Instant::now())?;
        let result = async {
            let instance: ModelBindings = pre.instantiate_async(&mut store).await?;
            instance.call_info(&mut store).await
        }
        .await;
        match result {
            Ok(info) => Ok(ModelInfo::from(info)),
            Err(e) => Err(classify(e, store.data(), &limits)),
        }
    })?
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
