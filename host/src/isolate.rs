//! Bounded compilation: compiling and pre-initialising an untrusted component in short-lived
//! child processes under OS limits, so that a component crafted to compile slowly or hugely
//! costs a child its CPU-time, memory or wall-clock allowance, never the parent.
//!
//! The children are the `wasm-infer` binary in a hidden worker mode (`wasm-infer
//! __load-worker`, [`crate::worker::load_worker_main`]), one per step, started and spoken to
//! over the same wire protocol as the run workers ([`crate::wire`]: one start path, length-
//! prefixed frames, one error type): the child reads a [`LoadRequest`] frame and the component
//! as a raw frame, and answers a [`LoadReply`] frame, followed on success by the step's bytes:
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

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Cgroup, CgroupLimits, WORKER_EXTRA_PIDS};
pub use crate::error::{CompileLimit, CompileLimits, DEFAULT_COMPILE_LIMITS};
use crate::error::{Error, InvalidModel};
use crate::limits::Limits;
use crate::runtime::{EngineSettings, Runtime};
use crate::wire::{self, Channel, WireError, FRAME_MARGIN};

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

/// What the parent asks a load worker to do (one JSON frame, then the component as a raw
/// frame).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadRequest {
    /// The step.
    pub step: Step,
    /// The engine settings that decide the compiled code, whole, as the parent's runtime has
    /// them (never field by field, so that a new setting cannot be left behind).
    pub engine: EngineSettings,
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
            engine: config.engine_settings(),
            accel: config.accel,
            limits: limits.clone(),
        }
    }
}

/// What a load worker answers when its step succeeded (one JSON frame, as the `Ok` of a
/// `Result` whose `Err` is the error as it crosses, [`WireError`]); the bytes follow as a raw
/// frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadAnswer {
    /// Precompiled: the native code follows.
    Compiled,
    /// Pre-initialised: the snapshot component follows.
    Snapshot,
}

/// A load worker's reply frame.
pub(crate) type LoadReply = Result<LoadAnswer, WireError>;

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
    run_worker(isolation, &request, wasm, max_compiled_bytes(wasm))
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
    run_worker(isolation, &request, wasm, max_snapshot_bytes(wasm, limits))
}

/// How a load worker's exchange went, before its end is known.
enum Exchange {
    /// The step's bytes, as the worker answered them.
    Answered(Vec<u8>),
    /// The worker's error, as it crossed.
    Refused(WireError),
    /// No answer by the deadline.
    TimedOut,
    /// An answer the protocol does not allow (the wrong step, a frame over its bound).
    OutOfProtocol(String),
    /// The channel broke (the worker ended, or closed it): its exit says why.
    Broken,
}

/// Sends the request and the component, and reads the reply and the step's bytes (at most
/// `max_out`), all by `deadline`.
fn exchange(
    channel: &mut Channel,
    request: &LoadRequest,
    wasm: &[u8],
    max_out: u64,
    deadline: Instant,
) -> Exchange {
    let expected = match request.step {
        Step::Compile => LoadAnswer::Compiled,
        Step::Preinit => LoadAnswer::Snapshot,
    };
    let failed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut => Exchange::TimedOut,
        _ if wire::is_too_long(&e) => Exchange::OutOfProtocol(e.to_string()),
        _ => Exchange::Broken,
    };
    let sent = channel
        .send(request, deadline)
        .and_then(|()| channel.send_raw(wasm, deadline));
    // A worker that stopped reading may still have answered (an error it found early):
    // its reply is read all the same, but only an error is taken from it.
    let read_all = match sent {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => false,
        Err(e) => return failed(e),
    };
    let reply = channel.receive::<LoadReply>(FRAME_MARGIN, deadline);
    match reply {
        Ok(Ok(answer)) if !read_all => {
            Exchange::OutOfProtocol(format!("{answer:?} before it read the component"))
        }
        Ok(Ok(answer)) if answer == expected => match channel.receive_raw(max_out, deadline) {
            Ok(bytes) => Exchange::Answered(bytes),
            Err(e) => failed(e),
        },
        Ok(Ok(answer)) => {
            Exchange::OutOfProtocol(format!("{answer:?} to a {:?} request", request.step))
        }
        Ok(Err(error)) => Exchange::Refused(error),
        Err(e) => failed(e),
    }
}

