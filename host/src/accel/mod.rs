//! The accelerator path: the `wasm-infer:model/accel` imports, backed by host candle.
//!
//! `mod.rs` holds the device and the host-wide account, [`account`] a run's account,
//! [`host`] the imports and their cost model.
//!
//! A guest offloads tensor work through WIT calls; the host executes it on its device (the CPU,
//! multi-threaded, always; CUDA with the `cuda` feature) under three controls:
//!
//! - **device memory**: every allocation is charged to the run's budget
//!   ([`Limits::device_memory`](crate::Limits::device_memory)) and to the runtime's host-wide
//!   budget ([`RuntimeConfig::device_memory`](crate::RuntimeConfig::device_memory)), and is
//!   refused *before* anything is allocated if either would be exceeded. A run's tensors are
//!   freed when the guest drops them and, unconditionally, when its store is dropped (every run
//!   ending: success, trap, fuel, timeout), because [`RunDevice`] returns its bytes on drop.
//! - **fuel**: each call costs fuel by a fixed cost model ([`cost`]), taken from the store's
//!   fuel before the work runs, so `--fuel` stays a deterministic cap on all the run's compute;
//! - **wall time**: each call checks the run's deadline first, and one operation's work is
//!   capped ([`MAX_OP_MACS`]), so a call cannot run long past the deadline.
//!
//! Read-only weights can be made **resident** ([`resident`]): uploaded once, shared by every
//! run of the loaded models that bind them, one physical copy per content digest for the whole
//! runtime, freed when the last model holding it is dropped. A run is charged for a resident
//! weight by rule (the fuel and run budget of uploading it), so its figures never depend on
//! what ran before it; activations are per run, and a run reaches no other run's tensors. The
//! model that binds a weight pays for it from its own resident budget, apart from the
//! host-wide budget runs draw on, so one model's weights never make another's runs fall back.

mod account;
mod host;
mod resident;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};

use candle_core::{DType, Device, Tensor};

use crate::bindings::wasm_infer::model::accel::{AccelError, BudgetRefusal, DeviceKind};

pub(crate) use account::RunDevice;
pub(crate) use host::{add_to_linker, charge, AccelState};
pub use host::{
    copy_slices, cost, gelu_slices, linear_grid, linear_slice_macs, linear_slices, norm_slices,
    scratch, DeviceTensor, ATTENTION_SLICE_MACS, COPY_SLICE_ELEMENTS, GELU_SLICE_ELEMENTS,
    LINEAR_MAX_SLICE_MACS, LINEAR_MIN_SLICE_ROWS, LINEAR_SLICE_MACS, MAX_ELEMENTS, MAX_OP_MACS,
    MAX_RANK, NORM_SLICE_ELEMENTS,
};
pub(crate) use resident::ModelWeights;
use resident::Resident;
pub use resident::{DEFAULT_RESIDENT_MEMORY, MAX_RESIDENTS, MAX_RESIDENT_NAME_BYTES};

/// What a guest is told when the device itself fails: a fixed sentence. The details (candle's
/// message, and with `RUST_BACKTRACE` set a host backtrace naming host files) go to the host's
/// log, never into the sandbox.
pub const DEVICE_FAILURE_MESSAGE: &str = "the device operation failed (details in the host log)";

/// A device failure as the guest sees it (logged here, in the one place both the operations
/// and the resident weights report through).
fn failure(e: candle_core::Error) -> AccelError {
    tracing::warn!(error = %e, "accelerator operation failed");
    AccelError::DeviceFailure(DEVICE_FAILURE_MESSAGE.to_string())
}

/// Which device a runtime offers to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccelMode {
    /// CUDA when built with the `cuda` feature and a GPU is present, else the CPU.
    #[default]
    Auto,
    /// The host CPU.
    Cpu,
    /// CUDA device 0 (needs the `cuda` feature).
    Cuda,
    /// No device: `info` reports `none` and every operation is `unsupported`.
    Off,
}

