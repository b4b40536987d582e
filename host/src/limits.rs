//! The limits one run is boxed in by, their defaults, and the fixed caps every run shares.
//!
//! Every field of [`Limits`] is a ceiling on one resource of one run. A run that reaches any of
//! them ends with [`crate::LimitExceeded`] naming the limit and the figures; the host and other
//! runs are unaffected. `Limits` (de)serialises with serde in the same human syntax the CLI
//! takes (`"2GiB"`, `"5s"`, `"10G"` fuel; see [`crate::units`]); sizes and fuel also accept
//! plain numbers, durations never do (they must carry their unit).
//!
//! The fixed caps (`MAX_*`) are not per-run settings: they bound what a component may be made
//! of, and the memory limiter and the pooling allocator both read them from here, so a
//! component that loads on demand also loads pooled.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data::Input;
use crate::error::LimitExceeded;
use crate::units::{format_count, format_size};

/// Default fuel ceiling: none. Fuel is always *metered* (the usage report gives the exact figure),
/// but only capped when asked; the wall-time default still bounds a runaway guest.
pub const DEFAULT_FUEL: Option<u64> = None;
/// Default linear-memory ceiling: 1 GiB. all-MiniLM-L6-v2 needs about 210 MiB (embedded
/// weights plus their tensor copy plus activations); 1 GiB leaves room for long batches while
/// keeping a handful of concurrent runs within a small server's RAM.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
/// Default wall-time ceiling: 30 s. A fresh MiniLM run takes well under a second here; a guest
/// that runs this long is looping.
pub const DEFAULT_WALL_TIME: Duration = Duration::from_secs(30);
/// Default input ceiling: 1 MiB of input payload, far above any sensible embedding batch.
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 1 << 20;
/// Default batch ceiling: 1,024 items. A batch's cost grows with its item count even when the
/// items are empty (each is a model call in the guest), so the count is capped apart from the
/// bytes; 1,024 is several times what an embedding client sends in one request.
pub const DEFAULT_MAX_BATCH: u64 = 1_024;
/// Default output ceiling: 16 MiB of output payload (about 10,000 384-dimension embeddings).
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 16 << 20;
/// Default device-memory (VRAM) budget of one run on the accelerator path: 512 MiB.
pub const DEFAULT_DEVICE_MEMORY_BYTES: u64 = 512 << 20;
/// How much of what the guest writes to its stdout and stderr the host keeps, each: 64 KiB.
/// Guest output is captured for diagnostics, never passed through; bytes beyond this are
/// counted (in the usage report) and discarded, and the guest's writes still succeed.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 10;
pub use crate::data::BATCH_ITEM_OVERHEAD_BYTES;
/// Most bytes a model's `info` may make the host copy (its strings and list together): 64 KiB.
/// The host keeps the info for the model's lifetime, so it is bounded like any guest output;
/// a larger one fails the load with [`InvalidModel::InfoTooLarge`](crate::InvalidModel).
pub const MAX_INFO_BYTES: u64 = 64 << 10;
/// Host-side resources (accelerator tensors, WASI streams and pollables) a run may hold at
/// once: 10,000. Each costs the host a table slot and the resource itself; MiniLM holds under
/// a hundred. Past it: [`LimitExceeded::Handles`].
pub const MAX_HANDLES: u64 = 10_000;
/// Table elements a guest may have in total: 100,000 (each costs the host a pointer). Real
/// components use a few hundred.
pub const MAX_TABLE_ELEMENTS: u64 = 100_000;
/// Core instances a component may create. Components built by `wasm-component-ld` use fewer
/// than ten (the program, the WASI adapter shims, the fix-up modules).
pub const MAX_CORE_INSTANCES: u32 = 20;
/// Linear memories a component may define (its core instances together); real ones have one.
pub const MAX_MEMORIES: u32 = 4;
/// Tables a component may define (its core instances together); real ones have two or three.
pub const MAX_TABLES: u32 = 8;