/// The parent side: runs a load worker on `wasm` under `isolation`'s limits (over the one wire
/// protocol, [`crate::wire`]), and turns its end into the bytes its step answered (at most
/// `max_out`: native code, or a snapshot), or the error it stands for.
fn run_worker(
    isolation: &Isolation,
    request: &LoadRequest,
    wasm: &[u8],
    max_out: u64,
) -> Result<Vec<u8>, Error> {
    let limits = &isolation.limits;
    let mut command = wire::child_command(&isolation.worker, "__load-worker");
    apply_rlimits(&mut command, limits);
    // Removed when this function returns, after the child was reaped.
    let group = load_cgroup(limits, request);
    if let Some(group) = &group {
        group.place_before_exec(&mut command);
    }
    let (mut child, mut channel) = wire::spawn(command, "compile worker")?;
    let deadline = wire::deadline_after(limits.wall_time);
    let exchange = exchange(&mut channel, request, wasm, max_out, deadline);
    // Closing the channel ends a worker that would write on.
    drop(channel);
    let exceeded = |limit: CompileLimit| {
        Err(InvalidModel::CompileLimit {
            limit,
            limits: limits.clone(),
        }
        .into())
    };
    let status = match exchange {
        Exchange::TimedOut => None,
        Exchange::OutOfProtocol(what) => {
            wire::end(&mut child);
            return Err(Error::Internal(format!(
                "the load worker answered out of protocol: {what}"
            )));
        }
        _ => wait_until(&mut child, deadline)?,
    };
    let Some(status) = status else {
        wire::end(&mut child);
        return exceeded(CompileLimit::WallTime);
    };
    match exchange {
        Exchange::Answered(bytes) if status.success() => return Ok(bytes),
        Exchange::Answered(_) => {
            return Err(Error::Internal(format!(
                "the load worker answered, then ended abnormally ({status})"
            )))
        }
        Exchange::Refused(error) => return Err(error.into()),
        _ => {}
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

/// How often the parent looks whether a worker has ended: fine enough to notice the deadline
/// within a few milliseconds, coarse enough to cost nothing.
const WORKER_POLL: Duration = Duration::from_millis(5);

/// Waits for `child` to end, no later than `deadline` (`None`: still running then).
fn wait_until(
    child: &mut std::process::Child,
    deadline: Instant,
) -> Result<Option<std::process::ExitStatus>, Error> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) if Instant::now() >= deadline => return Ok(None),
            Ok(None) => std::thread::sleep(WORKER_POLL),
            Err(e) => {
                wire::end(child);
                return Err(Error::Internal(format!(
                    "waiting for the compile worker: {e}"
                )));
            }
        }
    }
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

pub use crate::wire::ESCAPE_VAR;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::LimitExceeded;
    use crate::runtime::RuntimeConfig;
    use std::os::unix::fs::PermissionsExt;

    /// A load worker that is a shell script: `body` stands for whatever a compromised or
    /// broken child could write on its channel.
    fn scripted(name: &str, body: &str, wall_time: Duration) -> (Isolation, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("wasm-infer-scripted-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("worker");
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        let isolation = Isolation {
            worker: script,
            limits: CompileLimits {
                wall_time,
                ..DEFAULT_COMPILE_LIMITS
            },
        };
        (isolation, dir)
    }

    fn compile_with(name: &str, body: &str, wall_time: Duration) -> (Error, Duration) {
        let (isolation, dir) = scripted(name, body, wall_time);
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: None,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let started = Instant::now();
        let error = compile_in_worker(&isolation, &runtime, b"\0asm not a real component")
            .expect_err("a scripted worker never compiles");
        let took = started.elapsed();
        std::fs::remove_dir_all(dir).unwrap();
        (error, took)
    }

    /// The script's answer: a frame header saying `len`, as octal escapes for `printf`.
    fn header(len: u32) -> String {
        len.to_le_bytes()
            .iter()
            .map(|b| format!("\\{b:03o}"))
            .collect()
    }

    #[test]
    fn a_load_worker_answering_out_of_protocol_is_killed_at_once_and_its_answer_refused() {
        // Each script then spins: the parent must kill it rather than wait for its end (the
        // wall-time limit of an hour would be the answer otherwise).
        let spin = "while :; do :; done";
        let hour = Duration::from_secs(3600);
        let reply = r#"{"Ok":"snapshot"}"#;
        let cases = [
            (
                "huge-reply",
                format!("printf '{}'; {spin}", header(u32::MAX)),
                "the load worker answered out of protocol: a frame of 4294967295 bytes, above \
                 the bound of 1048576",
            ),
            (
                "wrong-step",
                format!("printf '{}{reply}'; {spin}", header(reply.len() as u32)),
                "the load worker answered out of protocol: Snapshot to a Compile request",
            ),
            (
                "huge-code",
                format!(
                    "printf '{}{}{}'; {spin}",
                    header(17),
                    r#"{"Ok":"compiled"}"#,
                    header(u32::MAX)
                ),
                // The code's bound for a 25-byte component: 16 x 25 + 256 MiB.
                "the load worker answered out of protocol: a frame of 4294967295 bytes, above \
                 the bound of 268435856",
            ),
        ];
        for (name, body, message) in cases {
            let (error, took) = compile_with(name, &body, hour);
            assert!(
                matches!(&error, Error::Internal(m) if m == message),
                "{name}: {error:?}"
            );
            assert!(took < hour, "{name}");
        }
    }

    #[test]
    fn a_load_worker_that_never_answers_is_killed_at_its_deadline() {
        // It reads nothing and writes nothing: the parent's writes and reads both wait on it.
        let (error, _) = compile_with("silent", "while :; do :; done", Duration::from_millis(300));
        match error {
            Error::InvalidModel(InvalidModel::CompileLimit { limit, limits }) => {
                assert_eq!(limit, CompileLimit::WallTime);
                assert_eq!(limits.wall_time, Duration::from_millis(300));
            }
            other => panic!("expected the wall-time limit, got {other:?}"),
        }
    }

    #[test]
    fn a_load_workers_error_crosses_whole() {
        // An initialisation that ran out of fuel, as the pre-initialisation child reports it.
        let reply = r#"{"Err":{"init":{"limit":{"Fuel":{"limit":10,"consumed":11}}}}}"#;
        let body = format!("printf '{}{reply}'", header(reply.len() as u32));
        let (error, _) = compile_with("init-fuel", &body, Duration::from_secs(60));
        assert_eq!(
            error.limit(),
            Some(&LimitExceeded::Fuel {
                limit: 10,
                consumed: 11
            }),
            "{error:?}"
        );
        assert!(matches!(error, Error::Init(_)), "{error:?}");
    }
}
