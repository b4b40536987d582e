//! The accelerator path: the `wasm-infer:model/accel` imports, backed by host candle.
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
//! Weights are uploaded by each run, like activations: runs share nothing on the device, so a
//! hostile run cannot touch another's tensors, and the budget and fuel of a run do not depend
//! on what ran before it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime::{StoreContextMut, Trap};

use crate::bindings::wasm_infer::model::accel::{
    AccelError, BudgetRefusal, DeviceInfo, DeviceKind,
};
use crate::sandbox::RunState;

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

/// The fuel cost model of accel calls (all deterministic functions of the shapes):
pub mod cost {
    /// Every call.
    pub const CALL: u64 = 1_000;
    /// Per byte copied between the sandbox and the device (upload, download): one per 16.
    pub const BYTES_PER_FUEL: u64 = 16;
    /// Per multiply-accumulate of a matrix product: one per 8.
    pub const MACS_PER_FUEL: u64 = 8;
    /// Per element of an element-wise operation (bias add, GELU): one each.
    pub const PER_ELEMENT: u64 = 1;
}

/// Largest matrix product one call may ask for, in multiply-accumulates (2^33, a few seconds of
/// CPU): bounds how long a single call can hold the thread past the run's deadline.
pub const MAX_OP_MACS: u64 = 1 << 33;
/// Largest tensor one call may create, in elements (2^31: 8 GiB of f32).
pub const MAX_ELEMENTS: u64 = 1 << 31;

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
    fn reserve(&self, bytes: u64) -> Result<(), BudgetRefusal> {
        let mut used = self.used.load(Ordering::SeqCst);
        loop {
            let total = used.saturating_add(bytes);
            if total > self.limit {
                return Err(BudgetRefusal {
                    requested: bytes,
                    used,
                    budget: self.limit,
                });
            }
            match self
                .used
                .compare_exchange_weak(used, total, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.peak.fetch_max(total, Ordering::SeqCst);
                    return Ok(());
                }
                Err(actual) => used = actual,
            }
        }
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// The host-wide device-memory figures of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceUsage {
    /// Bytes held by all runs now.
    pub used: u64,
    /// Highest `used` since the runtime was created.
    pub peak: u64,
    /// The host-wide budget.
    pub limit: u64,
}

/// The device a runtime offers, and its host-wide account.
pub(crate) struct Accel {
    device: Option<Device>,
    kind: DeviceKind,
    name: String,
    pool: DevicePool,
}

impl Accel {
    pub(crate) fn new(mode: AccelMode, host_budget: u64) -> Result<Self, String> {
        let cpu = || (Some(Device::Cpu), DeviceKind::Cpu, cpu_name());
        let (device, kind, name) = match mode {
            AccelMode::Off => (None, DeviceKind::None, "none".to_string()),
            AccelMode::Cpu => cpu(),
            AccelMode::Cuda => cuda()?,
            AccelMode::Auto => cuda().unwrap_or_else(|_| cpu()),
        };
        Ok(Self {
            device,
            kind,
            name,
            pool: DevicePool::new(host_budget),
        })
    }

