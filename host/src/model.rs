//! A model: a component inspected, compiled (or loaded from the cache) and pre-initialised
//! once, then run many times, each run in a fresh sandbox through the one run-under-limits
//! sequence (`run.rs`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::Component;

use crate::accel::ModelWeights;
use crate::bindings::ModelPre;
use crate::cache::{self, Cache};
use crate::component;
use crate::data::{Input, ModelInfo, Output};
use crate::error::{Error, InvalidModel, LimitExceeded, Result, RunError};
use crate::generator::{fetch_generator, GeneratorModel};
use crate::isolate::{self, Isolation};
use crate::limits::{Limits, MAX_INFO_BYTES};
use crate::profile::{Profile, Sample};
use crate::run::call_limited;
use crate::runtime::{block_on, Runtime};
use crate::snapshot::{self, InitReport, SnapshotInfo};
use crate::store::RunState;
use crate::units::{format_count, format_duration, format_size};
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
    #[serde(rename = "code_time_us", with = "crate::units::serde::micros")]
    pub code_time: Duration,
    /// SHA-256 of the component's bytes (as given, before any snapshot).
    pub component_sha256: String,
    /// Component size in bytes (as given).
    pub component_bytes: u64,
    /// Whether runs start from a pre-initialised snapshot, and what initialisation cost.
    pub preinit: Option<Preinit>,
    /// The limits the load-time calls (initialisation, `info`) ran under.
    pub limits: Limits,
}

impl std::fmt::Display for LoadReport {
    /// Two lines: the component and its code, then its pre-initialisation.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "component:   {} ({}, sha256 {})",
            format_size(self.component_bytes),
            match self.code {
                CodeSource::Cached => "compiled code from cache",
                CodeSource::Compiled => "compiled now",
            },
            self.component_sha256
        )?;
        match &self.preinit {
            Some(preinit) => write!(
                f,
                "preinit:     snapshot {} ({}); initialisation cost {} fuel, {} memory, {} \
                 once; runs start from it",
                match preinit.source {
                    PreinitSource::Made => "made now",
                    PreinitSource::Cached => "from cache",
                    PreinitSource::File => "given as the file",
                },
                format_size(preinit.init.snapshot_bytes),
                format_count(preinit.init.fuel),
                format_size(preinit.init.memory_bytes),
                format_duration(preinit.init.time),
            ),
            None => write!(f, "preinit:     none (every run initialises the model)"),
        }
    }
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

/// What a load is doing, for progress displays ([`LoadOptions::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPhase {
    /// Reading the component's structure and checking it against the world.
    Inspecting,
    /// Looking for compiled code in the cache.
    Cache,
    /// Running the model's initialisation to make its snapshot.
    PreInitialising,
    /// Compiling to native code.
    Compiling,
    /// Linking and asking the model for its info.
    Checking,
}

impl std::fmt::Display for LoadPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Inspecting => "inspecting the component",
            Self::Cache => "looking in the compiled-model cache",
            Self::PreInitialising => "pre-initialising the model (once per component)",
            Self::Compiling => "compiling to native code (once per component)",
            Self::Checking => "checking the model",
        })
    }
}

/// Called with each phase of a load as it starts.
#[derive(Clone)]
pub struct Progress(pub Arc<dyn Fn(LoadPhase) + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pre-initialise a component that exports `wizer-initialize` and start every run from the
    /// snapshot (default `true`). With `false`, every run initialises the model itself, as a
    /// component without that export always does.
    pub preinit: bool,
    /// Limits for the calls into the guest that loading makes (the one-time initialisation
    /// and `info`); a model that exceeds them fails to load with the limit's error (default:
    /// [`Limits::default`]). Raise `memory` for a model whose initial memory is larger.
    pub limits: Limits,
    /// Told each [`LoadPhase`] as it starts (default: nobody).
    pub progress: Option<Progress>,
    /// Compile (and pre-initialise) in a worker process under OS limits instead of in this
    /// process (default `None`: in-process). Needs a runtime with a cache directory, through
    /// which the compiled code comes back. See [`crate::isolate`] for the trade-off.
    pub isolate: Option<Isolation>,
    /// The model's resident budget on the accelerator, in bytes (default
    /// [`DEFAULT_RESIDENT_MEMORY`](crate::accel::DEFAULT_RESIDENT_MEMORY), 256 MiB): what the
    /// read-only weights its runs bind (`accel.resident`) may hold together for as long as the
    /// model is loaded. Each name counts its bytes once, when a run first binds it, whether or
    /// not another model holds the same content; a bind past the budget is refused with
    /// `budget-exceeded` (the model's figures) and binds nothing. Residents are counted apart
    /// from [`RuntimeConfig::device_memory`](crate::RuntimeConfig::device_memory), the budget
    /// runs draw on, so no model's weights can make another model's runs fall back.
    pub resident_memory: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            preinit: true,
            limits: Limits::default(),
            progress: None,
            isolate: None,
            resident_memory: crate::accel::DEFAULT_RESIDENT_MEMORY,
        }
    }
}