/// The ceilings for one run. `Limits::default()` is safe for untrusted models and inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Compute cap in fuel units (about one per wasm instruction). `None`: unlimited, still
    /// metered. Deterministic: the same model and input consume the same fuel on every run and
    /// machine, so a cap that passes in CI passes in production. Exceeded:
    /// [`LimitExceeded::Fuel`]. Default: [`DEFAULT_FUEL`].
    #[serde(with = "crate::units::serde::fuel")]
    pub fuel: Option<u64>,
    /// Total linear memory of all the guest's memories, in bytes (the weights it embeds count).
    /// A growth past it is refused; the run then fails with [`LimitExceeded::Memory`] unless
    /// the guest carries on after the refusal (see [`crate::Error`]'s attribution rule).
    /// Default: [`DEFAULT_MEMORY_BYTES`].
    #[serde(with = "crate::units::serde::size")]
    pub memory: u64,
    /// Wall-clock time for the whole run, instantiation included. Enforced by epoch
    /// interruption, so a run ends within one ticker interval after it; not deterministic
    /// (use fuel for that). Exceeded: [`LimitExceeded::WallTime`]. Default:
    /// [`DEFAULT_WALL_TIME`].
    #[serde(with = "crate::units::serde::duration")]
    pub wall_time: Duration,
    /// Input size in bytes: the UTF-8 bytes of all texts plus
    /// [`BATCH_ITEM_OVERHEAD_BYTES`] per batch item, checked before any guest work. Exceeded:
    /// [`LimitExceeded::Input`]. Default: [`DEFAULT_MAX_INPUT_BYTES`].
    #[serde(with = "crate::units::serde::size")]
    pub max_input: u64,
    /// Items in a batch input, checked before any guest work. Exceeded:
    /// [`LimitExceeded::Batch`]. Default: [`DEFAULT_MAX_BATCH`].
    #[serde(with = "crate::units::serde::count")]
    pub max_batch: u64,
    /// Output payload in bytes (4 per embedding value), checked before anything is returned.
    /// Exceeded: [`LimitExceeded::Output`]. Default: [`DEFAULT_MAX_OUTPUT_BYTES`].
    #[serde(with = "crate::units::serde::size")]
    pub max_output: u64,
    /// Device memory (VRAM, or host RAM on the CPU backend) the run may hold on the
    /// accelerator path at once, in bytes; also bounded by the runtime's host-wide budget. An
    /// allocation past either is refused with `budget-exceeded` before anything is allocated;
    /// a run that then fails reports [`LimitExceeded::DeviceMemory`]. Default:
    /// [`DEFAULT_DEVICE_MEMORY_BYTES`].
    #[serde(with = "crate::units::serde::size")]
    pub device_memory: u64,
    /// Whether the run sees the runtime's accelerator ([`DeviceAccess::Offered`], the default)
    /// or not ([`DeviceAccess::Hidden`]: `accel::info` answers kind `none` with no budget, and
    /// every device call `unsupported`, for this run only). Serialised as `"offered"` or
    /// `"hidden"`, and left out when offered, so that it crosses to a worker process and every
    /// existing serialised form is unchanged.
    #[serde(default, skip_serializing_if = "DeviceAccess::is_offered")]
    pub device: DeviceAccess,
}

/// Whether a run is offered the runtime's accelerator (see [`Limits::device`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceAccess {
    /// The run sees the runtime's device (which may itself be none).
    #[default]
    Offered,
    /// The run sees no device: a guest with an in-sandbox path takes it.
    Hidden,
}

impl DeviceAccess {
    pub fn is_offered(&self) -> bool {
        *self == DeviceAccess::Offered
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: DEFAULT_FUEL,
            memory: DEFAULT_MEMORY_BYTES,
            wall_time: DEFAULT_WALL_TIME,
            max_input: DEFAULT_MAX_INPUT_BYTES,
            max_batch: DEFAULT_MAX_BATCH,
            max_output: DEFAULT_MAX_OUTPUT_BYTES,
            device_memory: DEFAULT_DEVICE_MEMORY_BYTES,
            device: DeviceAccess::Offered,
        }
    }
}

impl Limits {
    /// Hides the accelerator from the run (see [`Limits::device`]).
    pub fn hide_device(mut self) -> Self {
        self.device = DeviceAccess::Hidden;
        self
    }

