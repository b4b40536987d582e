//! Bounded compilation: compiling and pre-initialising an untrusted component in a
//! short-lived child process under OS limits, so that a component crafted to compile slowly
//! or hugely costs a child its CPU-time, memory or wall-clock allowance, never the parent.
//!
//! The child is the `wasm-infer` binary in a hidden worker mode (`wasm-infer __load-worker`,
//! [`crate::worker::load_worker_main`]): it reads a [`LoadRequest`] and the component on stdin, builds a
//! runtime with the parent's engine settings and cache directory, loads the model there (which
//! compiles, pre-initialises, asks for its info and writes the cache entry), and answers one
//! JSON line. The parent then loads the model from the cache, where wasmtime checks that the
//! compiled code matches its own engine. Limits: `RLIMIT_CPU` (CPU seconds), `RLIMIT_DATA`
//! (writable private memory: the compiler's heap; wasmtime's address-space reservations for
//! linear memories are not writable until used, so they do not count), no core dumps, and a
//! wall-clock deadline after which the parent kills it.
//!
//! Compiling in-process (the default of [`LoadOptions`](crate::LoadOptions)) stays available
//! for embedders who load only models they trust: it is faster (no process start, no second
//! load from the cache) and needs no worker binary.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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

/// What the parent asks a load worker to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadRequest {
    /// The cache directory to compile into (the parent's).
    pub cache_dir: PathBuf,
    /// The engine settings and device that decide the compiled code.
    pub meter_fuel: bool,
    /// Pooled slots, as the parent's runtime has them.
    pub pool: Option<u32>,
    /// NaN canonicalisation, as the parent's runtime has it.
    pub nan_canonicalization: bool,
    /// The CPU features compiled code may use, as the parent's runtime has them.
    pub cpu_features: crate::CpuFeatures,
    /// The parent's device choice (the `info` call links the accelerator imports).
    pub accel: crate::AccelMode,
    /// Pre-initialise (as `LoadOptions::preinit`).
    pub preinit: bool,
    /// Load-time limits (as `LoadOptions::limits`).
    pub limits: Limits,
}

/// What a load worker answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadAnswer {
    /// Compiled and cached.
    Loaded,
    /// Refused as a model.
    Invalid(InvalidModel),
    /// A load-time call hit a limit (`init`: while pre-initialising).
    Limit { init: bool, limit: LimitExceeded },
    /// Any other failure, by kind and message.
    Failed { kind: String, message: String },
}

/// The parent side: runs the worker on `wasm` under `isolation`'s limits and turns its end
/// into `Ok` (the model is in the cache) or the error it stands for. Blocks the calling
/// thread for the compile, as compiling in-process would.
pub(crate) fn compile_in_worker(
    isolation: &Isolation,
    request: &LoadRequest,
    wasm: &[u8],
) -> Result<(), Error> {
    let limits = &isolation.limits;
    let mut command = Command::new(&isolation.worker);
    command
        .arg("__load-worker")
        // Nothing of this process's environment reaches a process that runs guest code: the
        // child reads no variable (its cache directory and settings come in the request, its
        // stderr goes nowhere).
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    apply_rlimits(&mut command, limits);
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
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut answer = String::new();
        let _ = stdout.read_to_string(&mut answer);
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
    if let Ok(answer) = serde_json::from_str::<LoadAnswer>(answer.trim()) {
        return match answer {
            LoadAnswer::Loaded => Ok(()),
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

/// How often the parent looks whether the worker has ended: fine enough to notice the
/// deadline within a few milliseconds, coarse enough to cost nothing.
const WORKER_POLL: Duration = Duration::from_millis(5);

/// A private temporary cache through which a worker hands its compiled code to a parent
/// whose runtime has no cache; removed when dropped (a loaded model keeps its mapping).
///
/// The directory is made by `mkdir` under a random name (never an existing directory, which
/// another local user could have planted under a predictable one to swap the code between
/// the worker's write and the parent's load), mode 0700, and its owner and mode are checked
/// before anything is written there.
pub(crate) struct Handoff {
    pub(crate) cache: crate::cache::Cache,
    pub(crate) entry: PathBuf,
    /// Removes the directory when the hand-off ends.
    _dir: tempfile::TempDir,
}

impl Handoff {
    pub(crate) fn new(runtime: &Runtime, material: &str) -> Result<Self, Error> {
        let parent = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix("wasm-infer-handoff-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(|error| Error::Io {
                path: parent.clone(),
                error,
            })?;
        check_private(dir.path())?;
        let cache = crate::cache::Cache::new(dir.path().to_path_buf(), None);
        let entry = cache.entry(runtime.engine(), material);
        Ok(Self {
            cache,
            entry,
            _dir: dir,
        })
    }
}

/// Refuses a directory that is not ours alone: owned by another user, or open to the group
/// or others (what a directory made by someone else, or a umask we did not expect, gives).
fn check_private(dir: &std::path::Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|error| Error::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    // SAFETY: geteuid has no failure mode and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o077 != 0 {
        return Err(Error::Internal(format!(
            "the hand-off directory {} is not private (owner {}, mode {:o}; expected {euid}, 0700)",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

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
