//! Bounded compilation: compiling and pre-initialising an untrusted component in short-lived
//! child processes under OS limits, so that a component crafted to compile slowly or hugely
//! costs a child its CPU-time, memory or wall-clock allowance, never the parent.
//!
//! The children are the `wasm-infer` binary in a hidden worker mode (`wasm-infer
//! __load-worker`, [`crate::worker::load_worker_main`]), one per step, each reading a
//! [`LoadRequest`] and a component on stdin and answering one JSON line followed by bytes:
//!
//! - **pre-initialisation** ([`Step::Preinit`], components that export `wizer-initialize`)
//!   runs guest code. The child compiles the instrumented component, locks itself down as a run
//!   worker does ([`crate::worker::lockdown::lock_down`]), and only then instantiates and
//!   initialises it. It hands back data only: the snapshot component, which the parent
//!   inspects like any component and compiles in the next step. Nothing it returns is ever
//!   executed as native code.
//! - **compilation** ([`Step::Compile`]) runs no guest code: the child locks itself down under a
//!   tighter filter ([`crate::worker::lockdown::lock_down_compiler`]: no executable mappings,
//!   no signals) and precompiles; the native code comes back over the pipe. The parent writes
//!   it to the cache (authenticated, [`crate::cache`]) and loads it from memory.
//!
//! Limits: `RLIMIT_CPU` (CPU seconds), `RLIMIT_DATA` (writable private memory: the compiler's
//! heap; wasmtime's address-space reservations for linear memories are not writable until
//! used, so they do not count), no core dumps, a bound on the bytes read back, and a wall-clock
//! deadline after which the parent kills the child. The model's `info` is asked by whoever
//! runs it (the parent for an in-process model, a locked-down run worker for a pool).
//!
//! Compiling in-process (the default of [`LoadOptions`](crate::LoadOptions)) stays available
//! for embedders who load only models they trust: it is faster (no process start) and needs
//! no worker binary.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Cgroup, CgroupLimits, WORKER_EXTRA_PIDS};
pub use crate::error::{CompileLimit, CompileLimits, DEFAULT_COMPILE_LIMITS};
use crate::error::{Error, InvalidModel, LimitExceeded};
use crate::limits::Limits;
use crate::runtime::Runtime;

/// Where and how to compile in a child process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The `wasm-infer` binary to run as the worker.
    pub worker: PathBuf,
    /// Its limits.
    pub limits: CompileLimits,
}

/// Which step a load worker takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Precompile the component (no guest code runs); answers the native code.
    Compile,
    /// Pre-initialise the component (runs guest code, after lock-down); answers the snapshot.
    Preinit,
}

/// What the parent asks a load worker to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadRequest {
    /// The step.
    pub step: Step,
    /// The engine settings and device that decide the compiled code.
    pub meter_fuel: bool,
    /// Pooled slots, as the parent's runtime has them.
    pub pool: Option<u32>,
    /// NaN canonicalisation, as the parent's runtime has it.
    pub nan_canonicalization: bool,
    /// The CPU features compiled code may use, as the parent's runtime has them.
    pub cpu_features: crate::CpuFeatures,
    /// The parent's device choice.
    pub accel: crate::AccelMode,
    /// Limits of the initialisation (as `LoadOptions::limits`).
    pub limits: Limits,
}

impl LoadRequest {
    /// A request for `step` under `runtime`'s engine settings.
    pub(crate) fn new(step: Step, runtime: &Runtime, limits: &Limits) -> Self {
        let config = runtime.config();
        Self {
            step,
            meter_fuel: config.meter_fuel,
            pool: config.pool,
            nan_canonicalization: config.nan_canonicalization,
            cpu_features: config.cpu_features,
            accel: config.accel,
            limits: limits.clone(),
        }
    }
}