impl LoadOptions {
    fn phase(&self, phase: LoadPhase) {
        if let Some(progress) = &self.progress {
            (progress.0)(phase);
        }
    }
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
    /// The calibration profile runs are admitted by ([`Model::with_profile`]).
    profile: Option<Arc<Profile>>,
}

struct ModelInner {
    runtime: Runtime,
    pre: ModelPre<RunState>,
    info: ModelInfo,
    load: LoadReport,
    /// The accelerator weights this model's runs made resident: shared by all of them, freed
    /// (when no other model holds the same content) with the last clone of the model.
    weights: Arc<ModelWeights>,
    /// The `generator` world's bindings and facts, when the model exports `generate`.
    generator: Option<GeneratorModel>,
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
        let bytes = std::fs::read(path).map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_bytes_with(runtime, &bytes, options)
    }

    /// [`Model::from_bytes_with`] with the default [`LoadOptions`].
    pub fn from_bytes(runtime: &Runtime, wasm: &[u8]) -> Result<Self> {
        Self::from_bytes_with(runtime, wasm, &LoadOptions::default())
    }

    /// Blocking form of [`Model::from_bytes_async`].
    pub fn from_bytes_with(runtime: &Runtime, wasm: &[u8], options: &LoadOptions) -> Result<Self> {
        block_on(Self::from_bytes_async(runtime, wasm, options))?
    }

    /// Inspects `wasm` as a component of the `wasm-infer:model` world (header, imports and
    /// exports, instance/memory/table counts: a refusal costs no compilation), compiles it (or
    /// loads the compiled code from the cache), links it and asks it for its [`ModelInfo`]
    /// under `options.limits`. Only a model that passes all of this is cached.
    ///
    /// A component that exports `wizer-initialize` is pre-initialised first (unless
    /// `options.preinit` is off): initialised once under `options.limits`, snapshotted, and the
    /// snapshot is what runs (and what the cache keeps, so this happens once per component and
    /// engine). A snapshot made by `wasm-infer snapshot` is checked against this runtime's
    /// engine and refused with [`InvalidModel::SnapshotMismatch`] if it differs.
    ///
    /// Compiling runs on the calling task's thread (seconds for a large model, uncached).
    pub async fn from_bytes_async(
        runtime: &Runtime,
        wasm: &[u8],
        options: &LoadOptions,
    ) -> Result<Self> {
        let mut obtained = obtain(runtime, wasm, options).await?;
        let component = match obtained.component.take() {
            Some(component) => component,
            None => deserialize(runtime, obtained.bytes.as_deref().unwrap_or_default())?,
        };
        options.phase(LoadPhase::Checking);
        let pre = link(runtime, &component)?;
        let info = fetch_info(runtime, &pre, &options.limits).await?;
        let generator = fetch_generator(runtime, &pre, &options.limits).await?;
        // Only a model that answered its info is written to the cache.
        if obtained.store && obtained.entry.is_some() {
            let bytes = match obtained.bytes.take() {
                Some(bytes) => bytes,
                None => component
                    .serialize()
                    .map_err(|e| Error::Internal(format!("serialising the code: {e:#}")))?,
            };
            obtained.store(&bytes);
        }
        let load = LoadReport {
            code: obtained.code,
            code_time: obtained.code_time,
            component_sha256: obtained.component_sha256,
            component_bytes: wasm.len() as u64,
            preinit: obtained.preinit,
            limits: options.limits.clone(),
        };
        Ok(Self {
            inner: Arc::new(ModelInner {
                runtime: runtime.clone(),
                pre,
                info,
                load,
                weights: Arc::new(ModelWeights::new(options.resident_memory)),
                generator,
            }),
            profile: None,
        })
    }

    /// Links code a worker pool's parent handed over (verified there) into this process's
    /// own mapping; no guest instruction runs until [`Model::from_linked`].
    pub(crate) fn link_handed_code(runtime: &Runtime, code: &[u8]) -> Result<ModelPre<RunState>> {
        let component = deserialize(runtime, code)?;
        // The copy-on-write images of its memories are made now: else at the first
        // instantiation, through `memfd_create`, which the locked worker may not call.
        component
            .initialize_copy_on_write_image()
            .map_err(|e| Error::Internal(format!("preparing the memory image: {e:#}")))?;
        link(runtime, &component)
    }

    /// Finishes [`Model::link_handed_code`] once the worker is locked: asks for the info.
    /// `resident_memory` as [`LoadOptions::resident_memory`]; `component` is the SHA-256 and
    /// size of the component the parent compiled the code from (its load report's figures).
    pub(crate) fn from_linked(
        runtime: &Runtime,
        pre: ModelPre<RunState>,
        limits: &Limits,
        resident_memory: u64,
        component: &ComponentIdentity,
    ) -> Result<Self> {
        let info = block_on(fetch_info(runtime, &pre, limits))??;
        let generator = block_on(fetch_generator(runtime, &pre, limits))??;
        let load = LoadReport {
            code: CodeSource::Cached,
            code_time: Duration::ZERO,
            component_sha256: component.sha256.clone(),
            component_bytes: component.bytes,
            preinit: None,
            limits: limits.clone(),
        };
        Ok(Self {
            inner: Arc::new(ModelInner {
                runtime: runtime.clone(),
                pre,
                info,
                load,
                weights: Arc::new(ModelWeights::new(resident_memory)),
                generator,
            }),
            profile: None,
        })
    }

    /// `(bound, budget)`: the bytes of the resident weights this model's runs have bound (by
    /// rule, each name once) and its resident budget ([`LoadOptions::resident_memory`]).
    pub fn resident_memory(&self) -> (u64, u64) {
        self.inner.weights.figures()
    }

    /// This model, with every run first admitted by `profile`: a run whose predicted fuel
    /// (when its limits cap fuel) or peak memory is over its limit is refused before any guest
    /// work with [`LimitExceeded::Predicted`] (see [`crate::profile`]). The real caps still
    /// apply to every admitted run. Fails with [`Error::Config`], saying what differs, when
    /// the profile was measured on another component or engine.
    pub fn with_profile(&self, profile: Profile) -> Result<Model> {
        let differences = profile.differences(
            &self.inner.load.component_sha256,
            &self.inner.runtime.fingerprint(),
        );
        if !differences.is_empty() {
            return Err(Error::Config(format!(
                "the calibration profile was measured on another build: {}; calibrate again \
                 (wasm-infer calibrate)",
                differences.join("; ")
            )));
        }
        Ok(Model {
            inner: self.inner.clone(),
            profile: Some(Arc::new(profile)),
        })
    }

    /// Runs each of `texts` (as one text input) under `limits` and returns its figures for
    /// [`Profile::fit`], calling `progress` after each with the number done. The first failed
    /// run ends the calibration with its index and error: a calibration set must run within
    /// the limits it is given.
    pub fn measure(
        &self,
        texts: &[String],
        limits: &Limits,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Sample>, (usize, RunError)> {
        let mut samples = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            let outcome = self
                .run(Input::Text(text.clone()), limits)
                .map_err(|e| (index, e))?;
            samples.push(Sample {
                input_bytes: text.len() as u64,
                fuel: outcome.usage.fuel_consumed,
                peak_memory_bytes: outcome.usage.peak_memory_bytes,
            });
            progress(index + 1);
        }
        Ok(samples)
    }

    /// The calibration profile runs are admitted by, if any.
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_deref()
    }

    /// Checks `input` against `limits` and this model's profile, as a run does before any
    /// guest work (for callers that decide before they queue a run, as `serve` does):
    /// the input and batch ceilings, then the predicted fuel and memory.
    pub fn admit(&self, input: &Input, limits: &Limits) -> Result<(), LimitExceeded> {
        limits.check_input(input)?;
        match &self.profile {
            Some(profile) => profile.admit(input, limits),
            None => Ok(()),
        }
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

    pub(crate) fn generator(&self) -> Option<&GeneratorModel> {
        self.inner.generator.as_ref()
    }

    pub(crate) fn weights(&self) -> Arc<ModelWeights> {
        self.inner.weights.clone()
    }

    /// Runs `input` in a fresh sandbox under `limits`, blocking the calling thread.
    ///
    /// In async code prefer [`Model::run_async`]; called from within a tokio runtime this
    /// still works, but blocks that executor thread for the whole run.
    pub fn run(&self, input: Input, limits: &Limits) -> Result<Outcome, RunError> {
        block_on(self.run_async(input, limits))
            .unwrap_or_else(|error| Err(RunError::new(error, Usage::default())))
    }

    /// Runs `input` in a fresh sandbox under `limits`, on the caller's tokio runtime (which
    /// must have its time driver enabled, as `#[tokio::main]` does). The guest yields to the
    /// executor at every epoch tick, so many runs can share a few threads. The input is
    /// checked against the batch and input limits and, with a profile
    /// ([`Model::with_profile`]), its predicted fuel and memory before any guest work; a runtime with
    /// [`admission`](crate::RuntimeConfig::admission) may then lower the memory ceiling or
    /// refuse the run with [`Error::Overloaded`].
    pub async fn run_async(&self, input: Input, limits: &Limits) -> Result<Outcome, RunError> {
        let input_bytes = input.payload_bytes();
        if let Err(limit) = self.admit(&input, limits) {
            let usage = Usage {
                input_bytes,
                ..Usage::default()
            };
            return Err(RunError::new(limit, usage));
        }
        let (_admitted, granted) = match self.inner.runtime.admit(limits) {
            Ok(admitted) => admitted,
            Err(error) => {
                let usage = Usage {
                    input_bytes,
                    ..Usage::default()
                };
                return Err(RunError::new(error, usage));
            }
        };
        let limits = &granted;
        let pre = self.inner.pre.clone();
        let weights = self.inner.weights.clone();
        let input = input.into_wit();
        let limited = call_limited(&self.inner.runtime, limits, move |store| {
            Box::pin(async move {
                store.data_mut().device.share_weights(weights);
                let instance = pre.instantiate_async(&mut *store).await?;
                store.data_mut().mark_instantiated();
                instance.call_infer(&mut *store, &input).await
            })
        })
        .await;
        let mut usage = Usage {
            input_bytes,
            ..limited.usage
        };
        let output = match limited.result {
            Ok(Ok(output)) => Output::from_wit(output),
            Ok(Err(refusal)) => {
                let error = Error::Model {
                    code: refusal.code.into(),
                    message: refusal.message,
                };
                return Err(RunError::new(error, usage));
            }
            Err(error) => return Err(RunError::new(error, usage)),
        };
        let size = output.payload_bytes();
        if size > limits.max_output {
            let limit = LimitExceeded::Output {
                limit: limits.max_output,
                size,
                at_least: false,
            };
            return Err(RunError::new(limit, usage));
        }
        usage.output_bytes = size;
        Ok(Outcome { output, usage })
    }
}

