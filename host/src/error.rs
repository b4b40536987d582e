//! What can go wrong, as types: one enum for every failure, one variant per limit, and a
//! stable machine name for each ([`ErrorKind`]) that the CLI's exit statuses, the JSON report
//! and the HTTP status mapping all derive from.
//!
//! Failures are classified from what the host observed (the trap code wasmtime reports, the
//! refusals the limiter and the device account recorded, the deadline the ticker saw), never
//! from message text, with one documented exception (the hostcall copy budget, see `run.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{format_count, format_size};
use crate::usage::Usage;

/// A run hit one of its [`Limits`](crate::Limits). Every variant carries the limit and the
/// figure that crossed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum LimitExceeded {
    /// The run needed more fuel than `limit`. `consumed` is what was burnt when it was stopped:
    /// at least `limit + 1`, since wasmtime checks fuel at function entries and loop headers.
    #[error("fuel limit of {} exhausted: the run needed more (raise --fuel)", format_count(*limit))]
    Fuel {
        /// The cap, in fuel units.
        limit: u64,
        /// Fuel consumed when the run was stopped (a lower bound on what it needed).
        consumed: u64,
    },
    /// The guest asked to grow its linear memory to `requested` bytes, beyond `limit`.
    #[error(
        "memory limit of {} exceeded: the guest asked for {} in total (raise --mem)",
        format_size(*limit),
        format_size(*requested)
    )]
    Memory {
        /// The ceiling, in bytes.
        limit: u64,
        /// Total linear memory the refused growth would have reached, in bytes.
        requested: u64,
    },
    /// The guest asked to grow its tables to `requested` elements in total, beyond `limit`
    /// (fixed: [`MAX_TABLE_ELEMENTS`](crate::limits::MAX_TABLE_ELEMENTS)).
    #[error(
        "table limit of {} elements exceeded: the guest asked for {} in total",
        format_count(*limit),
        format_count(*requested)
    )]
    Table {
        /// The ceiling, in table elements.
        limit: u64,
        /// Total elements the refused growth would have reached.
        requested: u64,
    },
    /// The guest tried to hold more host-side resources (accelerator tensors, WASI streams
    /// and pollables, or handles of its own resources) at once than `limit` (fixed:
    /// [`MAX_HANDLES`](crate::limits::MAX_HANDLES)).
    #[error("handle limit of {} live resources exceeded", format_count(*limit))]
    Handles {
        /// The ceiling, in live handles.
        limit: u64,
    },
    /// The guest failed after the accelerator refused a device allocation that would have
    /// taken `used + requested` bytes past `budget` (the run's `--vram`, or what the host-wide
    /// budget had left). A guest that falls back to in-sandbox compute instead succeeds, and
    /// its usage counts the refusal.
    #[error(
        "device-memory budget exceeded: {} requested with {} in use, budget {} (raise --vram)",
        format_size(*requested),
        format_size(*used),
        format_size(*budget)
    )]
    DeviceMemory {
        /// Bytes the refused allocation asked for.
        requested: u64,
        /// Bytes already held against that budget.
        used: u64,
        /// The budget that would have been exceeded.
        budget: u64,
    },
    /// The run was still going when its wall-time limit passed.
    #[error(
        "wall-time limit of {} exceeded: stopped after {} (raise --timeout)",
        humantime::format_duration(*limit),
        crate::units::format_duration(*elapsed)
    )]
    WallTime {
        /// The ceiling.
        limit: Duration,
        /// Time from the start of the run to the moment it was stopped.
        elapsed: Duration,
    },
    /// The input is larger than allowed; refused before any guest work.
    #[error(
        "input of {} exceeds the input limit of {} (raise --max-input)",
        format_size(*size),
        format_size(*limit)
    )]
    Input {
        /// The ceiling, in bytes.
        limit: u64,
        /// The input's size, in bytes (see [`Limits::max_input`](crate::Limits::max_input)).
        size: u64,
    },
    /// The batch has more items than allowed; refused before any guest work.
    #[error(
        "batch of {} items exceeds the batch limit of {} (raise --max-batch)",
        format_count(*items),
        format_count(*limit)
    )]
    Batch {
        /// The ceiling, in items.
        limit: u64,
        /// Items in the batch.
        items: u64,
    },
    /// The guest returned more output than allowed; nothing of it is returned. When the output
    /// was so large that the host stopped copying it out of the sandbox (it never holds more
    /// than about `limit` + 1 MiB of a guest's output), the true size is unknown: `size` is
    /// then a lower bound and `at_least` is true.
    #[error(
        "output of {}{} exceeds the output limit of {} (raise --max-output)",
        if *at_least { "at least " } else { "" },
        format_size(*size),
        format_size(*limit)
    )]
    Output {
        /// The ceiling, in bytes.
        limit: u64,
        /// The output's payload size in bytes, or a lower bound of it (`at_least`).
        size: u64,
        /// `size` is a lower bound: the host stopped copying before the end.
        at_least: bool,
    },
    /// The model's calibration profile predicts that the input would need more fuel or memory
    /// than its limit; refused before any guest work (see [`crate::profile`]). Its kind is the
    /// predicted resource's ([`ErrorKind::Fuel`] or [`ErrorKind::Memory`]).
    #[error(
        "predicted {resource} of {} exceeds the {resource} limit of {} (the model's \
         calibration profile; raise {})",
        resource.format(*predicted),
        resource.format(*limit),
        resource.flag()
    )]
    Predicted {
        /// The limit (fuel units, or bytes of memory).
        limit: u64,
        /// What the profile predicts for the input, in the same unit.
        predicted: u64,
        /// Which limit the prediction is over.
        resource: PredictedLimit,
    },
}