/// What a load worker answers (on one line; `Compiled` and `Snapshot` are followed by their
/// bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadAnswer {
    /// Precompiled: the native code follows.
    Compiled,
    /// Pre-initialised: the snapshot component follows.
    Snapshot,
    /// Refused as a model.
    Invalid(InvalidModel),
    /// A load-time call hit a limit (`init`: while pre-initialising).
    Limit { init: bool, limit: LimitExceeded },
    /// Any other failure, by kind and message.
    Failed { kind: String, message: String },
}

/// Bytes of native code a compile worker may answer: generous (code is a few times the size of
/// the wasm that it compiles, data segments are copied once), and bounded all the same.
fn max_compiled_bytes(wasm: &[u8]) -> u64 {
    (wasm.len() as u64)
        .saturating_mul(16)
        .saturating_add(256 << 20)
}

/// Bytes of snapshot a pre-initialisation worker may answer: the component and the contents
/// of its memories, each bounded by the initialisation's memory limit.
fn max_snapshot_bytes(wasm: &[u8], limits: &Limits) -> u64 {
    (wasm.len() as u64)
        .saturating_add(
            limits
                .memory
                .saturating_mul(u64::from(crate::limits::MAX_MEMORIES)),
        )
        .saturating_add(16 << 20)
}

/// Precompiles `wasm` in a compile worker: the native code for `runtime`'s engine. Blocks the
/// calling thread for the compile, as compiling in-process would.
pub(crate) fn compile_in_worker(
    isolation: &Isolation,
    runtime: &Runtime,
    wasm: &[u8],
) -> Result<Vec<u8>, Error> {
    let request = LoadRequest::new(Step::Compile, runtime, &Limits::default());
    match run_worker(isolation, &request, wasm, max_compiled_bytes(wasm))? {
        (LoadAnswer::Compiled, code) => Ok(code),
        (other, _) => Err(out_of_protocol(&other)),
    }
}

/// Pre-initialises `wasm` in a locked-down worker under `limits`: the snapshot component
/// (data: the caller inspects and compiles it).
pub(crate) fn preinit_in_worker(
    isolation: &Isolation,
    runtime: &Runtime,
    wasm: &[u8],
    limits: &Limits,
) -> Result<Vec<u8>, Error> {
    let request = LoadRequest::new(Step::Preinit, runtime, limits);
    match run_worker(isolation, &request, wasm, max_snapshot_bytes(wasm, limits))? {
        (LoadAnswer::Snapshot, snapshot) => Ok(snapshot),
        (other, _) => Err(out_of_protocol(&other)),
    }
}

fn out_of_protocol(answer: &LoadAnswer) -> Error {
    Error::Internal(format!(
        "the load worker answered out of protocol ({answer:?})"
    ))
}