/// Compiled code, where it came from, and whether it is to be cached.
struct Obtained {
    /// The serialised code, when it came as bytes (the cache, a compile worker).
    bytes: Option<Vec<u8>>,
    /// The component, when compiled in this process.
    component: Option<Component>,
    code: CodeSource,
    code_time: Duration,
    preinit: Option<Preinit>,
    component_sha256: String,
    /// The snapshot's description, written beside its code.
    description: Option<Vec<u8>>,
    /// Compiled now: to be written to the cache.
    store: bool,
    cache: Option<Cache>,
    entry: Option<std::path::PathBuf>,
}

impl Obtained {
    fn store(&self, bytes: &[u8]) {
        if let (Some(cache), Some(entry)) = (&self.cache, &self.entry) {
            cache.store(bytes, entry, self.description.as_deref());
        }
    }
}

/// Inspects `wasm` and obtains its compiled code: from the cache (authenticated), from load
/// workers (`options.isolate`: a pre-initialisation child that hands back a snapshot as data,
/// then a compile child that hands back native code), or compiled here. Runs no guest code in
/// this process except when pre-initialising in-process (`options.isolate` is `None`).
async fn obtain(runtime: &Runtime, wasm: &[u8], options: &LoadOptions) -> Result<Obtained> {
    options.phase(LoadPhase::Inspecting);
    component::check_header(wasm)?;
    let inspection = component::inspect(wasm)?;
    let snapshot_file = snapshot::read_info(&inspection, wasm)?;
    if let Some(info) = &snapshot_file {
        info.check(runtime)?;
    }
    inspection.check_counts()?;
    inspection.check_world()?;
    let make_snapshot = snapshot_file.is_none()
        && options.preinit
        && inspection.exports_func(snapshot::INIT_EXPORT);
    let given = snapshot_file.map(|info| Preinit {
        source: PreinitSource::File,
        init: info.init,
    });

    let component_sha256 = cache::component_digest(wasm);
    let material = if make_snapshot {
        format!("{component_sha256}+preinit-v{}", snapshot::SNAPSHOT_FORMAT)
    } else {
        component_sha256.clone()
    };
    let cache = runtime.cache();
    let entry = cache
        .as_ref()
        .map(|cache| cache.entry(runtime.engine(), &material));
    let started = Instant::now();
    let mut obtained = Obtained {
        bytes: None,
        component: None,
        code: CodeSource::Compiled,
        code_time: Duration::ZERO,
        preinit: given.clone(),
        component_sha256,
        description: None,
        store: true,
        cache,
        entry,
    };
    options.phase(LoadPhase::Cache);
    if let (Some(cache), Some(entry)) = (&obtained.cache, &obtained.entry) {
        if let Some((bytes, init)) = from_cache(runtime, cache, entry, make_snapshot)? {
            obtained.bytes = Some(bytes);
            obtained.code = CodeSource::Cached;
            obtained.store = false;
            obtained.preinit = init
                .map(|init| Preinit {
                    source: PreinitSource::Cached,
                    init,
                })
                .or(given);
            obtained.code_time = started.elapsed();
            return Ok(obtained);
        }
    }
    let snapshot_info = match &options.isolate {
        Some(isolation) => {
            let snapshot = if make_snapshot {
                options.phase(LoadPhase::PreInitialising);
                let snapshot =
                    isolate::preinit_in_worker(isolation, runtime, wasm, &options.limits)?;
                let info = check_snapshot(
                    runtime,
                    wasm,
                    &snapshot,
                    &obtained.component_sha256,
                    &options.limits,
                )?;
                Some((snapshot, info))
            } else {
                None
            };
            options.phase(LoadPhase::Compiling);
            let source = snapshot.as_ref().map_or(wasm, |(snapshot, _)| snapshot);
            obtained.bytes = Some(isolate::compile_in_worker(isolation, runtime, source)?);
            snapshot.map(|(_, info)| info)
        }
        None if make_snapshot => {
            options.phase(LoadPhase::PreInitialising);
            let snap = snapshot::make(runtime, wasm, &options.limits).await?;
            options.phase(LoadPhase::Compiling);
            obtained.component = Some(
                Component::new(runtime.engine(), &snap.wasm)
                    .map_err(|e| Error::Internal(format!("compiling the snapshot: {e:#}")))?,
            );
            Some(snap.info)
        }
        None => {
            options.phase(LoadPhase::Compiling);
            obtained.component = Some(
                Component::new(runtime.engine(), wasm)
                    .map_err(|e| component::diagnose(wasm, &e))?,
            );
            None
        }
    };
    if let Some(info) = snapshot_info {
        obtained.description =
            Some(serde_json::to_vec_pretty(&info).expect("snapshot info serialises"));
        obtained.preinit = Some(Preinit {
            source: PreinitSource::Made,
            init: info.init,
        });
    }
    obtained.code_time = started.elapsed();
    Ok(obtained)
}