    pub(crate) fn usage(&self) -> DeviceUsage {
        DeviceUsage {
            used: self.pool.used.load(Ordering::SeqCst),
            peak: self.pool.peak.load(Ordering::SeqCst),
            limit: self.pool.limit,
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

fn cpu_name() -> String {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("host CPU ({threads} threads)")
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<(Option<Device>, DeviceKind, String), String> {
    let device = Device::new_cuda(0).map_err(|e| format!("no CUDA device: {e}"))?;
    Ok((Some(device), DeviceKind::Cuda, "CUDA device 0".to_string()))
}

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

/// One run's device account; returns everything it still holds to the pool when dropped.
pub(crate) struct RunDevice {
    accel: Arc<Accel>,
    budget: u64,
    pub(crate) used: u64,
    pub(crate) peak: u64,
    pub(crate) uploaded: u64,
    pub(crate) downloaded: u64,
    pub(crate) ops: u64,
    pub(crate) refusals: u64,
    /// The first refusal, for classifying a run that then fails.
    pub(crate) refused: Option<BudgetRefusal>,
}

impl RunDevice {
    pub(crate) fn new(accel: Arc<Accel>, budget: u64) -> Self {
        Self {
            accel,
            budget,
            used: 0,
            peak: 0,
            uploaded: 0,
            downloaded: 0,
            ops: 0,
            refusals: 0,
            refused: None,
        }
    }

    /// Charges `bytes` to this run and to the pool, or refuses (nothing charged).
    fn alloc(&mut self, bytes: u64) -> Result<(), AccelError> {
        let refusal = if self.used.saturating_add(bytes) > self.budget {
            Some(BudgetRefusal {
                requested: bytes,
                used: self.used,
                budget: self.budget,
            })
        } else {
            self.accel.pool.reserve(bytes).err()
        };
        if let Some(refusal) = refusal {
            self.refusals += 1;
            self.refused.get_or_insert(refusal);
            return Err(AccelError::BudgetExceeded(refusal));
        }
        if let Some(free) = self.accel.device.as_ref().and_then(device_free_memory) {
            if bytes > free {
                self.accel.pool.release(bytes);
                return Err(AccelError::DeviceFailure(format!(
                    "the device has {free} bytes free, {bytes} requested"
                )));
            }
        }
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        Ok(())
    }

    fn free(&mut self, bytes: u64) {
        self.used -= bytes;
        self.accel.pool.release(bytes);
    }
}

impl Drop for RunDevice {
    fn drop(&mut self) {
        self.accel.pool.release(self.used);
    }
}

/// A guest's tensor on the device.
pub struct DeviceTensor {
    tensor: Tensor,
    bytes: u64,
}

type Store<'a> = StoreContextMut<'a, RunState>;
type Answer<T> = wasmtime::Result<(Result<T, AccelError>,)>;

/// Starts a call: the deadline check, then the fuel (a trap if either is spent).
fn begin(store: &mut Store<'_>, fuel: u64) -> wasmtime::Result<()> {
    let state = store.data_mut();
    let elapsed = state.started.elapsed();
    if elapsed >= state.wall_limit {
        state.timed_out = Some(elapsed);
        return Err(Trap::Interrupt.into());
    }
    state.device.ops += 1;
    charge(store, cost::CALL.saturating_add(fuel))
}

/// Takes `cost` fuel from the store (a trap when there is not that much left; nothing to do
/// without fuel metering).
fn charge(store: &mut Store<'_>, cost: u64) -> wasmtime::Result<()> {
    if let Ok(left) = store.get_fuel() {
        if cost >= left {
            store.set_fuel(0)?;
            return Err(Trap::OutOfFuel.into());
        }
        store.set_fuel(left - cost)?;
    }
    Ok(())
}

fn device(store: &Store<'_>) -> Result<Device, AccelError> {
    store.data().device.accel.device.clone().ok_or_else(|| {
        AccelError::Unsupported("the host offers no accelerator (--accel off)".into())
    })
}

fn invalid(message: impl Into<String>) -> AccelError {
    AccelError::InvalidArgument(message.into())
}

fn failure(e: candle_core::Error) -> AccelError {
    AccelError::DeviceFailure(e.to_string())
}

/// Allocates `elements` f32 on the run's account and stores the tensor `make` builds.
/// Refusals cost only the call's base fuel; `work` fuel is taken once the allocation is
/// granted, before the work runs (running out then traps, and the run's end frees the bytes).
fn create(
    store: &mut Store<'_>,
    elements: u64,
    work: u64,
    make: impl FnOnce() -> Result<Tensor, AccelError>,
) -> wasmtime::Result<Result<Resource<DeviceTensor>, AccelError>> {
    if elements > MAX_ELEMENTS {
        return Ok(Err(invalid(format!(
            "{elements} elements is more than one call may create ({MAX_ELEMENTS})"
        ))));
    }
    let bytes = elements * 4;
    if let Err(e) = store.data_mut().device.alloc(bytes) {
        return Ok(Err(e));
    }
    charge(store, work)?;
    match make() {
        Ok(tensor) => {
            let resource = store
                .data_mut()
                .table
                .push(DeviceTensor { tensor, bytes })?;
            Ok(Ok(resource))
        }
        Err(e) => {
            store.data_mut().device.free(bytes);
            Ok(Err(e))
        }
    }
}

fn tensor<'a>(
    store: &'a Store<'_>,
    handle: &Resource<DeviceTensor>,
) -> wasmtime::Result<&'a Tensor> {
    Ok(&store.data().table.get(handle)?.tensor)
}

/// Defines `wasm-infer:model/accel` in `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    let mut accel = linker.instance("wasm-infer:model/accel@0.1.0")?;
    accel.resource(
        "tensor",
        ResourceType::host::<DeviceTensor>(),
        |mut store, rep| {
            let tensor = store
                .data_mut()
                .table
                .delete(Resource::<DeviceTensor>::new_own(rep))?;
            store.data_mut().device.free(tensor.bytes);
            Ok(())
        },
    )?;

    accel.func_wrap("info", |store: Store<'_>, (): ()| {
        let run = &store.data().device;
        Ok((DeviceInfo {
            kind: run.accel.kind,
            name: run.accel.name.clone(),
            budget: run.budget,
            used: run.used,
        },))
    })?;