/// The limit a [`LimitExceeded::Predicted`] refusal predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictedLimit {
    /// The fuel cap ([`Limits::fuel`](crate::Limits::fuel)).
    Fuel,
    /// The memory ceiling ([`Limits::memory`](crate::Limits::memory)).
    Memory,
}

impl PredictedLimit {
    fn format(self, figure: u64) -> String {
        match self {
            Self::Fuel => format_count(figure),
            Self::Memory => format_size(figure),
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Self::Fuel => "--fuel",
            Self::Memory => "--mem",
        }
    }
}

impl std::fmt::Display for PredictedLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fuel => "fuel",
            Self::Memory => "memory",
        })
    }
}

/// The OS limits of a compiling child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileLimits {
    /// CPU time the child may use (`RLIMIT_CPU`, whole seconds, at least 1).
    #[serde(with = "crate::units::serde::duration")]
    pub cpu: Duration,
    /// Writable memory the child may allocate (`RLIMIT_DATA`), in bytes.
    #[serde(with = "crate::units::serde::size")]
    pub memory: u64,
    /// Wall-clock time before the parent kills the child.
    #[serde(with = "crate::units::serde::duration")]
    pub wall_time: Duration,
}

/// Default compile limits: 60 s of CPU, 2 GiB of memory, 120 s of wall time. MiniLM (92 MiB)
/// compiles and pre-initialises in about 15 s of CPU and 1 GiB here.
pub const DEFAULT_COMPILE_LIMITS: CompileLimits = CompileLimits {
    cpu: Duration::from_secs(60),
    memory: 2 << 30,
    wall_time: Duration::from_secs(120),
};

impl Default for CompileLimits {
    fn default() -> Self {
        DEFAULT_COMPILE_LIMITS
    }
}

/// Which compile limit a child exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompileLimit {
    /// `CompileLimits::cpu`.
    Cpu,
    /// `CompileLimits::memory`.
    Memory,
    /// `CompileLimits::wall_time`.
    WallTime,
}

impl std::fmt::Display for CompileLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "CPU-time (--compile-cpu)",
            Self::Memory => "memory (--compile-mem)",
            Self::WallTime => "wall-time (--compile-timeout)",
        })
    }
}

/// What a component is made of, for [`InvalidModel::TooMany`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentPart {
    /// Core module instances.
    CoreInstances,
    /// Linear memories.
    Memories,
    /// Tables.
    Tables,
}

impl std::fmt::Display for ComponentPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::CoreInstances => "core instances",
            Self::Memories => "memories",
            Self::Tables => "tables",
        })
    }
}