/// The parent side: runs the worker on `wasm` under `isolation`'s limits, reads at most
/// `max_out` bytes of answer, and turns its end into the answer and the bytes after its line,
/// or the error it stands for.
fn run_worker(
    isolation: &Isolation,
    request: &LoadRequest,
    wasm: &[u8],
    max_out: u64,
) -> Result<(LoadAnswer, Vec<u8>), Error> {
    let limits = &isolation.limits;
    let mut command = Command::new(&isolation.worker);
    command
        .arg("__load-worker")
        // Nothing of this process's environment reaches a load worker: it reads no variable
        // but the one below (its settings come in the request, its stderr goes nowhere).
        .env_clear()
        // Threads (the compiler's, candle's) are sized from this, not from /proc or /sys,
        // which a locked-down worker may not open.
        .env(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    pass_escape_drill(&mut command);
    cgroup::pass_cgroup_probe(&mut command);
    pass_library_path(&mut command);
    apply_rlimits(&mut command, limits);
    // Removed when this function returns, after the child was reaped.
    let group = load_cgroup(limits, request);
    if let Some(group) = &group {
        group.place_before_exec(&mut command);
    }
    let mut child = command.spawn().map_err(|e| {
        let message = format!(
            "cannot start the compile worker {}: {e}",
            isolation.worker.display()
        );
        // A worker binary that is missing or not executable is a setting to fix; anything
        // else (no file descriptors, memory or processes left) is the host's resource failing.
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                Error::Config(message)
            }
            _ => Error::Internal(format!("the host ran out of a resource: {message}")),
        }
    })?;
    let mut input = serde_json::to_vec(request).expect("requests serialise");
    input.push(b'\n');
    input.extend_from_slice(wasm);
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A worker that dies early closes the pipe; its exit status says why.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let stdout = child.stdout.take().expect("piped stdout");
    // Reads one byte past the bound (to tell an answer at the bound from one above it), then
    // closes the pipe, which ends a worker that would write on.
    let reader = std::thread::spawn(move || {
        let mut answer = Vec::new();
        let _ = stdout
            .take(max_out.saturating_add(1))
            .read_to_end(&mut answer);
        answer
    });
    let deadline = Instant::now() + limits.wall_time;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(WORKER_POLL),
            Err(e) => {
                return Err(Error::Internal(format!(
                    "waiting for the compile worker: {e}"
                )))
            }
        }
    };
    let _ = writer.join();
    let answer = reader.join().unwrap_or_default();
    if answer.len() as u64 > max_out {
        return Err(Error::Internal(format!(
            "the load worker answered more than {max_out} bytes"
        )));
    }
    let exceeded = |limit: CompileLimit| {
        Err(InvalidModel::CompileLimit {
            limit,
            limits: limits.clone(),
        }
        .into())
    };
    let Some(status) = status else {
        return exceeded(CompileLimit::WallTime);
    };
    let line_end = answer
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(answer.len());
    if let Ok(parsed) = serde_json::from_slice::<LoadAnswer>(&answer[..line_end]) {
        return match parsed {
            LoadAnswer::Compiled | LoadAnswer::Snapshot if status.success() => {
                let bytes = answer.get(line_end + 1..).unwrap_or_default().to_vec();
                Ok((parsed, bytes))
            }
            LoadAnswer::Compiled | LoadAnswer::Snapshot => Err(Error::Internal(format!(
                "the load worker answered, then ended abnormally ({status})"
            ))),
            LoadAnswer::Invalid(reason) => Err(reason.into()),
            LoadAnswer::Limit { init: false, limit } => Err(limit.into()),
            LoadAnswer::Limit { init: true, limit } => Err(Error::Init(Box::new(limit.into()))),
            LoadAnswer::Failed { kind, message } if kind == "trap" => Err(Error::Trap {
                code: None,
                message,
                guest_stderr: String::new(),
            }),
            LoadAnswer::Failed { message, .. } => Err(Error::Internal(message)),
        };
    }
    use std::os::unix::process::ExitStatusExt;
    // The kernel's OOM killer ends a child past its group's ceiling with SIGKILL too.
    if group
        .as_ref()
        .and_then(Cgroup::oom_kills)
        .is_some_and(|kills| kills > 0)
    {
        return exceeded(CompileLimit::Memory);
    }
    match status.signal() {
        // RLIMIT_CPU sends SIGXCPU at the soft limit (and SIGKILL at the hard one).
        Some(libc::SIGXCPU) | Some(libc::SIGKILL) => exceeded(CompileLimit::Cpu),
        // Rust aborts when an allocation fails, as it does past RLIMIT_DATA.
        Some(libc::SIGABRT) => exceeded(CompileLimit::Memory),
        _ => Err(Error::Internal(format!(
            "the compile worker ended without an answer ({status})"
        ))),
    }
}