/// The host-wide device-memory account, shared by every run of a runtime.
#[derive(Debug)]
pub(crate) struct DevicePool {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl DevicePool {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Takes `bytes` from the pool, or says why not (nothing taken).
    pub(super) fn reserve(&self, bytes: u64) -> Result<(), BudgetRefusal> {
        let taken = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                Some(used.saturating_add(bytes)).filter(|total| *total <= self.limit)
            });
        match taken {
            Ok(used) => {
                self.peak
                    .fetch_max(used.saturating_add(bytes), Ordering::SeqCst);
                Ok(())
            }
            Err(used) => Err(BudgetRefusal {
                requested: bytes,
                used,
                budget: self.limit,
            }),
        }
    }

    pub(super) fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// The host-wide device-memory figures of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceUsage {
    /// Bytes held by all runs now (their own tensors, never resident weights).
    pub used: u64,
    /// Highest `used` since the runtime was created.
    pub peak: u64,
    /// The host-wide budget runs draw on.
    pub limit: u64,
    /// Bytes of resident weights held now (one physical copy per content), apart from
    /// `used`: each loaded model pays for its own from its resident budget
    /// ([`LoadOptions::resident_memory`](crate::LoadOptions::resident_memory)).
    pub resident: u64,
    /// Highest `resident` since the runtime was created.
    pub resident_peak: u64,
}

/// The device a runtime offers, and its host-wide account.
pub(crate) struct Accel {
    device: Option<Device>,
    kind: DeviceKind,
    name: String,
    pool: DevicePool,
    /// Every resident weight alive, by the SHA-256 of its shape and data: a second model (or a
    /// run racing the first) that binds the same content shares the copy.
    residents: Mutex<HashMap<[u8; 32], Weak<Resident>>>,
    /// Bytes of the resident weights alive (not in `pool`), and their peak.
    resident_bytes: AtomicU64,
    resident_peak: AtomicU64,
}

impl Accel {
    pub(crate) fn new(mode: AccelMode, host_budget: u64) -> Result<Self, String> {
        let cpu = || (Some(Device::Cpu), DeviceKind::Cpu, cpu_name());
        let (device, kind, name) = match mode {
            AccelMode::Off => (None, DeviceKind::None, "none".to_string()),
            AccelMode::Cpu => cpu(),
            AccelMode::Cuda => cuda()?,
            AccelMode::Auto => cuda().unwrap_or_else(|why| {
                auto_fallback(&why);
                cpu()
            }),
        };
        Ok(Self {
            device,
            kind,
            name,
            pool: DevicePool::new(host_budget),
            residents: Mutex::default(),
            resident_bytes: AtomicU64::new(0),
            resident_peak: AtomicU64::new(0),
        })
    }

    pub(crate) fn usage(&self) -> DeviceUsage {
        DeviceUsage {
            used: self.pool.used.load(Ordering::SeqCst),
            peak: self.pool.peak.load(Ordering::SeqCst),
            limit: self.pool.limit,
            resident: self.resident_bytes.load(Ordering::SeqCst),
            resident_peak: self.resident_peak.load(Ordering::SeqCst),
        }
    }

    /// `(kind, name)` as words, for reports.
    pub(crate) fn describe(&self) -> (&'static str, &str) {
        let kind = match self.kind {
            DeviceKind::None => "none",
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        };
        (kind, &self.name)
    }
}

/// Starts, before a worker locks down, what the CPU backend would otherwise start lazily on
/// first use (its thread pool sizes itself from the machine, which means reading files).
pub(crate) fn warm_up() {
    let _ = std::thread::available_parallelism();
    // The operations the accel imports run, at a size that takes gemm's threaded path.
    let warm = (|| {
        let x = Tensor::ones((128, 384), DType::F32, &Device::Cpu)?;
        let w = Tensor::ones((1536, 384), DType::F32, &Device::Cpu)?;
        let b = Tensor::ones(1536, DType::F32, &Device::Cpu)?;
        let y = x.matmul(&w.t()?)?.broadcast_add(&b)?.gelu_erf()?;
        y.flatten_all()?.to_vec1::<f32>()
    })();
    if let Err(e) = warm {
        tracing::warn!(error = %e, "warming the CPU backend failed");
    }
}

fn cpu_name() -> String {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("host CPU ({threads} threads)")
}