/// Why a file cannot be used as a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum InvalidModel {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly file (no `\\0asm` header)")]
    NotWasm,
    /// A core module where a component is needed.
    #[error(
        "a core WebAssembly module, not a component: build the model for wasm32-wasip2 \
         (or wrap it with `wasm-tools component new`)"
    )]
    NotAComponent,
    /// The component failed to validate or compile.
    #[error("malformed component: {0}")]
    Malformed(String),
    /// The component is well-formed but uses a WebAssembly proposal this host's engine leaves
    /// off (threads, GC, exceptions, memory64, ...).
    #[error("component uses {proposal}, which this host does not enable")]
    UnsupportedProposal {
        /// The proposal, as wasmparser names it (`threads`, `gc`, ...).
        proposal: String,
    },
    /// The component is made of more instances, memories or tables than a model may have.
    #[error("component has {count} {part}, more than the {cap} a model may have")]
    TooMany {
        /// What there are too many of.
        part: ComponentPart,
        /// How many the component would create.
        count: u64,
        /// The cap ([`MAX_CORE_INSTANCES`](crate::limits::MAX_CORE_INSTANCES) and its siblings).
        cap: u32,
    },
    /// Compiling (or pre-initialising) the component in its worker process exceeded one of
    /// the compile limits ([`Isolation`](crate::isolate::Isolation)); the parent is unaffected.
    #[error(
        "compiling the component exceeded its {limit} limit ({} CPU, {} memory, {} wall time)",
        humantime::format_duration(limits.cpu),
        format_size(limits.memory),
        humantime::format_duration(limits.wall_time)
    )]
    CompileLimit {
        /// Which limit.
        limit: CompileLimit,
        /// The limits it ran under.
        limits: CompileLimits,
    },
    /// The model's `info` returned more than the host keeps of it.
    #[error("the model's info is larger than the {limit} bytes the host keeps of it")]
    InfoTooLarge {
        /// [`MAX_INFO_BYTES`](crate::limits::MAX_INFO_BYTES).
        limit: u64,
    },
    /// The component does not export the `wasm-infer:model` world's `info` and `infer`.
    #[error("component does not implement the wasm-infer:model/model world: {0}")]
    WrongWorld(String),
    /// The component imports something the host does not provide.
    #[error("component imports something wasm-infer does not provide: {0}")]
    UnsupportedImport(String),
    /// A snapshot made by another wasm-infer format, wasmtime version or engine configuration.
    #[error("snapshot does not match this runtime: {0}")]
    SnapshotMismatch(String),
    /// What a pre-initialisation worker handed back is not this component's initial state:
    /// code, types or imports that differ from the component's, globals of other types,
    /// memories that shrank or exceed the load's memory limit, data outside its memory, or a
    /// description of another component. That worker ran guest code, so this is the guest's
    /// doing (SECURITY.md, "A poisoned snapshot").
    #[error("the pre-initialisation worker handed back a poisoned snapshot: {0}")]
    PoisonedSnapshot(String),
    /// Asked to snapshot a component that does not export `wizer-initialize`.
    #[error(
        "component cannot be pre-initialised: it does not export `wizer-initialize` \
         (the wasm-infer:model/preinit-model world)"
    )]
    NotPreinitialisable,
}

/// Codes a model uses to refuse an input (mirrors the WIT `error-code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelErrorCode {
    /// The input kind is not one the model takes.
    UnsupportedInput,
    /// The input's content is unusable.
    InvalidInput,
    /// The model's own state is broken.
    Internal,
}

impl std::fmt::Display for ModelErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnsupportedInput => "unsupported input",
            Self::InvalidInput => "invalid input",
            Self::Internal => "internal",
        })
    }
}

