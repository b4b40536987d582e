//! What can go wrong, as types: one enum for every failure, one variant per limit.
//!
//! Failures are classified from what the host observed (the trap code wasmtime reports, the
//! refusals the limiter recorded, the deadline the ticker saw), never from message text.

use std::time::Duration;

use crate::limits::{format_count, format_size};
use crate::usage::Usage;

/// A run hit one of its [`Limits`](crate::Limits). Every variant carries the limit and the
/// figure that crossed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
        humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64))
    )]
    WallTime {
        /// The ceiling.
        limit: Duration,
        /// Time from the start of the run to the moment it was stopped.
        elapsed: Duration,
    },
    /// The input payload is larger than allowed; refused before any guest work.
    #[error(
        "input of {} exceeds the input limit of {} (raise --max-input)",
        format_size(*size),
        format_size(*limit)
    )]
    Input {
        /// The ceiling, in bytes.
        limit: u64,
        /// The input's payload size, in bytes.
        size: u64,
    },
    /// The guest returned more output than allowed; nothing of it is returned. When the output
    /// was so large that the host stopped copying it out of the sandbox (it never holds more
    /// than about `limit` + 1 MiB of a guest's output), `size` is a lower bound.
    #[error(
        "output of {} exceeds the output limit of {} (raise --max-output)",
        format_size(*size),
        format_size(*limit)
    )]
    Output {
        /// The ceiling, in bytes.
        limit: u64,
        /// The output's payload size, in bytes.
        size: u64,
    },
}

/// Why a file cannot be used as a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// The component does not export the `wasm-infer:model` world's `info` and `infer`.
    #[error("component does not implement the wasm-infer:model/model world: {0}")]
    WrongWorld(String),
    /// The component imports something the host does not provide.
    #[error("component imports something wasm-infer does not provide: {0}")]
    UnsupportedImport(String),
    /// A snapshot made by another wasm-infer format, wasmtime version or engine configuration.
    #[error("snapshot does not match this runtime: {0}")]
    SnapshotMismatch(String),
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
    /// Reading a model or writing the cache failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
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

impl Error {
    /// The limit this error reports, if it is a limit trip.
    pub fn limit(&self) -> Option<&LimitExceeded> {
        match self {
            Self::Limit(limit) => Some(limit),
            Self::Init(inner) => inner.limit(),
            _ => None,
        }
    }
}

/// A failed run: the error and the resources the run used before it ended.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct RunError {
    /// What went wrong.
    #[source]
    pub error: Error,
    /// What the run used up to the failure (boxed to keep `Result`s small).
    pub usage: Box<Usage>,
}

impl From<RunError> for Error {
    fn from(e: RunError) -> Self {
        e.error
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
