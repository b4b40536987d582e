//! Runs in supervised worker processes: the second wall behind wasmtime for serving.
//!
//! A [`WorkerPool`] obtains each model's compiled code once, without running any of it (from
//! the authenticated cache, or from load workers: [`crate::isolate`]), then starts `workers`
//! copies of the `wasm-infer` binary in its hidden worker mode (`wasm-infer __run-worker`,
//! [`worker_main`]). Each receives the code over its channel (never a file it maps), links it,
//! locks itself down ([`lockdown`]: rlimits, no new privileges, not dumpable, a seccomp
//! allow-list) and only then runs guest code (each model's `info`), inside the pool's cgroup
//! where one can be made ([`cgroup`]; joined before the worker's first instruction), and then
//! serves one run at a
//! time over its stdin and stdout: length-prefixed JSON frames (a little-endian `u32` length,
//! then the message). The pool gives each request to an idle worker; a worker that dies
//! (a signal, an abort, the OOM killer, a forbidden system call) costs the request it was
//! running a [`Error::WorkerLost`] (retryable) and is replaced before the pool takes another
//! request on its place; the other workers' requests are not touched. Workers are also
//! replaced after a number of runs or above a resident-memory bound, which returns whatever
//! their allocator kept.

pub use crate::cgroup;
mod compile;
pub mod lockdown;

pub use compile::load_worker_main;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::data::{Input, ModelInfo, Output};
use crate::error::{Error, RunError};
use crate::generate::{
    FinishReason, GenerateRequest, Generated, Generation, GenerationError, OnEmit, TokenFuel,
    MAX_TOKENS_PER_EMIT,
};
use crate::isolate::{CompileLimits, Isolation};
use crate::limits::{Limits, MAX_INFO_BYTES};
use crate::model::{ComponentIdentity, LoadOptions, Model, Outcome};
use crate::runtime::{EngineSettings, Runtime, RuntimeConfig};
use crate::usage::Usage;
use crate::wire::{
    self, deadline_after, read_frame, read_raw_frame, wait_for, write_frame, Channel, WireError,
    FRAME_MARGIN, MAX_REQUEST_FRAME,
};
use crate::AccelMode;

/// How a pool of workers is set up.
#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    /// Worker processes (each runs one request at a time).
    pub workers: u32,
    /// The `wasm-infer` binary to run as a worker.
    pub binary: PathBuf,
    /// The models every worker loads, by path; requests name them by index.
    pub models: Vec<PathBuf>,
    /// The compiled-model cache the workers load from (compile the models once beforehand,
    /// e.g. by loading them in the parent, so that workers start in milliseconds).
    pub cache_dir: Option<PathBuf>,
    /// The device the workers offer their models.
    pub accel: AccelMode,
    /// Each worker's device-memory budget (as [`RuntimeConfig::device_memory`]): enforced in
    /// each worker on its own, so `workers` workers may hold up to `workers` times this.
    pub device_memory: u64,
    /// Each model's resident budget in each worker (as [`LoadOptions::resident_memory`]).
    pub resident_memory: u64,
    /// The workers' engine settings (NaN canonicalisation, CPU features, fuel metering,
    /// pooled slots), sent to each worker whole.
    pub engine: EngineSettings,
    /// Pre-initialise (as [`LoadOptions::preinit`]).
    pub preinit: bool,
    /// Lock each worker down once its models are loaded (default `true`).
    pub lockdown: bool,
    /// Replace a worker after this many runs.
    pub recycle_after_runs: Option<u64>,
    /// Replace a worker whose resident memory is above this many bytes after a run.
    pub recycle_above_rss: Option<u64>,
    /// Put the workers in a cgroup with these limits, where this process may manage one
    /// (each worker joins it before its first instruction). Default:
    /// [`CgroupLimits::for_workers`](cgroup::CgroupLimits::for_workers) for the default run
    /// limits and device budget; set it again when those change. `None`: no cgroup.
    pub cgroup: Option<cgroup::CgroupLimits>,
    /// Whether a worker may serve more than one tenant (default
    /// [`WorkerAffinity::Shared`]); see [`WorkerAffinity::Tenant`].
    pub affinity: WorkerAffinity,
}

/// Which requests a worker may serve, by tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerAffinity {
    /// Any worker serves any tenant's request (a guest that escaped wasmtime in one tenant's
    /// run could see later tenants' inputs in the same process).
    #[default]
    Shared,
    /// A worker is bound to the first tenant whose request it takes
    /// ([`WorkerPool::run_for_tenant`]) and never runs another tenant's: a request takes an
    /// idle worker of its own tenant, else one bound to none (fresh), else the worker idle
    /// longest, which is killed and replaced by a fresh one for this request (counted in
    /// [`PoolStats::recycled_tenant`]). A tenant switch on a busy pool therefore costs a
    /// worker start (the code is in the parent's memory: the link and each model's `info`).
    /// Runs with no tenant ([`WorkerPool::run`]; the server's readiness probes, whose input
    /// is the server's own) take any idle worker and bind none.
    Tenant,
}

impl WorkerPoolConfig {
    /// `workers` locked-down workers running `binary` with `models`, default cache and device.
    pub fn new(workers: u32, binary: PathBuf, models: Vec<PathBuf>) -> Self {
        Self {
            workers,
            binary,
            models,
            cache_dir: RuntimeConfig::default().cache_dir,
            accel: AccelMode::Auto,
            device_memory: RuntimeConfig::default().device_memory,
            resident_memory: LoadOptions::default().resident_memory,
            engine: RuntimeConfig::default().engine_settings(),
            preinit: true,
            lockdown: true,
            recycle_after_runs: None,
            recycle_above_rss: None,
            cgroup: Some(cgroup::CgroupLimits::for_workers(
                workers,
                crate::limits::DEFAULT_MEMORY_BYTES,
                RuntimeConfig::default().device_memory,
            )),
            affinity: WorkerAffinity::Shared,
        }
    }
}