/// Every failure of the library.
///
/// **Attribution of limit trips.** A refused memory growth, table growth or device allocation
/// is recorded when it happens, but it is reported as the cause of a failure only if the guest
/// did not carry on after it: a run that grew memory or tables, or was granted a device
/// allocation, after the refusal had handled it (an allocator that retried smaller, a model
/// that fell back to the sandbox), so a later trap is reported as [`Error::Trap`]. An
/// exhausted fuel budget and a passed deadline are always the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A run hit one of its limits.
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    /// The file is not a usable model.
    #[error("invalid model: {0}")]
    InvalidModel(#[from] InvalidModel),
    /// Pre-initialising the model (building its snapshot) failed: the initialisation hit a
    /// limit, trapped, or called an import.
    #[error("pre-initialising the model failed: {0}")]
    Init(Box<Error>),
    /// The guest crashed: a wasm trap (panic, `unreachable`, stack overflow, out-of-bounds
    /// access, ...) or a misuse of a host interface.
    #[error("guest trapped: {message}{}", stderr_suffix(.guest_stderr))]
    Trap {
        /// wasmtime's trap code, when it was a wasm trap.
        code: Option<wasmtime::Trap>,
        /// What happened, as wasmtime describes it.
        message: String,
        /// The tail of what the guest wrote to stderr (a Rust panic message, say).
        guest_stderr: String,
    },
    /// The model refused the input with a structured error.
    #[error("model error ({code}): {message}")]
    Model {
        /// Why.
        code: ModelErrorCode,
        /// The model's explanation.
        message: String,
    },
    /// Reading a model failed. (Displayed with the reason, which is therefore not also a
    /// `source`: a chain prints it once.)
    #[error("{}: {error}", path.display())]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The input could not be read (a file or stream that failed, bytes that are not UTF-8).
    #[error("input could not be read: {0}")]
    InputRead(String),
    /// The caller asked for something this runtime cannot do (a fuel cap without fuel
    /// metering, a pool of zero slots, a device this build lacks).
    #[error("{0}")]
    Config(String),
    /// The host is short of memory and admits no more runs for now (see
    /// [`RuntimeConfig::admission`](crate::RuntimeConfig::admission)); try again after
    /// `retry_after`. Nothing ran.
    #[error(
        "overloaded: memory pressure {pressure:.1}% stalls; retry after {}",
        humantime::format_duration(*retry_after)
    )]
    Overloaded {
        /// The pressure reading that refused the run (percent of time stalled).
        pressure: f64,
        /// How long to wait before trying again.
        retry_after: Duration,
    },
    /// The worker process running the request died (a signal, an abort, the OOM killer, a
    /// forbidden system call); the pool has replaced it. Safe to retry.
    #[error("the worker running the request was lost: {reason}")]
    WorkerLost {
        /// How the worker ended.
        reason: String,
    },
    /// A host-side failure that is not the guest's doing (a bug, or the OS refusing resources).
    #[error("internal error: {0}")]
    Internal(String),
}

fn stderr_suffix(stderr: &str) -> String {
    let tail = stderr.trim();
    if tail.is_empty() {
        String::new()
    } else {
        format!("\nguest stderr:\n{tail}")
    }
}

/// A stable machine name for every failure: what scripts, the JSON report and the HTTP status
/// mapping match on. The names never change meaning; new kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// [`LimitExceeded::Fuel`].
    Fuel,
    /// [`LimitExceeded::Memory`].
    Memory,
    /// [`LimitExceeded::Table`].
    Table,
    /// [`LimitExceeded::Handles`].
    Handles,
    /// [`LimitExceeded::WallTime`].
    WallTime,
    /// [`LimitExceeded::Input`] and [`LimitExceeded::Batch`].
    Input,
    /// [`LimitExceeded::Output`].
    Output,
    /// [`LimitExceeded::DeviceMemory`].
    DeviceMemory,
    /// [`Error::Trap`].
    Trap,
    /// [`Error::Model`].
    Model,
    /// [`Error::InvalidModel`] and [`Error::Io`] (the model file).
    InvalidModel,
    /// [`Error::InputRead`].
    InputRead,
    /// [`Error::Config`]: a request this runtime cannot serve as configured.
    Usage,
    /// [`Error::Overloaded`]: retry later.
    Overloaded,
    /// [`Error::WorkerLost`]: retry.
    WorkerLost,
    /// [`Error::Internal`].
    Internal,
}

impl ErrorKind {
    /// Every kind, for tables that must cover them all.
    pub const ALL: [ErrorKind; 16] = [
        Self::Fuel,
        Self::Memory,
        Self::Table,
        Self::Handles,
        Self::WallTime,
        Self::Input,
        Self::Output,
        Self::DeviceMemory,
        Self::Trap,
        Self::Model,
        Self::InvalidModel,
        Self::InputRead,
        Self::Usage,
        Self::Overloaded,
        Self::WorkerLost,
        Self::Internal,
    ];