/// The serialised code of `wasm` for a worker pool's parent to hand its workers, obtained as
/// [`Model::from_bytes_with`] does (and cached), without running any of the model here (the
/// workers ask for its info once locked down). `options.isolate` should be set: else
/// pre-initialisation runs guest code in this process.
/// The component a worker's code was compiled from, as its load report names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ComponentIdentity {
    /// SHA-256 of the component's bytes, lowercase hex.
    pub sha256: String,
    /// The component's size in bytes.
    pub bytes: u64,
}

impl ComponentIdentity {
    pub(crate) fn of(wasm: &[u8]) -> Self {
        Self {
            sha256: cache::component_digest(wasm),
            bytes: wasm.len() as u64,
        }
    }
}

pub(crate) fn code_for_workers(
    runtime: &Runtime,
    wasm: &[u8],
    options: &LoadOptions,
) -> Result<Vec<u8>> {
    let mut obtained = block_on(obtain(runtime, wasm, options))??;
    let bytes = match (obtained.bytes.take(), &obtained.component) {
        (Some(bytes), _) => bytes,
        (None, Some(component)) => component
            .serialize()
            .map_err(|e| Error::Internal(format!("serialising the code: {e:#}")))?,
        (None, None) => return Err(Error::Internal("no code was obtained".into())),
    };
    if obtained.store {
        obtained.store(&bytes);
    }
    Ok(bytes)
}