/// What a worker is told at start: its runtime's settings travel whole (the engine's as one
/// [`EngineSettings`]), never rebuilt from defaults on the worker's side. One binary frame per
/// model follows it: the model's compiled code (as
/// [`Component::serialize`](wasmtime::component::Component::serialize) writes it), which the
/// parent verified or compiled.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    models: Vec<PathBuf>,
    cache_dir: Option<PathBuf>,
    accel: AccelMode,
    device_memory: u64,
    resident_memory: u64,
    engine: EngineSettings,
    preinit: bool,
    lockdown: bool,
    /// Each model's component digest and size, for its load report (the worker gets code,
    /// not the component, so it cannot compute them).
    components: Vec<ComponentIdentity>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RunRequest {
    model: usize,
    input: Input,
    limits: Limits,
}

/// A generation for a worker (a model that exports `generate`): its tokens come back as
/// [`FromWorker::Token`] frames while it runs, then one [`FromWorker::Generated`].
#[derive(Debug, Serialize, Deserialize)]
struct GenerateJob {
    model: usize,
    request: GenerateRequest,
    limits: Limits,
}

/// What a worker reads after its start: one job at a time.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToWorker {
    Run(RunRequest),
    Generate(GenerateJob),
}

/// [`ToWorker`] as the supervisor writes it (the same JSON, borrowed).
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum ToWorkerRef<'a> {
    Run(&'a RunRequest),
    Generate(&'a GenerateJob),
}

/// How a generation that ran to its end ended (its text came in `Token` frames).
#[derive(Debug, Serialize, Deserialize)]
struct GenerationEnd {
    prompt_tokens: u32,
    completion_tokens: u32,
    finish_reason: FinishReason,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One message at a time crosses the pipe, serialised: its size in memory does not matter.
#[allow(clippy::large_enum_variant)]
enum FromWorker {
    Ready {
        models: Vec<ModelInfo>,
    },
    Failed {
        message: String,
    },
    Done {
        result: Result<Output, WireError>,
        usage: Usage,
    },
    /// A piece of a generation, as the guest handed it to `emit`.
    Token {
        tokens: Vec<u32>,
        text: String,
    },
    /// A generation's end: its result, fuel per token and usage.
    Generated {
        result: Result<GenerationEnd, WireError>,
        token_fuel: TokenFuel,
        usage: Usage,
    },
}

/// How long past a run's wall-time limit the supervisor waits for its worker's answer: the
/// worker's own deadline ends the run within one epoch tick of the limit, and the answer
/// (up to the output limit, as JSON) must still be written and read. Past it the worker is
/// taken for wedged or hostile, killed, and its request answered [`Error::WorkerLost`].
pub const EXCHANGE_MARGIN: Duration = Duration::from_secs(5);

/// How often a generation's caller is asked whether its client is still there (by a
/// supervisor waiting on a worker, and by serve for a generation in its own process).
pub const STOP_POLL: Duration = Duration::from_millis(50);

/// The [`Error::WorkerLost`] of a generation its caller stopped: what it used is not known.
pub fn stopped_by_caller() -> Error {
    Error::WorkerLost {
        reason: "stopped by its caller (the client went away)".into(),
    }
}

/// A generation as a worker reported it: the text and ids relayed, then its end.
struct GenerateReply {
    generated: Generated,
    result: Result<GenerationEnd, WireError>,
    token_fuel: TokenFuel,
    usage: Usage,
}

impl GenerateReply {
    fn into_result(self) -> Result<Generation, Box<GenerationError>> {
        let GenerateReply {
            generated,
            result,
            token_fuel,
            mut usage,
        } = self;
        usage.output_bytes = generated.text.len() as u64;
        match result {
            Ok(end) => Ok(Generation {
                generated,
                prompt_tokens: end.prompt_tokens,
                completion_tokens: end.completion_tokens,
                finish_reason: end.finish_reason,
                token_fuel,
                usage,
            }),
            Err(error) => Err(Box::new(GenerationError {
                error: RunError::new(Error::from(error), usage),
                partial: generated,
                token_fuel,
            })),
        }
    }
}

/// How long a starting worker may take to load its models and report ready: loading from a
/// warm cache takes milliseconds, compiling a large model on a cache miss tens of seconds.
pub const START_DEADLINE: Duration = Duration::from_secs(300);

/// Bytes of JSON per byte of payload, at most: a `u8` is written as up to 3 digits and a
/// comma, an `f32` (4 bytes) as up to 15 characters and a comma, a text byte escaped as
/// `\u00XX` (6).
const JSON_BYTES_PER_BYTE: u64 = 6;

/// The largest frame a worker may answer a run with: the run's output limit in JSON, plus
/// the margin. Anything longer is out of protocol (the output limit was checked in the
/// worker, or the worker is lying), read no further, and its worker replaced.
fn max_run_frame(limits: &Limits) -> u64 {
    limits
        .max_output
        .saturating_mul(JSON_BYTES_PER_BYTE)
        .saturating_add(FRAME_MARGIN)
}

/// The largest frame a starting worker may answer with: each model's info (at most
/// [`MAX_INFO_BYTES`] each) in JSON, plus the margin.
fn max_ready_frame(models: usize) -> u64 {
    (models as u64)
        .saturating_mul(MAX_INFO_BYTES * JSON_BYTES_PER_BYTE)
        .saturating_add(FRAME_MARGIN)
}

/// Checks the figures a worker reports against what its request allowed and the parent can
/// verify: a run never consumes more fuel than its store was given (the cap, plus the one
/// unit whose lack trips it: [`crate::store::fuel_budget`]) nor holds more linear memory
/// than its ceiling (the limiter refuses growth past it). A worker that says otherwise is
/// broken or lying, and its report is not taken into anyone's accounts.
fn check_usage(usage: &Usage, limits: &Limits) -> Result<(), String> {
    if limits.fuel.is_some() {
        let budget = crate::store::fuel_budget(limits);
        if usage.fuel_consumed > budget {
            return Err(format!(
                "reported {} fuel consumed, above the budget of {budget}",
                usage.fuel_consumed
            ));
        }
    }
    if usage.peak_memory_bytes > limits.memory {
        return Err(format!(
            "reported a peak of {} bytes of memory, above the ceiling of {}",
            usage.peak_memory_bytes, limits.memory
        ));
    }
    Ok(())
}

/// Whether a worker may serve another request after this result: a run that ended as the
/// design expects (an output, a guest's own error, a limit the host meters or checks) leaves
/// nothing behind; a trap, an internal failure or an invalid-model verdict in the middle of a
/// run is where a compromise or a corrupted process would show first, so its worker is
/// replaced.
fn ended_cleanly<T>(result: &Result<T, WireError>) -> bool {
    match result {
        Ok(_) | Err(WireError::Limit(_)) | Err(WireError::Model { .. }) => true,
        Err(
            WireError::Trap { .. }
            | WireError::InvalidModel(_)
            | WireError::Init(_)
            | WireError::Other { .. },
        ) => false,
    }
}

/// The worker side (`wasm-infer __run-worker`): see the module docs. Returns the exit status.
pub fn worker_main(mut input: impl Read, output: impl Write + Send + 'static) -> u8 {
    probe_cgroup();
    let Ok(hello) = read_frame::<Hello>(&mut input, MAX_REQUEST_FRAME) else {
        return 1;
    };
    let mut code = Vec::with_capacity(hello.models.len());
    for _ in &hello.models {
        match read_raw_frame(&mut input, MAX_REQUEST_FRAME) {
            Ok(bytes) => code.push(bytes),
            Err(_) => return 1,
        }
    }
    // Shared with a generation's token sink, which writes its `Token` frames as they come.
    let output = Arc::new(Mutex::new(output));
    let write = |message: &FromWorker| {
        let mut output = output.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *output, message)
    };
    let models = match start(&hello, code) {
        Ok(models) => models,
        Err(message) => {
            let _ = write(&FromWorker::Failed { message });
            return 1;
        }
    };
    let infos = models.iter().map(|m| m.info().clone()).collect();
    if write(&FromWorker::Ready { models: infos }).is_err() {
        return 1;
    }
    while let Ok(job) = read_frame::<ToWorker>(&mut input, MAX_REQUEST_FRAME) {
        let (index, reply) = match job {
            ToWorker::Run(request) => (
                request.model,
                models.get(request.model).map(|model| {
                    match model.run(request.input, &request.limits) {
                        Ok(outcome) => FromWorker::Done {
                            result: Ok(outcome.output),
                            usage: outcome.usage,
                        },
                        Err(failure) => FromWorker::Done {
                            result: Err(failure.error.into()),
                            usage: *failure.usage,
                        },
                    }
                }),
            ),
            ToWorker::Generate(job) => (
                job.model,
                models.get(job.model).map(|model| {
                    let sink = output.clone();
                    let on_emit: OnEmit = Box::new(move |tokens, text| {
                        let token = FromWorker::Token {
                            tokens: tokens.to_vec(),
                            text: text.to_string(),
                        };
                        let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
                        // A broken channel shows again at the end, where the worker exits.
                        let _ = write_frame(&mut *sink, &token);
                    });
                    generated_reply(model.generate_streaming(
                        job.request,
                        &job.limits,
                        Some(on_emit),
                    ))
                }),
            ),
        };
        let reply = reply.unwrap_or_else(|| FromWorker::Failed {
            message: format!("no model {index}"),
        });
        if write(&reply).is_err() {
            return 1;
        }
    }
    0
}

/// A generation's result as its last frame (its text went out in `Token` frames).
fn generated_reply(result: Result<Generation, Box<GenerationError>>) -> FromWorker {
    match result {
        Ok(generation) => FromWorker::Generated {
            result: Ok(GenerationEnd {
                prompt_tokens: generation.prompt_tokens,
                completion_tokens: generation.completion_tokens,
                finish_reason: generation.finish_reason,
            }),
            token_fuel: generation.token_fuel,
            usage: generation.usage,
        },
        Err(failure) => {
            let GenerationError {
                error, token_fuel, ..
            } = *failure;
            FromWorker::Generated {
                result: Err(error.error.into()),
                token_fuel,
                usage: *error.usage,
            }
        }
    }
}

/// Links the models' code, warms what would otherwise start lazily after lock-down, locks
/// down, and only then runs guest code (each model's `info`).
fn start(hello: &Hello, code: Vec<Vec<u8>>) -> Result<Vec<Model>, String> {
    let runtime = Runtime::with_config(
        RuntimeConfig {
            cache_dir: None,
            accel: hello.accel,
            device_memory: hello.device_memory,
            ..RuntimeConfig::default()
        }
        .with_engine_settings(hello.engine.clone()),
    )
    .map_err(|e| e.to_string())?;
    let linked = hello
        .models
        .iter()
        .zip(&code)
        .map(|(path, code)| {
            Model::link_handed_code(&runtime, code).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // wasmtime copied the code into its own mappings.
    drop(code);
    if hello.lockdown {
        crate::accel::warm_up();
        lockdown::lock_down()?;
        escape_drill("run");
    }
    let limits = LoadOptions::default().limits;
    hello
        .models
        .iter()
        .zip(linked)
        .zip(&hello.components)
        .map(|((path, pre), component)| {
            Model::from_linked(&runtime, pre, &limits, hello.resident_memory, component)
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

pub use crate::wire::ESCAPE_VAR;

/// The exit status of a process whose drill call was allowed (a hole in the filter).
pub const ESCAPE_SURVIVED: i32 = 75;

/// Runs the drill named in [`ESCAPE_VAR`] if it is for `stage` (see there).
pub(crate) fn escape_drill(stage: &str) {
    let Some(drill) = std::env::var_os(ESCAPE_VAR) else {
        return;
    };
    let drill = drill.to_string_lossy();
    // `preinit:poison-<kind>` is the poison drill (`worker::compile`), not a call to make.
    if drill.starts_with("preinit:poison-") {
        return;
    }
    let Some(call) = drill
        .strip_prefix(stage)
        .and_then(|rest| rest.strip_prefix(':'))
    else {
        return;
    };
    if lockdown::forbidden(call).is_err() {
        std::process::exit(ESCAPE_SURVIVED);
    }
}

pub use crate::cgroup::CGROUP_PROBE_VAR;

fn probe_cgroup() {
    let Some(dir) = std::env::var_os(CGROUP_PROBE_VAR) else {
        return;
    };
    if let Ok(groups) = std::fs::read("/proc/self/cgroup") {
        let _ = std::fs::write(
            PathBuf::from(dir).join(std::process::id().to_string()),
            groups,
        );
    }
}

/// The probe of a load child, whose group is gone when the test could look: its
/// `/proc/self/cgroup` in `load-<pid>` (named apart from run workers' probes, which a pool's
/// own load children would otherwise add to), in `load-<pid>.limits` the limit files of
/// the groups it is in, one `<hierarchy>/<file> <value>` a line (`unified` for v2), and in
/// `load-<pid>.environ` its `/proc/self/environ` (the child is gone before a test could read
/// it there).
pub(crate) fn probe_load_cgroup() {
    let Some(dir) = std::env::var_os(CGROUP_PROBE_VAR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    if let Ok(environ) = std::fs::read("/proc/self/environ") {
        let _ = std::fs::write(
            dir.join(format!("load-{}.environ", std::process::id())),
            environ,
        );
    }
    let Ok(groups) = std::fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    let _ = std::fs::write(dir.join(format!("load-{}", std::process::id())), &groups);
    let mut limits = String::new();
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (hierarchy, files): (&str, &[&str]) = match controllers {
            "" => ("unified", &["memory.max", "memory.swap.max", "pids.max"]),
            "memory" => (
                "memory",
                &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
            ),
            "pids" => ("pids", &["pids.max"]),
            _ => continue,
        };
        let base = if hierarchy == "unified" {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup").join(hierarchy)
        };
        for file in files {
            let at = base.join(path.trim_start_matches('/')).join(file);
            if let Ok(value) = std::fs::read_to_string(at) {
                limits.push_str(&format!("{hierarchy}/{file} {}\n", value.trim()));
            }
        }
    }
    let _ = std::fs::write(
        dir.join(format!("load-{}.limits", std::process::id())),
        limits,
    );
}

/// One worker process and its channel.
struct Worker {
    child: Child,
    channel: Channel,
    runs: u64,
    /// The tenant it is bound to ([`WorkerAffinity::Tenant`]): set before its first run of a
    /// tenant's request, never changed.
    tenant: Option<String>,
}

impl Worker {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a run and waits for its answer, no longer than the run's wall-time limit plus
    /// [`EXCHANGE_MARGIN`] and no more than [`max_run_frame`] bytes; the usage it reports is
    /// checked ([`check_usage`]). Any failure here is the worker's: the caller replaces it.
    fn exchange(&mut self, request: &RunRequest) -> Result<FromWorker, String> {
        let patience = request.limits.wall_time.saturating_add(EXCHANGE_MARGIN);
        let deadline = deadline_after(patience);
        let reply = self
            .channel
            .send(&ToWorkerRef::Run(request), deadline)
            .and_then(|()| {
                self.channel
                    .receive(max_run_frame(&request.limits), deadline)
            });
        match reply {
            Ok(FromWorker::Done { result, usage }) => {
                check_usage(&usage, &request.limits)?;
                Ok(FromWorker::Done { result, usage })
            }
            Ok(other) => Ok(other),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(format!(
                "no answer within {patience:?} (the wall-time limit and {EXCHANGE_MARGIN:?})"
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends a generation and relays its tokens to `on_token` as their frames arrive, until
    /// its last frame: no longer than its wall-time limit plus [`EXCHANGE_MARGIN`], each frame
    /// within [`max_run_frame`], the text within the output limit and the token ids within
    /// `max_tokens` (plus one `emit`'s worth), the usage checked ([`check_usage`]). `stop` is
    /// asked every [`STOP_POLL`] while it waits: `true` ends the exchange (`Ok(None)`), and the
    /// caller ends the worker, which is still generating.
    fn generate(
        &mut self,
        job: &GenerateJob,
        on_token: &mut dyn FnMut(&[u32], &str),
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<GenerateReply>, String> {
        let patience = job.limits.wall_time.saturating_add(EXCHANGE_MARGIN);
        let deadline = deadline_after(patience);
        let timed_out = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                format!(
                    "no answer within {patience:?} (the wall-time limit and {EXCHANGE_MARGIN:?})"
                )
            } else {
                e.to_string()
            }
        };
        self.channel
            .send(&ToWorkerRef::Generate(job), deadline)
            .map_err(timed_out)?;
        let max_tokens = (job.request.max_tokens as usize).saturating_add(MAX_TOKENS_PER_EMIT);
        let mut generated = Generated::default();
        loop {
            // A frame is written whole: once its first byte is readable, the rest follows.
            loop {
                if stop() {
                    return Ok(None);
                }
                let slice = (Instant::now() + STOP_POLL).min(deadline);
                match wait_for(self.channel.stdout.as_raw_fd(), libc::POLLIN, slice) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut && slice < deadline => {}
                    Err(e) => return Err(timed_out(e)),
                }
            }
            let frame = self
                .channel
                .receive(max_run_frame(&job.limits), deadline)
                .map_err(timed_out)?;
            match frame {
                FromWorker::Token { tokens, text } => {
                    let bytes = generated.text.len() as u64 + text.len() as u64;
                    if bytes > job.limits.max_output {
                        return Err(format!(
                            "it sent {bytes} bytes of text, above the output limit of {}",
                            job.limits.max_output
                        ));
                    }
                    if generated.tokens.len() + tokens.len() > max_tokens {
                        return Err(format!("it sent more than {max_tokens} token ids"));
                    }
                    on_token(&tokens, &text);
                    generated.tokens.extend_from_slice(&tokens);
                    generated.text.push_str(&text);
                }
                FromWorker::Generated {
                    result,
                    token_fuel,
                    usage,
                } => {
                    check_usage(&usage, &job.limits)?;
                    return Ok(Some(GenerateReply {
                        generated,
                        result,
                        token_fuel,
                        usage,
                    }));
                }
                FromWorker::Failed { message } => {
                    return Ok(Some(GenerateReply {
                        generated,
                        result: Err(WireError::Other {
                            kind: "config".into(),
                            message,
                        }),
                        token_fuel: TokenFuel::default(),
                        usage: Usage::default(),
                    }))
                }
                _ => return Err("it answered a generation out of protocol".into()),
            }
        }
    }

    /// Waits for a worker whose channel broke, and says how it ended.
    fn reap(mut self) -> String {
        use std::os::unix::process::ExitStatusExt;
        let pid = self.child.id();
        match wire::end(&mut self.child) {
            Some(status) => match status.signal() {
                Some(signal) => format!("worker {pid} killed by signal {signal}"),
                None => format!("worker {pid} exited ({status})"),
            },
            None => format!("worker {pid}: not reaped"),
        }
    }

    /// Ends a worker that is not suspected of anything: closing its channel makes it exit;
    /// the kill that follows is for one that would not (the supervisor never waits on a
    /// worker's good will).
    fn retire(self) {
        let Worker {
            mut child, channel, ..
        } = self;
        drop(channel);
        wire::end(&mut child);
    }

    fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kib| kib << 10)
    }
}

/// Counters of a pool's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Workers started (the first ones, replacements and recycled ones).
    pub started: u64,
    /// Requests lost with their worker.
    pub lost: u64,
    /// Workers replaced while alive, for any of the reasons below (their sum).
    pub recycled: u64,
    /// ... after a run that trapped or failed internally.
    pub recycled_abnormal: u64,
    /// ... after `recycle_after_runs` runs.
    pub recycled_runs: u64,
    /// ... above `recycle_above_rss` bytes resident.
    pub recycled_memory: u64,
    /// ... because a request of another tenant needed its place
    /// ([`WorkerAffinity::Tenant`]).
    pub recycled_tenant: u64,
    /// ... because its caller stopped a generation midway (its client went away).
    pub recycled_stopped: u64,
}

/// Why a worker was replaced while alive (the index into `PoolInner::recycled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recycle {
    Abnormal = 0,
    Runs = 1,
    Memory = 2,
    Tenant = 3,
    Stopped = 4,
}

/// How a job on a worker ended ([`WorkerPool::with_worker`]).
enum Ended<T> {
    /// It answered; `clean` when the worker may serve again ([`ended_cleanly`]).
    Answered { answer: T, clean: bool },
    /// It refused the job (`failed`): the worker stays.
    Refused(String),
    /// Its caller stopped it midway: the worker is killed and replaced.
    Stopped,
    /// It broke the protocol, or died: killed, replaced, counted as lost.
    Lost(String),
}

/// Asked while a worker generates: `true` stops the generation ([`WorkerPool::generate_for_tenant`]).
pub type StopCheck = Arc<dyn Fn() -> bool + Send + Sync>;

struct PoolInner {
    config: WorkerPoolConfig,
    idle: Mutex<Vec<Worker>>,
    busy: Mutex<Vec<u32>>,
    /// One permit per live worker place, held by a request from the moment it takes a worker
    /// until that worker (or its replacement) is idle again.
    permits: Arc<tokio::sync::Semaphore>,
    /// Worker places left (a place whose replacement cannot start is given up).
    places: AtomicU64,
    cgroup: Result<cgroup::Cgroup, String>,
    /// Each model's compiled code, verified once: every worker, replacements included, gets
    /// it from here (a cache entry altered later reaches no worker).
    code: Vec<Vec<u8>>,
    /// Each model's component digest and size (the workers' load reports carry them).
    components: Vec<ComponentIdentity>,
    models: Vec<ModelInfo>,
    started: AtomicU64,
    lost: AtomicU64,
    /// Workers recycled, by [`Recycle`].
    recycled: [AtomicU64; 5],
}

/// Worker processes serving runs: see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl PoolInner {
    fn spawn(&self) -> Result<(Worker, Vec<ModelInfo>), Error> {
        let config = &self.config;
        let mut command = wire::child_command(&config.binary, "__run-worker");
        if let Ok(group) = &self.cgroup {
            group.place_before_exec(&mut command);
        }
        let (child, channel) = wire::spawn(command, "worker")?;
        let mut worker = Worker {
            channel,
            child,
            runs: 0,
            tenant: None,
        };
        let hello = Hello {
            models: config.models.clone(),
            cache_dir: config.cache_dir.clone(),
            accel: config.accel,
            device_memory: config.device_memory,
            resident_memory: config.resident_memory,
            engine: config.engine.clone(),
            preinit: config.preinit,
            lockdown: config.lockdown,
            components: self.components.clone(),
        };
        let deadline = deadline_after(START_DEADLINE);
        let ready = worker
            .channel
            .send(&hello, deadline)
            .and_then(|()| {
                self.code
                    .iter()
                    .try_for_each(|code| worker.channel.send_raw(code, deadline))
            })
            .and_then(|()| {
                worker
                    .channel
                    .receive::<FromWorker>(max_ready_frame(config.models.len()), deadline)
            });
        self.started.fetch_add(1, Ordering::Relaxed);
        match ready {
            Ok(FromWorker::Ready { models }) => Ok((worker, models)),
            Ok(FromWorker::Failed { message }) => {
                worker.retire();
                Err(Error::Internal(format!(
                    "a worker could not start: {message}"
                )))
            }
            Ok(
                FromWorker::Done { .. } | FromWorker::Token { .. } | FromWorker::Generated { .. },
            )
            | Err(_) => {
                let reason = worker.reap();
                Err(Error::Internal(format!(
                    "a worker could not start: {reason}"
                )))
            }
        }
    }

    fn should_recycle(&self, worker: &Worker) -> Option<Recycle> {
        let runs = self
            .config
            .recycle_after_runs
            .is_some_and(|k| worker.runs >= k);
        let rss = || {
            self.config
                .recycle_above_rss
                .is_some_and(|bound| worker.rss_bytes().is_some_and(|rss| rss > bound))
        };
        if runs {
            Some(Recycle::Runs)
        } else if rss() {
            Some(Recycle::Memory)
        } else {
            None
        }
    }

    fn count_recycle(&self, why: Recycle) {
        self.recycled[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes an idle worker for a request of `tenant` (the caller holds a permit, so there
    /// is one): with [`WorkerAffinity::Tenant`] and a tenant, one bound to it, else a fresh
    /// one, else the one idle longest, which is then another tenant's (`true`); otherwise
    /// the one given back last.
    fn take_idle(&self, tenant: Option<&str>) -> (Worker, bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let tenant = match (self.config.affinity, tenant) {
            (WorkerAffinity::Tenant, Some(tenant)) => tenant,
            _ => {
                return (
                    idle.pop().expect("a permit stands for an idle worker"),
                    false,
                )
            }
        };
        let at = idle
            .iter()
            .rposition(|w| w.tenant.as_deref() == Some(tenant))
            .or_else(|| idle.iter().rposition(|w| w.tenant.is_none()));
        match at {
            Some(at) => (idle.remove(at), false),
            None => {
                assert!(!idle.is_empty(), "a permit stands for an idle worker");
                (idle.remove(0), true)
            }
        }
    }

    /// Puts a worker back and frees its place.
    fn give_back(&self, worker: Worker, permit: tokio::sync::OwnedSemaphorePermit) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(worker);
        drop(permit);
    }

    /// Starts a worker in a lost one's place, on a thread of its own (the request that lost the
    /// worker is answered meanwhile), and frees the place once it is idle. A start that fails
    /// is tried again, up to [`REPLACE_ATTEMPTS`] tries (a worker killed while it starts is no
    /// reason to shrink); after that the place is given up, and a pool with no place left is closed,
    /// so that requests fail instead of waiting for a worker that will never come.
    fn replace(self: &Arc<Self>, permit: tokio::sync::OwnedSemaphorePermit) {
        let inner = self.clone();
        let replacing = std::thread::Builder::new()
            .name("wasm-infer-replace".into())
            .spawn(move || {
                for attempt in 1..=REPLACE_ATTEMPTS {
                    match inner.spawn() {
                        Ok((worker, _)) => return inner.give_back(worker, permit),
                        Err(e) if attempt < REPLACE_ATTEMPTS => {
                            tracing::warn!(error = %e, attempt, "a replacement worker failed to start");
                            std::thread::sleep((REPLACE_BACKOFF * attempt).min(REPLACE_BACKOFF_MAX));
                        }
                        Err(e) => tracing::error!(error = %e, "a worker place is lost"),
                    }
                }
                inner.lose_place(permit);
            });
        if let Err(e) = replacing {
            tracing::error!(error = %e, "cannot start a thread to replace a worker");
            // The closure (and the permit in it) was dropped with the failed spawn: the place
            // is counted as free, but no worker stands for it.
            self.permits.forget_permits(1);
            self.lost_place();
        }
    }

    fn lose_place(&self, permit: tokio::sync::OwnedSemaphorePermit) {
        permit.forget();
        self.lost_place();
    }

    fn lost_place(&self) {
        if self.places.fetch_sub(1, Ordering::SeqCst) == 1 {
            tracing::error!("no worker is left: the pool is closed");
            self.permits.close();
        }
    }
}

/// Each model's compiled code, obtained in this process without running any of it: from the
/// cache (authenticated), else from load workers (pre-initialised in a locked-down child,
/// compiled in another), and cached.
fn code_for_workers(config: &WorkerPoolConfig) -> Result<Vec<(Vec<u8>, ComponentIdentity)>, Error> {
    let runtime = Runtime::with_config(
        RuntimeConfig {
            cache_dir: config.cache_dir.clone(),
            accel: config.accel,
            device_memory: config.device_memory,
            ..RuntimeConfig::default()
        }
        .with_engine_settings(config.engine.clone()),
    )?;
    let options = LoadOptions {
        preinit: config.preinit,
        isolate: Some(Isolation {
            worker: config.binary.clone(),
            limits: CompileLimits::default(),
        }),
        ..LoadOptions::default()
    };
    config
        .models
        .iter()
        .map(|path| {
            let wasm = std::fs::read(path).map_err(|error| Error::Io {
                path: path.clone(),
                error,
            })?;
            let code = crate::model::code_for_workers(&runtime, &wasm, &options)?;
            Ok((code, ComponentIdentity::of(&wasm)))
        })
        .collect()
}

/// Tries at starting a replacement worker before its place is given up: about 25 s of tries
/// with [`REPLACE_BACKOFF`], enough to outlast a storm of kills that also hits the starting
/// workers, short enough that a worker that can never start (a broken binary or model) does
/// not loop for ever.
const REPLACE_ATTEMPTS: u32 = 30;
/// Wait before the next try: 100 ms times the tries so far, at most [`REPLACE_BACKOFF_MAX`].
const REPLACE_BACKOFF: Duration = Duration::from_millis(100);
const REPLACE_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl WorkerPool {
    /// Starts the workers (each loads the models and reports ready) and, where configured
    /// and possible, their cgroup. Blocking: a worker starts in milliseconds from a warm cache.
    pub fn start(config: WorkerPoolConfig) -> Result<Self, Error> {
        if config.workers == 0 {
            return Err(Error::Config(
                "a worker pool needs at least one worker".into(),
            ));
        }
        let cgroup = match &config.cgroup {
            Some(limits) => {
                let group = cgroup::Cgroup::create(&cgroup::unique_name(), limits);
                if let Err(why) = &group {
                    tracing::warn!("workers run without a cgroup ({why}); rlimits still apply");
                }
                group
            }
            None => Err("no cgroup configured".to_string()),
        };
        let (code, components) = code_for_workers(&config)?.into_iter().unzip();
        let mut inner = PoolInner {
            code,
            components,
            permits: Arc::new(tokio::sync::Semaphore::new(config.workers as usize)),
            places: AtomicU64::new(u64::from(config.workers)),
            config,
            idle: Mutex::new(Vec::new()),
            busy: Mutex::new(Vec::new()),
            cgroup,
            models: Vec::new(),
            started: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            recycled: Default::default(),
        };
        let mut workers = Vec::new();
        for _ in 0..inner.config.workers {
            let (worker, models) = inner.spawn()?;
            inner.models = models;
            workers.push(worker);
        }
        *inner.idle.lock().unwrap() = workers;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The models' info, by index.
    pub fn models(&self) -> &[ModelInfo] {
        &self.inner.models
    }

    /// Where the workers' cgroup is, or why there is none.
    pub fn cgroup(&self) -> Result<&[PathBuf], &str> {
        match &self.inner.cgroup {
            Ok(group) => Ok(group.dirs()),
            Err(why) => Err(why),
        }
    }

    /// Process ids of the workers running a request now (for supervision and tests).
    pub fn busy_pids(&self) -> Vec<u32> {
        self.inner
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Process ids of the idle workers.
    pub fn idle_pids(&self) -> Vec<u32> {
        let idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter().map(Worker::pid).collect()
    }

    /// The idle workers' process ids, each with the tenant it is bound to
    /// ([`WorkerAffinity::Tenant`]; always `None` with [`WorkerAffinity::Shared`]).
    pub fn idle_tenants(&self) -> Vec<(u32, Option<String>)> {
        let idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter().map(|w| (w.pid(), w.tenant.clone())).collect()
    }

    /// Worker places left: the configured count, less the places whose replacement could not
    /// be started.
    pub fn places(&self) -> u64 {
        self.inner.places.load(Ordering::SeqCst)
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        let recycled = |why: Recycle| self.inner.recycled[why as usize].load(Ordering::Relaxed);
        let by = [
            recycled(Recycle::Abnormal),
            recycled(Recycle::Runs),
            recycled(Recycle::Memory),
            recycled(Recycle::Tenant),
            recycled(Recycle::Stopped),
        ];
        PoolStats {
            started: self.inner.started.load(Ordering::Relaxed),
            lost: self.inner.lost.load(Ordering::Relaxed),
            recycled: by.iter().sum(),
            recycled_abnormal: by[0],
            recycled_runs: by[1],
            recycled_memory: by[2],
            recycled_tenant: by[3],
            recycled_stopped: by[4],
        }
    }

    /// Runs `input` on model `model` in an idle worker (waiting for one), under `limits`,
    /// for no tenant: with [`WorkerAffinity::Tenant`] it takes any idle worker and binds
    /// none (for runs whose input is no tenant's, such as a readiness probe).
    pub async fn run(
        &self,
        model: usize,
        input: Input,
        limits: &Limits,
    ) -> Result<Outcome, RunError> {
        self.run_as(None, model, input, limits).await
    }

    /// Runs `input` on model `model` for `tenant`: as [`WorkerPool::run`], but with
    /// [`WorkerAffinity::Tenant`] only in a worker that has run no other tenant's request.
    pub async fn run_for_tenant(
        &self,
        tenant: &str,
        model: usize,
        input: Input,
        limits: &Limits,
    ) -> Result<Outcome, RunError> {
        self.run_as(Some(tenant.to_string()), model, input, limits)
            .await
    }

    async fn run_as(
        &self,
        tenant: Option<String>,
        model: usize,
        input: Input,
        limits: &Limits,
    ) -> Result<Outcome, RunError> {
        let request = RunRequest {
            model,
            input,
            limits: limits.clone(),
        };
        let answer = self
            .with_worker(tenant, move |worker| match worker.exchange(&request) {
                Ok(FromWorker::Done { result, usage }) => Ended::Answered {
                    clean: ended_cleanly(&result),
                    answer: (result, usage),
                },
                Ok(FromWorker::Failed { message }) => Ended::Refused(message),
                Ok(_) => Ended::Lost("it answered a run out of protocol".into()),
                Err(why) => Ended::Lost(why),
            })
            .await?;
        match answer {
            (Ok(output), usage) => Ok(Outcome { output, usage }),
            (Err(error), usage) => Err(RunError::new(Error::from(error), usage)),
        }
    }

    /// Generates for `request` with model `model` (one that exports `generate`) in an idle
    /// worker, for `tenant` as [`WorkerPool::run_for_tenant`] runs, calling `on_emit` with each
    /// piece as the worker relays it. `stop` is asked while the generation runs (every
    /// 50 ms): once it says `true` the worker is killed and replaced, and the generation ends
    /// with [`Error::WorkerLost`], its partial output what was relayed (a killed worker
    /// reports no usage: the caller that stopped it accounts for it).
    pub async fn generate_for_tenant(
        &self,
        tenant: Option<&str>,
        model: usize,
        request: GenerateRequest,
        limits: &Limits,
        mut on_emit: OnEmit,
        stop: StopCheck,
    ) -> Result<Generation, Box<GenerationError>> {
        let job = GenerateJob {
            model,
            request,
            limits: limits.clone(),
        };
        let relayed = Arc::new(Mutex::new(Generated::default()));
        let relay = relayed.clone();
        let answer = self
            .with_worker(tenant.map(str::to_string), move |worker| {
                let mut on_token = |tokens: &[u32], text: &str| {
                    let mut relay = relay.lock().unwrap_or_else(|e| e.into_inner());
                    relay.tokens.extend_from_slice(tokens);
                    relay.text.push_str(text);
                    on_emit(tokens, text);
                };
                match worker.generate(&job, &mut on_token, &*stop) {
                    Ok(Some(reply)) => Ended::Answered {
                        clean: ended_cleanly(&reply.result),
                        answer: reply,
                    },
                    Ok(None) => Ended::Stopped,
                    Err(why) => Ended::Lost(why),
                }
            })
            .await;
        match answer {
            Ok(reply) => reply.into_result(),
            Err(error) => {
                let partial =
                    std::mem::take(&mut *relayed.lock().unwrap_or_else(|e| e.into_inner()));
                Err(Box::new(GenerationError {
                    error,
                    partial,
                    token_fuel: TokenFuel::default(),
                }))
            }
        }
    }

    /// Takes an idle worker for `tenant` (waiting for one; a fresh one in the place of one bound
    /// to another tenant), runs `job` with it on a blocking thread, and then gives it back,
    /// recycles it, or replaces it, as the job ended.
    async fn with_worker<T: Send + 'static>(
        &self,
        tenant: Option<String>,
        job: impl FnOnce(&mut Worker) -> Ended<T> + Send + 'static,
    ) -> Result<T, RunError> {
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| {
                RunError::new(
                    Error::Internal("no worker is left (none could be started)".into()),
                    Usage::default(),
                )
            })?;
        let inner = self.inner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let lost = |inner: &Arc<PoolInner>, permit, reason: String| {
                inner.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "a worker was lost during a request; replacing it");
                inner.replace(permit);
                Err(RunError::new(
                    Error::WorkerLost { reason },
                    Usage::default(),
                ))
            };
            let (mut worker, other_tenants) = inner.take_idle(tenant.as_deref());
            if other_tenants {
                // Bound to another tenant: it goes, and a fresh one takes this request.
                inner.count_recycle(Recycle::Tenant);
                worker.retire();
                worker = match inner.spawn() {
                    Ok((fresh, _)) => fresh,
                    Err(e) => {
                        let reason = format!("no fresh worker for this tenant could start: {e}");
                        return lost(&inner, permit, reason);
                    }
                };
            }
            if inner.config.affinity == WorkerAffinity::Tenant && tenant.is_some() {
                // Bound before the tenant's input reaches it, however the run ends.
                worker.tenant = tenant;
            }
            let pid = worker.pid();
            inner
                .busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(pid);
            let ended = job(&mut worker);
            inner
                .busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|&p| p != pid);
            match ended {
                Ended::Answered { answer, clean } => {
                    worker.runs += 1;
                    if !clean {
                        // Killed, not asked to leave: a worker that trapped may not be the
                        // program it was.
                        inner.count_recycle(Recycle::Abnormal);
                        let _ = worker.reap();
                        inner.replace(permit);
                    } else if let Some(why) = inner.should_recycle(&worker) {
                        inner.count_recycle(why);
                        worker.retire();
                        inner.replace(permit);
                    } else {
                        inner.give_back(worker, permit);
                    }
                    Ok(answer)
                }
                Ended::Refused(message) => {
                    inner.give_back(worker, permit);
                    Err(RunError::new(Error::Config(message), Usage::default()))
                }
                Ended::Stopped => {
                    inner.count_recycle(Recycle::Stopped);
                    let _ = worker.reap();
                    inner.replace(permit);
                    Err(RunError::new(stopped_by_caller(), Usage::default()))
                }
                Ended::Lost(why) => {
                    let reason = format!("{why}; {}", worker.reap());
                    lost(&inner, permit, reason)
                }
            }
        })
        .await;
        joined.unwrap_or_else(|e| {
            Err(RunError::new(
                Error::Internal(format!("the pool's task failed: {e}")),
                Usage::default(),
            ))
        })
    }

    /// Blocking form of [`WorkerPool::run`].
    pub fn run_blocking(
        &self,
        model: usize,
        input: Input,
        limits: &Limits,
    ) -> Result<Outcome, RunError> {
        crate::runtime::block_on(self.run(model, input, limits))
            .unwrap_or_else(|error| Err(RunError::new(error, Usage::default())))
    }

    /// Blocking form of [`WorkerPool::run_for_tenant`].
    pub fn run_for_tenant_blocking(
        &self,
        tenant: &str,
        model: usize,
        input: Input,
        limits: &Limits,
    ) -> Result<Outcome, RunError> {
        crate::runtime::block_on(self.run_for_tenant(tenant, model, input, limits))
            .unwrap_or_else(|error| Err(RunError::new(error, Usage::default())))
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|e| e.into_inner()));
        for worker in idle {
            worker.retire();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::LimitExceeded;

    #[test]
    fn reported_usage_beyond_the_request_caps_is_refused() {
        let limits = Limits::default().fuel(1_000_000).memory(64 << 20);
        let honest = Usage {
            // A run that tripped its cap consumed the cap and the unit that tripped it.
            fuel_consumed: 1_000_001,
            peak_memory_bytes: 64 << 20,
            ..Usage::default()
        };
        assert_eq!(check_usage(&honest, &limits), Ok(()));
        let too_much_fuel = Usage {
            fuel_consumed: 1_000_002,
            ..honest.clone()
        };
        assert_eq!(
            check_usage(&too_much_fuel, &limits),
            Err("reported 1000002 fuel consumed, above the budget of 1000001".into())
        );
        let too_much_memory = Usage {
            peak_memory_bytes: (64 << 20) + 1,
            ..honest.clone()
        };
        assert_eq!(
            check_usage(&too_much_memory, &limits),
            Err(
                "reported a peak of 67108865 bytes of memory, above the ceiling of 67108864".into()
            )
        );
    }

    #[test]
    fn a_run_frame_is_bounded_by_the_output_limit() {
        // 16 MiB of output: at most 96 MiB of JSON and the 1 MiB margin, not 256 MiB.
        let limits = Limits::default().max_output(16 << 20);
        assert_eq!(max_run_frame(&limits), (96 << 20) + (1 << 20));
        let mut frame = Vec::new();
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        let error =
            read_frame::<FromWorker>(&mut frame.as_slice(), max_run_frame(&limits)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "a frame of 4294967295 bytes, above the bound of 101711872"
        );
    }

    #[test]
    fn a_worker_whose_run_trapped_is_not_reused() {
        let trap: Result<Output, _> = Err(WireError::Trap {
            code: None,
            message: "unreachable".into(),
            guest_stderr: String::new(),
        });
        assert!(!ended_cleanly(&trap));
        let fuel: Result<Output, _> = Err(WireError::Limit(LimitExceeded::Fuel {
            limit: 1,
            consumed: 1,
        }));
        assert!(ended_cleanly(&fuel));
        assert!(ended_cleanly(&Ok(Output::Text("ok".into()))));
    }
}