/// CUDA device 0, or what is missing (a configuration error: `--accel cuda` exits 2 with it).
///
/// The driver API is linked, not loaded (candle 0.11.1 builds cudarc with `dynamic-linking`), so
/// a host with no `libcuda.so.1` at all never gets here: the loader refuses the binary before
/// `main`. What this reports is a driver that cannot be used (the CUDA toolkit's stub library,
/// an outdated driver) or no device. The CUDA stack is run under `catch_unwind` all the same,
/// so that a panic in it becomes this error rather than an abort.
#[cfg(feature = "cuda")]
fn cuda() -> Result<(Option<Device>, DeviceKind, String), String> {
    match std::panic::catch_unwind(open_cuda) {
        Ok(opened) => opened,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("CUDA initialisation panicked: {message}"))
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<(Option<Device>, DeviceKind, String), String> {
    use candle_core::cuda::cudarc::driver::result;

    result::init().map_err(|e| driver_problem("initialising the CUDA driver", e))?;
    let count =
        result::device::get_count().map_err(|e| driver_problem("counting CUDA devices", e))?;
    if count < 1 {
        return Err("no CUDA device: the NVIDIA driver reports no GPU".to_string());
    }
    let device =
        Device::new_cuda(0).map_err(|e| format!("CUDA device 0 could not be opened: {e}"))?;
    let name = match &device {
        Device::Cuda(cuda) => {
            let context = cuda.cuda_stream().context().clone();
            let model = context.name().unwrap_or_else(|_| "unknown GPU".to_string());
            let (major, minor) = context.compute_capability().unwrap_or((0, 0));
            let gib = context.total_mem().unwrap_or(0) as f64 / f64::from(1u32 << 30);
            format!("CUDA device 0: {model}, compute capability {major}.{minor}, {gib:.1} GiB")
        }
        _ => "CUDA device 0".to_string(),
    };
    Ok((Some(device), DeviceKind::Cuda, name))
}

/// What a failed driver call means, in words that name what is missing.
#[cfg(feature = "cuda")]
fn driver_problem(doing: &str, e: candle_core::cuda::cudarc::driver::DriverError) -> String {
    use candle_core::cuda::cudarc::driver::sys::CUresult;

    match e.0 {
        CUresult::CUDA_ERROR_STUB_LIBRARY => {
            "no CUDA driver: the libcuda.so.1 found is the CUDA toolkit's stub, not an NVIDIA driver"
                .to_string()
        }
        CUresult::CUDA_ERROR_NO_DEVICE => {
            "no CUDA device: the NVIDIA driver reports no GPU".to_string()
        }
        CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => format!(
            "the NVIDIA driver cannot run this build's CUDA version (it needs a newer driver): \
             {doing} failed with {e}"
        ),
        _ => format!("{doing} failed: {e}"),
    }
}

/// `--accel auto` without a usable CUDA device: one log line, then the CPU.
#[cfg(feature = "cuda")]
fn auto_fallback(why: &str) {
    tracing::warn!("accelerator: CUDA unavailable ({why}); using the CPU backend");
}

/// `--accel auto` in a build without CUDA: the CPU is the only device, nothing to say.
#[cfg(not(feature = "cuda"))]
fn auto_fallback(_why: &str) {}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<(Option<Device>, DeviceKind, String), String> {
    Err("this build has no CUDA support (rebuild with `--features cuda`)".to_string())
}

/// Free memory the device itself reports, where it can (CUDA); `None` on the CPU.
#[cfg(feature = "cuda")]
fn device_free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn device_free_memory(_device: &Device) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_failure_tells_the_guest_a_fixed_sentence() {
        let e = candle_core::Error::Msg("/home/host/src/secret.rs:12 exploded".into());
        assert_eq!(
            failure(e),
            AccelError::DeviceFailure(DEVICE_FAILURE_MESSAGE.into())
        );
    }

    #[test]
    fn the_pool_refuses_past_its_limit_and_tracks_its_peak() {
        let pool = DevicePool::new(100);
        pool.reserve(60).unwrap();
        assert_eq!(
            pool.reserve(41),
            Err(BudgetRefusal {
                requested: 41,
                used: 60,
                budget: 100
            })
        );
        pool.reserve(40).unwrap();
        pool.release(100);
        assert_eq!(pool.used.load(Ordering::SeqCst), 0);
        assert_eq!(pool.peak.load(Ordering::SeqCst), 100);
    }
}