    /// The machine name (`"wall_time"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fuel => "fuel",
            Self::Memory => "memory",
            Self::Table => "table",
            Self::Handles => "handles",
            Self::WallTime => "wall_time",
            Self::Input => "input",
            Self::Output => "output",
            Self::DeviceMemory => "device_memory",
            Self::Trap => "trap",
            Self::Model => "model",
            Self::InvalidModel => "invalid_model",
            Self::InputRead => "input_read",
            Self::Usage => "usage",
            Self::Overloaded => "overloaded",
            Self::WorkerLost => "worker_lost",
            Self::Internal => "internal",
        }
    }

    /// Whether the failure is the caller's limits being too tight for the request (raising
    /// the named limit may help), as opposed to the model or input being at fault.
    pub fn is_limit(self) -> bool {
        matches!(
            self,
            Self::Fuel
                | Self::Memory
                | Self::Table
                | Self::Handles
                | Self::WallTime
                | Self::Input
                | Self::Output
                | Self::DeviceMemory
        )
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LimitExceeded {
    /// This limit's [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fuel { .. } => ErrorKind::Fuel,
            Self::Memory { .. } => ErrorKind::Memory,
            Self::Table { .. } => ErrorKind::Table,
            Self::Handles { .. } => ErrorKind::Handles,
            Self::DeviceMemory { .. } => ErrorKind::DeviceMemory,
            Self::WallTime { .. } => ErrorKind::WallTime,
            Self::Input { .. } | Self::Batch { .. } => ErrorKind::Input,
            Self::Output { .. } => ErrorKind::Output,
            Self::Predicted { resource, .. } => match resource {
                PredictedLimit::Fuel => ErrorKind::Fuel,
                PredictedLimit::Memory => ErrorKind::Memory,
            },
        }
    }
}

impl Error {
    /// The stable machine name of this failure. A failed initialisation has the kind of what
    /// made it fail.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Limit(limit) => limit.kind(),
            Self::InvalidModel(_) | Self::Io { .. } => ErrorKind::InvalidModel,
            Self::Init(inner) => inner.kind(),
            Self::Trap { .. } => ErrorKind::Trap,
            Self::Model { .. } => ErrorKind::Model,
            Self::InputRead(_) => ErrorKind::InputRead,
            Self::Config(_) => ErrorKind::Usage,
            Self::Overloaded { .. } => ErrorKind::Overloaded,
            Self::WorkerLost { .. } => ErrorKind::WorkerLost,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The limit this error reports, if it is a limit trip.
    pub fn limit(&self) -> Option<&LimitExceeded> {
        match self {
            Self::Limit(limit) => Some(limit),
            Self::Init(inner) => inner.limit(),
            _ => None,
        }
    }
}

/// A failed run: the error and the resources the run used before it ended. Displays as the
/// error alone, and its source is the error's own source, so an error chain prints each
/// message once.
#[derive(Debug)]
pub struct RunError {
    /// What went wrong.
    pub error: Error,
    /// What the run used up to the failure (boxed to keep `Result`s small).
    pub usage: Box<Usage>,
}

impl RunError {
    pub(crate) fn new(error: impl Into<Error>, usage: Usage) -> Self {
        Self {
            error: error.into(),
            usage: Box::new(usage),
        }
    }

    /// The error's [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        self.error.kind()
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<RunError> for Error {
    fn from(e: RunError) -> Self {
        e.error
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_error_prints_its_message_once_in_a_chain() {
        let failure = RunError::new(
            Error::Io {
                path: "model.wasm".into(),
                error: std::io::Error::other("gone"),
            },
            Usage::default(),
        );
        let chain = format!("{:#}", anyhow::Error::new(failure));
        assert_eq!(chain, "model.wasm: gone");
        let failure = RunError::new(
            LimitExceeded::Batch { limit: 2, items: 3 },
            Usage::default(),
        );
        let chain = format!("{:#}", anyhow::Error::new(failure));
        assert_eq!(
            chain,
            "batch of 3 items exceeds the batch limit of 2 (raise --max-batch)"
        );
    }

    #[test]
    fn kinds_have_distinct_stable_names() {
        let names: std::collections::HashSet<_> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        for kind in ErrorKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind.as_str().into())
            );
        }
        assert_eq!(
            Error::Init(Box::new(
                LimitExceeded::Fuel {
                    limit: 1,
                    consumed: 2
                }
                .into()
            ))
            .kind(),
            ErrorKind::Fuel
        );
    }

    #[test]
    fn an_output_lower_bound_says_at_least() {
        let exact = LimitExceeded::Output {
            limit: 1024,
            size: 2048,
            at_least: false,
        };
        assert_eq!(
            exact.to_string(),
            "output of 2.00 KiB exceeds the output limit of 1.00 KiB (raise --max-output)"
        );
        let bound = LimitExceeded::Output {
            limit: 1024,
            size: 2048,
            at_least: true,
        };
        assert!(bound.to_string().starts_with("output of at least 2.00 KiB"));
    }
}
