//! wasm-infer: run machine-learning inference in a WebAssembly sandbox, boxed in by fuel,
//! memory, wall-time and device-memory limits, with usage reported for every run.
//!
//! ```no_run
//! use wasm_infer::{Input, Limits, Model, Runtime};
//!
//! let runtime = Runtime::new()?;
//! let model = Model::load(&runtime, "minilm.wasm")?;
//! let limits = Limits::default().fuel(2_000_000_000).memory(512 << 20);
//! let outcome = model.run(Input::Text("hello".into()), &limits)?;
//! println!("{} dims, {}", outcome.output.embeddings().unwrap()[0].len(), outcome.usage);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules, one job each (docs/architecture.md has the map): `runtime` (engine,
//! settings, ticker, slots), `model` (the load pipeline), `run` (the one run-under-limits
//! sequence), `store` (a run's state and budgets), `limiter`, `wasi`, `attribution`,
//! `component` (static checks), `snapshot`, `cache`, `accel`, `data`, `error`, `usage`,
//! `limits`, `units`, `profile` (calibration and admission by prediction), `testing`
//! (usage pinned in a user's CI).

pub mod accel;
mod attribution;
mod bindings;
pub mod cache;
pub mod cgroup;
mod component;
mod data;
mod error;
pub mod generate;
mod generator;
pub mod isolate;
mod limiter;
pub mod limits;
mod model;
pub mod pressure;
pub mod profile;
mod run;
mod runtime;
#[cfg(feature = "serve")]
pub mod serve;
mod sink;
pub mod snapshot;
mod store;
pub mod testing;
pub mod units;
mod usage;
mod wasi;
mod wire;
pub mod worker;

pub use accel::{AccelMode, DeviceUsage};
pub use data::{DataKind, Input, ModelInfo, Output};
pub use error::{
    ComponentPart, Error, ErrorKind, InvalidModel, LimitExceeded, ModelErrorCode, PredictedLimit,
    Result, RunError,
};
pub use generate::{
    FinishReason, GenerateRequest, Generated, Generation, GenerationError, GeneratorInfo, Message,
    Prompt, TokenFuel,
};
pub use limits::{DeviceAccess, Limits};
pub use model::{
    CodeSource, LoadOptions, LoadPhase, LoadReport, Model, Outcome, Preinit, PreinitSource,
    Progress,
};
pub use profile::Profile;
pub use runtime::{
    CpuFeatures, EngineFingerprint, EngineSettings, Runtime, RuntimeConfig,
    DEFAULT_CACHE_MAX_BYTES, DEFAULT_EPOCH_TICK, DEFAULT_HOST_DEVICE_MEMORY,
    DEFAULT_NAN_CANONICALIZATION,
};
pub use usage::Usage;
pub use wasi::cost as wasi_cost;
pub use wasi::{MAX_RANDOM_BYTES_PER_CALL, MAX_STREAM_BYTES_PER_CALL};
pub use wasmtime::Trap;
