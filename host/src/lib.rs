//! wasm-infer: run machine-learning inference in a WebAssembly sandbox, boxed in by fuel,
//! memory and wall-time limits, with usage reported for every run.
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

pub mod accel;
mod bindings;
mod cache;
mod data;
mod error;
pub mod limits;
mod model;
mod runtime;
mod sandbox;
pub mod snapshot;
mod usage;

pub use accel::{AccelMode, DeviceUsage};
pub use data::{DataKind, Input, ModelInfo, Output};
pub use error::{Error, InvalidModel, LimitExceeded, ModelErrorCode, Result, RunError};
pub use limits::Limits;
pub use model::{CodeSource, LoadOptions, LoadReport, Model, Outcome, Preinit, PreinitSource};
pub use runtime::{Runtime, RuntimeConfig, DEFAULT_EPOCH_TICK, DEFAULT_HOST_DEVICE_MEMORY};
pub use usage::Usage;
pub use wasmtime::Trap;