/// Checks a snapshot a pre-initialisation worker handed back as any component is checked
/// (it is data from a process that ran guest code): the world, the counts, its description
/// (made for this engine from this component), and that it is `source` with only its initial
/// state changed, its memories within the load's memory limit
/// ([`snapshot::check_data_only`]). What a poisoned one can still do is in SECURITY.md.
fn check_snapshot(
    runtime: &Runtime,
    source: &[u8],
    snapshot: &[u8],
    source_sha256: &str,
    limits: &Limits,
) -> Result<SnapshotInfo> {
    let poisoned = |why: &str| Error::from(InvalidModel::PoisonedSnapshot(why.to_string()));
    component::check_header(snapshot)?;
    let inspection = component::inspect(snapshot)?;
    inspection.check_counts()?;
    inspection.check_world()?;
    let info = snapshot::read_info(&inspection, snapshot)?
        .ok_or_else(|| poisoned("a component with no snapshot section"))?;
    info.check(runtime)?;
    if info.source_sha256 != source_sha256 {
        return Err(poisoned(&format!(
            "its description names component {}, not this one ({source_sha256})",
            info.source_sha256
        )));
    }
    if info.init.snapshot_bytes != snapshot.len() as u64 {
        return Err(poisoned(&format!(
            "its description states {} bytes, it has {}",
            info.init.snapshot_bytes,
            snapshot.len()
        )));
    }
    snapshot::check_data_only(source, snapshot, limits.memory)?;
    Ok(info)
}