/// A binary built with the `cuda` feature links the CUDA libraries, which its children (the
/// same binary) find, as this process found them, through `LD_LIBRARY_PATH`: without it they
/// cannot start (the loader exits 127). Only that variable, and only in such a build; no other
/// `LD_*` variable reaches a child.
pub(crate) fn pass_library_path(command: &mut Command) {
    #[cfg(feature = "cuda")]
    if let Some(path) = std::env::var_os("LD_LIBRARY_PATH") {
        command.env("LD_LIBRARY_PATH", path);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = command;
}

/// Memory a load child's cgroup allows beyond its `RLIMIT_DATA` (and, for pre-initialisation,
/// the guest's linear memory, up to the load's memory limit): the binary's and the compiled
/// code's pages, the component and the answer it holds, stacks, and the page cache it causes.
pub const LOAD_MEMORY_MARGIN: u64 = 512 << 20;

/// The cgroup a load child joins between fork and exec, where this process may make one:
/// memory (swap included) `RLIMIT_DATA` + [`LOAD_MEMORY_MARGIN`], plus the load's memory
/// limit for a pre-initialisation child (its guest's linear memory is not in `RLIMIT_DATA`),
/// and candle's CPU threads + [`WORKER_EXTRA_PIDS`] processes and threads. Where none can be
/// made, one warning per process says why (the rlimits still apply).
fn load_cgroup(limits: &CompileLimits, request: &LoadRequest) -> Option<Cgroup> {
    let guest = match request.step {
        Step::Preinit => request.limits.memory,
        Step::Compile => 0,
    };
    let group_limits = CgroupLimits {
        memory: limits
            .memory
            .saturating_add(guest)
            .saturating_add(LOAD_MEMORY_MARGIN),
        cpus: None,
        pids: Some(
            (candle_core::utils::get_num_threads() as u64).saturating_add(WORKER_EXTRA_PIDS),
        ),
    };
    match Cgroup::create(&cgroup::unique_name(), &group_limits) {
        Ok(group) => Some(group),
        Err(why) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("load children run without a cgroup ({why}); rlimits still apply")
            });
            None
        }
    }
}

/// How often the parent looks whether the worker has ended: fine enough to notice the
/// deadline within a few milliseconds, coarse enough to cost nothing.
const WORKER_POLL: Duration = Duration::from_millis(5);

/// Sets the child's resource limits between fork and exec.
fn apply_rlimits(command: &mut Command, limits: &CompileLimits) {
    use std::os::unix::process::CommandExt;
    let cpu = limits.cpu.as_secs().max(1);
    let memory = limits.memory;
    // SAFETY: between fork and exec only async-signal-safe calls are allowed; setrlimit is one,
    // and the closure allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let set = |resource, value: u64| {
                let limit = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_CPU, cpu)?;
            set(libc::RLIMIT_DATA, memory)?;
            set(libc::RLIMIT_CORE, 0)?;
            Ok(())
        });
    }
}

/// The variable that arms the escape drill: `<stage>:<call>`, where stage is `run` (a run
/// worker), `preinit` (a pre-initialisation child) or `compile` (a compile child) and call one
/// of `worker::lockdown::forbidden`'s. It exists for the tests: right after its lock-down, where
/// the first guest instruction (or, for the compile child, the compiler) would run, the
/// process makes that call itself, standing in for native code that escaped wasmtime there;
/// the filter must kill it (`SIGSYS`). A call the filter let through ends the process with
/// `worker::ESCAPE_SURVIVED`. `preinit:poison-<kind>` is the poison drill instead: the
/// pre-initialisation child tampers with the snapshot it hands back (`segment`, `memory`,
/// `global`, `code`, `digest`), as such code could, and the parent must refuse it
/// ([`InvalidModel::PoisonedSnapshot`]). Parents pass the variable on to their children by
/// name; it can only make a worker end itself or a load fail.
pub const ESCAPE_VAR: &str = "WASM_INFER_TEST_ESCAPE";

/// Passes the escape drill's variable, if this process has it, on to a child.
pub(crate) fn pass_escape_drill(command: &mut Command) {
    if let Some(drill) = std::env::var_os(ESCAPE_VAR) {
        command.env(ESCAPE_VAR, drill);
    }
}