    accel.func_wrap(
        "upload",
        |mut store: Store<'_>,
         (shape, data): (Vec<u32>, Vec<f32>)|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let device = match device(&store) {
                Ok(device) => device,
                Err(e) => return Ok((Err(e),)),
            };
            let elements: u64 = shape.iter().map(|&d| d as u64).product();
            if elements != data.len() as u64 {
                return Ok((Err(invalid(format!(
                    "shape {shape:?} has {elements} elements, the data {}",
                    data.len()
                ))),));
            }
            let bytes = elements * 4;
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            let created = create(&mut store, elements, bytes / cost::BYTES_PER_FUEL, || {
                Tensor::from_vec(data, dims, &device).map_err(failure)
            })?;
            if created.is_ok() {
                store.data_mut().device.uploaded += bytes;
            }
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "linear",
        |mut store: Store<'_>,
         (x, weight, bias): (
            Resource<DeviceTensor>,
            Resource<DeviceTensor>,
            Option<Resource<DeviceTensor>>,
        )|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let (x, w) = (
                tensor(&store, &x)?.clone(),
                tensor(&store, &weight)?.clone(),
            );
            let b = match &bias {
                Some(b) => Some(tensor(&store, b)?.clone()),
                None => None,
            };
            let (rows, k, n) = match linear_dims(&x, &w, b.as_ref()) {
                Ok(dims) => dims,
                Err(e) => return Ok((Err(e),)),
            };
            let macs = rows.saturating_mul(k).saturating_mul(n);
            if macs > MAX_OP_MACS {
                return Ok((Err(invalid(format!(
                    "{macs} multiply-accumulates is more than one call may do ({MAX_OP_MACS})"
                ))),));
            }
            let elements = rows * n;
            let work = macs / cost::MACS_PER_FUEL + elements * cost::PER_ELEMENT;
            let mut out_dims = x.dims().to_vec();
            *out_dims.last_mut().unwrap() = n as usize;
            let created = create(&mut store, elements, work, || {
                let x2 = x.reshape((rows as usize, k as usize)).map_err(failure)?;
                let mut y = x2.matmul(&w.t().map_err(failure)?).map_err(failure)?;
                if let Some(b) = &b {
                    y = y.broadcast_add(b).map_err(failure)?;
                }
                y.reshape(out_dims).map_err(failure)
            })?;
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "gelu",
        |mut store: Store<'_>, (x,): (Resource<DeviceTensor>,)| -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let x = tensor(&store, &x)?.clone();
            let elements = x.elem_count() as u64;
            let work = elements * cost::PER_ELEMENT;
            let created = create(&mut store, elements, work, || x.gelu_erf().map_err(failure))?;
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "[method]tensor.shape",
        |mut store: Store<'_>, (this,): (Resource<DeviceTensor>,)| {
            begin(&mut store, 0)?;
            let dims: Vec<u32> = tensor(&store, &this)?
                .dims()
                .iter()
                .map(|&d| d as u32)
                .collect();
            Ok((dims,))
        },
    )?;

    accel.func_wrap(
        "[method]tensor.download",
        |mut store: Store<'_>, (this,): (Resource<DeviceTensor>,)| -> Answer<Vec<f32>> {
            let t = tensor(&store, &this)?.clone();
            let bytes = t.elem_count() as u64 * 4;
            begin(&mut store, bytes / cost::BYTES_PER_FUEL)?;
            store.data_mut().device.downloaded += bytes;
            let values = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(failure);
            Ok((values,))
        },
    )?;
    Ok(())
}

/// `(rows, k, n)` of `x · wᵀ + b`, or why the shapes do not fit.
fn linear_dims(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(u64, u64, u64), AccelError> {
    let k = *x
        .dims()
        .last()
        .ok_or_else(|| invalid("x must have at least one dimension"))?;
    let (n, wk) = w
        .dims2()
        .map_err(|_| invalid(format!("weight must be [n, k], got {:?}", w.dims())))?;
    if wk != k {
        return Err(invalid(format!(
            "x is [..., {k}] but weight is [{n}, {wk}]"
        )));
    }
    if let Some(b) = b {
        if b.dims() != [n] {
            return Err(invalid(format!("bias must be [{n}], got {:?}", b.dims())));
        }
    }
    let rows = x.elem_count() / k.max(1);
    Ok((rows as u64, k as u64, n as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

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