    /// Sets the fuel cap.
    pub fn fuel(mut self, fuel: u64) -> Self {
        self.fuel = Some(fuel);
        self
    }
    /// Sets the linear-memory ceiling in bytes.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }
    /// Sets the wall-time ceiling.
    pub fn wall_time(mut self, wall_time: Duration) -> Self {
        self.wall_time = wall_time;
        self
    }
    /// Sets the input ceiling in bytes.
    pub fn max_input(mut self, bytes: u64) -> Self {
        self.max_input = bytes;
        self
    }
    /// Sets the batch ceiling in items.
    pub fn max_batch(mut self, items: u64) -> Self {
        self.max_batch = items;
        self
    }
    /// Sets the output ceiling in bytes.
    pub fn max_output(mut self, bytes: u64) -> Self {
        self.max_output = bytes;
        self
    }
    /// Sets the device-memory budget in bytes.
    pub fn device_memory(mut self, bytes: u64) -> Self {
        self.device_memory = bytes;
        self
    }

    /// Checks `input` against the batch and input ceilings (batch first: counting is cheaper
    /// than summing, and it names the real problem of a flood of tiny items).
    pub fn check_input(&self, input: &Input) -> Result<(), LimitExceeded> {
        if let Input::Texts(texts) = input {
            let items = texts.len() as u64;
            if items > self.max_batch {
                return Err(LimitExceeded::Batch {
                    limit: self.max_batch,
                    items,
                });
            }
        }
        let size = input.payload_bytes();
        if size > self.max_input {
            return Err(LimitExceeded::Input {
                limit: self.max_input,
                size,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fuel = self
            .fuel
            .map_or_else(|| "unlimited".to_string(), format_count);
        write!(
            f,
            "fuel {fuel}, memory {}, wall time {}, input {} in at most {} items, output {}, \
             device memory {}",
            format_size(self.memory),
            humantime::format_duration(self.wall_time),
            format_size(self.max_input),
            format_count(self.max_batch),
            format_size(self.max_output),
            format_size(self.device_memory),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_access_is_left_out_when_offered_and_round_trips_when_hidden() {
        let offered = serde_json::to_value(Limits::default()).unwrap();
        assert!(offered.get("device").is_none(), "{offered}");
        let hidden = Limits::default().hide_device();
        let json = serde_json::to_value(&hidden).unwrap();
        assert_eq!(json["device"], "hidden");
        assert_eq!(serde_json::from_value::<Limits>(json).unwrap(), hidden);
        assert!(serde_json::from_str::<Limits>(r#"{"device":"gpu"}"#).is_err());
    }

    #[test]
    fn limits_deserialise_from_human_strings_and_numbers() {
        let limits: Limits = serde_json::from_str(
            r#"{"fuel":"2G","memory":"512MiB","wall_time":"2s","max_batch":"1_000"}"#,
        )
        .unwrap();
        assert_eq!(limits.fuel, Some(2_000_000_000));
        assert_eq!(limits.memory, 512 << 20);
        assert_eq!(limits.wall_time, Duration::from_secs(2));
        assert_eq!(limits.max_batch, 1000);
        assert_eq!(limits.max_input, DEFAULT_MAX_INPUT_BYTES);
        let limits: Limits =
            serde_json::from_str(r#"{"fuel":1000,"memory":65536,"wall_time":"1500ms"}"#).unwrap();
        assert_eq!(
            limits,
            Limits::default()
                .fuel(1000)
                .memory(65536)
                .wall_time(Duration::from_millis(1500))
        );
        let round_trip: Limits =
            serde_json::from_str(&serde_json::to_string(&limits).unwrap()).unwrap();
        assert_eq!(round_trip, limits);
        assert!(serde_json::from_str::<Limits>(r#"{"memry":"1G"}"#).is_err());
    }

    #[test]
    fn a_bare_number_is_not_a_wall_time() {
        let error = serde_json::from_str::<Limits>(r#"{"wall_time":1500}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs a unit"), "{error}");
    }

    #[test]
    fn batches_are_capped_by_items_before_bytes() {
        let limits = Limits::default().max_batch(2).max_input(100);
        let batch = |n: usize| Input::Texts(vec![String::new(); n]);
        assert_eq!(limits.check_input(&batch(2)), Ok(()));
        assert_eq!(
            limits.check_input(&batch(3)),
            Err(LimitExceeded::Batch { limit: 2, items: 3 })
        );
        // Empty items still cost their ABI overhead.
        let limits = Limits::default().max_batch(1_000_000).max_input(80);
        assert_eq!(limits.check_input(&batch(10)), Ok(()));
        assert_eq!(
            limits.check_input(&batch(11)),
            Err(LimitExceeded::Input {
                limit: 80,
                size: 88
            })
        );
    }
}