/// Compiled code from the cache or a compile worker, into this process's own executable
/// mapping (wasmtime copies the bytes; no file is mapped).
fn deserialize(runtime: &Runtime, code: &[u8]) -> Result<Component> {
    // SAFETY: the bytes are native code for this engine from a source this process trusts:
    // a cache entry whose HMAC under this host's key was just verified, a compile worker that
    // ran no guest code and was locked down before reading its input, or (in a run worker)
    // the supervisor that verified them. wasmtime still checks the header and configuration.
    unsafe { Component::deserialize(runtime.engine(), code) }
        .map_err(|e| Error::Internal(format!("loading compiled code: {e:#}")))
}

/// Links a component against the model world.
fn link(runtime: &Runtime, component: &Component) -> Result<ModelPre<RunState>> {
    let instance_pre = runtime
        .inner
        .linker
        .instantiate_pre(component)
        .map_err(|e| InvalidModel::UnsupportedImport(format!("{e:#}")))?;
    Ok(ModelPre::new(instance_pre).map_err(|e| InvalidModel::WrongWorld(format!("{e:#}")))?)
}

/// The authenticated code for an entry, and the snapshot's recorded initialisation if the
/// entry is a snapshot; `None` if the cache has no usable entry; an error (the entry removed)
/// if it holds one that fails authentication.
fn from_cache(
    runtime: &Runtime,
    cache: &Cache,
    entry: &Path,
    snapshot: bool,
) -> Result<Option<(Vec<u8>, Option<InitReport>)>> {
    let init = if snapshot {
        let Some(bytes) = cache.read_verified(&entry.with_extension("json"))? else {
            return Ok(None);
        };
        let Some(info) = serde_json::from_slice::<SnapshotInfo>(&bytes)
            .ok()
            .filter(|info| info.check(runtime).is_ok())
        else {
            return Ok(None);
        };
        Some(info.init)
    } else {
        None
    };
    let Some(code) = cache.read_verified(entry)? else {
        return Ok(None);
    };
    cache.touch(entry);
    Ok(Some((code, init)))
}

/// Instantiates once under `limits` to ask the model for its `info`, copying at most
/// [`MAX_INFO_BYTES`] of it.
async fn fetch_info(
    runtime: &Runtime,
    pre: &ModelPre<RunState>,
    limits: &Limits,
) -> Result<ModelInfo> {
    let pre = pre.clone();
    let limited = call_limited(runtime, limits, move |store| {
        Box::pin(async move {
            let instance = pre.instantiate_async(&mut *store).await?;
            store.data_mut().mark_instantiated();
            store.data_mut().limit_result_copy(MAX_INFO_BYTES as usize);
            instance.call_info(&mut *store).await
        })
    })
    .await;
    match limited.result {
        Ok(info) => Ok(ModelInfo::from(info)),
        // The copy budget set above is what stopped the lift (see `run::classify`).
        Err(Error::Limit(LimitExceeded::Output { at_least: true, .. })) => {
            Err(InvalidModel::InfoTooLarge {
                limit: MAX_INFO_BYTES,
            }
            .into())
        }
        Err(error) => Err(error),
    }
}
