//! The `wasm-infer:model/accel` imports: each call checks the run's deadline, charges fuel by
//! the cost model below, and allocates only what the run's account granted.
//!
//! The imports are generic over [`AccelState`], what a store must give them, so this module
//! knows nothing of the rest of the store.

use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType, WasmList, WasmStr};
use wasmtime::{StoreContextMut, Trap};

use crate::bindings::wasm_infer::model::accel::{AccelError, DeviceInfo, DeviceKind};
pub use crate::bindings::DeviceTensor;

use super::resident::BindError;
use super::{failure, RunDevice};

/// What a store must give the accel imports.
pub(crate) trait AccelState: Send + 'static {
    /// The run's device account.
    fn device(&mut self) -> &mut RunDevice;
    /// Where the run's tensor handles live.
    fn tensors(&mut self) -> &mut ResourceTable;
    /// Whether the run's wall-time limit has passed (recording it for the run's result).
    fn deadline_passed(&mut self) -> bool;
    /// When the run's wall-time limit passes (for long calls to check as they go).
    fn deadline_at(&mut self) -> std::time::Instant;
}

/// The fuel cost model of accel calls: each a deterministic function of the call's shapes,
/// charged before the work runs. The weights come from `just cost-audit` (README, "Fuel"):
/// per multiply-accumulate, per element read and written, per attention score (each score
/// passes through two products, a scale, a max, an exp, a sum and a division), per row of a
/// layer norm, with a floor per call that covers the backend's fixed cost (thread hand-off,
/// allocations), so that no shape buys much more host CPU per fuel unit than plain wasm.
pub mod cost {
    /// Every call's floor (and all a refused call costs).
    pub const CALL: u64 = 1_000;
    /// Floor of `linear` (a small product still costs ~20 µs: gemm's thread hand-off).
    pub const LINEAR_CALL: u64 = 25_000;
    /// Floor of `attention` (~70 µs for one token: a dozen tensor passes).
    pub const ATTENTION_CALL: u64 = 80_000;
    /// Floor of `layer-norm`.
    pub const LAYER_NORM_CALL: u64 = 25_000;
    /// Per element copied into the device (`upload`).
    pub const UPLOAD_PER_ELEMENT: u64 = 1;
    /// Per element copied out (`download`: converted, flattened, copied into the sandbox).
    pub const DOWNLOAD_PER_ELEMENT: u64 = 2;
    /// `resident` is charged by rule whether or not the weight was bound before (so a run's
    /// figures never depend on what ran before it): one per 16 bytes. A first bind also
    /// hashes the data (the exception in the audit), once per name for the model's lifetime.
    pub const RESIDENT_BYTES_PER_FUEL: u64 = 16;
    /// Multiply-accumulates per fuel unit in a matrix product.
    pub const MACS_PER_FUEL: u64 = 4;
    /// Per element a `linear` reads (x, the weight, the bias).
    pub const LINEAR_PER_INPUT: u64 = 1;
    /// Per element a `linear` writes (the product, then the bias added).
    pub const LINEAR_PER_OUTPUT: u64 = 4;
    /// Per attention score (heads x tokens x tokens).
    pub const ATTENTION_PER_SCORE: u64 = 48;
    /// Per element of q, k and v read and of the output written.
    pub const ATTENTION_PER_ELEMENT: u64 = 4;
    /// Per element of a layer norm (residual add, two statistics passes, normalise, scale).
    pub const NORM_PER_ELEMENT: u64 = 12;
    /// Per row of a layer norm (two reductions and their broadcasts).
    pub const NORM_PER_ROW: u64 = 24;
    /// Per element of a GELU (erf: about 10 ns on the CPU backend).
    pub const GELU_PER_ELEMENT: u64 = 48;

    /// `upload` of `elements` floats.
    pub fn upload(elements: u64) -> u64 {
        CALL.saturating_add(elements.saturating_mul(UPLOAD_PER_ELEMENT))
    }
    /// `tensor.download` of `elements` floats.
    pub fn download(elements: u64) -> u64 {
        CALL.saturating_add(elements.saturating_mul(DOWNLOAD_PER_ELEMENT))
    }
    /// `resident` of `bytes` bytes.
    pub fn resident(bytes: u64) -> u64 {
        CALL.saturating_add(bytes / RESIDENT_BYTES_PER_FUEL)
    }
    /// `linear` of `[rows, k] · [n, k]ᵀ + [n]`.
    pub fn linear(rows: u64, k: u64, n: u64) -> u64 {
        let macs = rows.saturating_mul(k).saturating_mul(n);
        let inputs = rows
            .saturating_mul(k)
            .saturating_add(n.saturating_mul(k))
            .saturating_add(n);
        LINEAR_CALL
            .saturating_add(macs / MACS_PER_FUEL)
            .saturating_add(inputs.saturating_mul(LINEAR_PER_INPUT))
            .saturating_add(rows.saturating_mul(n).saturating_mul(LINEAR_PER_OUTPUT))
    }
    /// `attention` over `[tokens, hidden]` q, k, v in `heads` heads.
    pub fn attention(tokens: u64, hidden: u64, heads: u64) -> u64 {
        // q·kᵀ and probs·v: tokens² x head size per head each.
        let macs = 2u64
            .saturating_mul(tokens)
            .saturating_mul(tokens)
            .saturating_mul(hidden);
        let scores = heads.saturating_mul(tokens).saturating_mul(tokens);
        // q, k, v read, the output written.
        let elements = 4u64.saturating_mul(tokens).saturating_mul(hidden);
        ATTENTION_CALL
            .saturating_add(macs / MACS_PER_FUEL)
            .saturating_add(scores.saturating_mul(ATTENTION_PER_SCORE))
            .saturating_add(elements.saturating_mul(ATTENTION_PER_ELEMENT))
    }
    /// `layer-norm` of `rows` rows of `n`.
    pub fn layer_norm(rows: u64, n: u64) -> u64 {
        LAYER_NORM_CALL
            .saturating_add(rows.saturating_mul(n).saturating_mul(NORM_PER_ELEMENT))
            .saturating_add(rows.saturating_mul(NORM_PER_ROW))
    }
    /// `gelu` of `elements` elements.
    pub fn gelu(elements: u64) -> u64 {
        CALL.saturating_add(elements.saturating_mul(GELU_PER_ELEMENT))
    }
}

/// Device bytes an operation holds *while it runs*, beyond its operands (the guest's, already
/// charged) and its result (charged as the result): charged to the run's account before the
/// work, with the result, and returned when the call ends. Each is the most the op's steps
/// (`multi_head_attention` and `layer_norm` below) hold alive at once, counted tensor by
/// tensor in f32; `tests/accel.rs` checks the peak a run reports against these formulas.
pub mod scratch {
    /// `attention` over `[tokens, hidden]` in `heads` heads: q, k and v split into heads
    /// (3 x tokens·hidden), the raw scores, the scaled scores and the exponentials or the
    /// probabilities (3 x heads·tokens²), the row maxima (heads·tokens) and the weighted sum
    /// before it is put back side by side (tokens·hidden): at the last step, with the result,
    /// `4·tokens·hidden + 3·heads·tokens² + heads·tokens` floats.
    pub fn attention(tokens: u64, hidden: u64, heads: u64) -> u64 {
        let elements = tokens.saturating_mul(hidden);
        let scores = heads.saturating_mul(tokens).saturating_mul(tokens);
        4u64.saturating_mul(elements)
            .saturating_add(3u64.saturating_mul(scores))
            .saturating_add(heads.saturating_mul(tokens))
            .saturating_mul(4)
    }
    /// `layer-norm` of `rows` rows of `n` (with a residual or not): the sum with the residual
    /// (rows·n, only with one), the centred values, the normalised values and their scaled
    /// form (3 x rows·n), and up to four per-row figures alive at once (mean, variance, its sum
    /// with eps, its root): `(3 or 4)·rows·n + 4·rows` floats, a bound on every step.
    pub fn layer_norm(rows: u64, n: u64, residual: bool) -> u64 {
        let elements = rows.saturating_mul(n);
        let copies = if residual { 4u64 } else { 3 };
        copies
            .saturating_mul(elements)
            .saturating_add(4u64.saturating_mul(rows))
            .saturating_mul(4)
    }
    /// `linear` of `rows` rows by `n` outputs in the grid `(row slices, column slices)`
    /// ([`linear_grid`](super::linear_grid)), with a bias or not. In one slice with a bias,
    /// the product before the bias is added (`rows·n` floats) alongside the result; without
    /// one, nothing (the product is the result). In slices, each slice's product and, with a
    /// bias, its sum with the bias, until copied into the result: one or two times
    /// `ceil(rows / row slices)·ceil(n / column slices)` floats.
    pub fn linear(rows: u64, n: u64, (by_rows, by_columns): (u64, u64), bias: bool) -> u64 {
        let copies = u64::from(bias);
        if by_rows * by_columns == 1 {
            return copies
                .saturating_mul(rows)
                .saturating_mul(n)
                .saturating_mul(4);
        }
        let slice = rows
            .div_ceil(by_rows)
            .saturating_mul(n.div_ceil(by_columns));
        (1 + copies).saturating_mul(slice).saturating_mul(4)
    }
    /// `tensor.download` of `elements` floats: the staging copy the values are read into
    /// before they cross into the sandbox (host memory on the CPU backend, the host side of
    /// the device-to-host copy on CUDA).
    /// Copied out in more than one slice ([`copy_slices`](super::copy_slices)), each slice's
    /// values are held too until appended.
    pub fn download(elements: u64) -> u64 {
        let count = super::copy_slices(elements);
        let slice = match count {
            1 => 0,
            _ => elements.div_ceil(count),
        };
        elements.saturating_add(slice).saturating_mul(4)
    }
}

/// Largest matrix product one call may ask for, in multiply-accumulates (2^33, a few seconds of
/// CPU): bounds how long a single call can hold the thread past the run's deadline.
pub const MAX_OP_MACS: u64 = 1 << 33;
/// Largest tensor one call may create, in elements (2^31: 8 GiB of f32).
pub const MAX_ELEMENTS: u64 = 1 << 31;
/// Most multiply-accumulates an `attention` does between two checks of the run's deadline
/// (2^26, about 10-30 ms of one core): a longer one is computed in slices of heads and query
/// rows, and past the deadline it stops at the next slice and the run ends with its wall-time
/// error. MiniLM's attention (12.6 million) is one slice.
pub const ATTENTION_SLICE_MACS: u64 = 1 << 26;
/// Most multiply-accumulates a `linear` does between two checks of the run's deadline (2^26,
/// as [`ATTENTION_SLICE_MACS`]), where its shape allows: a longer one is computed in a grid of
/// slices, of rows of x and of output columns (rows of the weight), each at least
/// [`LINEAR_MIN_SLICE_ROWS`] rows and columns, and so is exact ([`linear_grid`]).
pub const LINEAR_SLICE_MACS: u64 = 1 << 26;
/// Fewest rows of x, and fewest output columns, in one slice of a `linear`: with more than
/// 256 of each (and so more than 64, and more than 256 outputs) every slice takes the same
/// path through the CPU backend's matrix product (gemm) as the whole, which sums each output
/// over k in an order that depends on k alone; with fewer, gemm may take a small-matrix path
/// that sums in another order. So rows are sliced only from 514 rows, columns only from 514
/// columns, and a product under 514 of both is one slice ([`LINEAR_MAX_SLICE_MACS`] bounds it).
pub const LINEAR_MIN_SLICE_ROWS: u64 = 257;
/// Most multiply-accumulates one slice of a `linear` may hold the thread for (2^30, a few
/// hundred ms of one core): the per-call bound past the deadline. A product whose slices
/// cannot be made this small (fewer than 514 rows and columns, or a k so long that slices of
/// 257 by 257 exceed it) is refused before it is charged, as one past [`MAX_OP_MACS`] is.
pub const LINEAR_MAX_SLICE_MACS: u64 = 1 << 30;
/// Most elements a `gelu` computes between two checks of the run's deadline (2^20, about 10
/// ms of one core at the ~10 ns an erf costs).
pub const GELU_SLICE_ELEMENTS: u64 = 1 << 20;
/// Most elements a `layer-norm` normalises between two checks of the run's deadline (2^20);
/// a slice is whole rows, at least one, so a single row longer than this is one slice.
pub const NORM_SLICE_ELEMENTS: u64 = 1 << 20;
/// Most elements an `upload` copies in or a `tensor.download` copies out between two checks
/// of the run's deadline (2^22 floats, 16 MiB: a few ms).
pub const COPY_SLICE_ELEMENTS: u64 = 1 << 22;

/// The grid `linear` of `[rows, k] · [n, k]ᵀ` is computed in: `(row slices, column slices)`.
/// One slice per [`LINEAR_SLICE_MACS`] multiply-accumulates (rounded up) is the aim; rows are
/// sliced first, no more than leaves each slice [`LINEAR_MIN_SLICE_ROWS`] rows, then output
/// columns, as many more as the aim asks and no more than leaves each slice that many columns.
/// Rows and columns are shared out evenly (slice `i` of `c` is `i·len/c` to `(i+1)·len/c`).
pub fn linear_grid(rows: u64, k: u64, n: u64) -> (u64, u64) {
    let macs = rows.saturating_mul(k).saturating_mul(n);
    let aim = macs.div_ceil(LINEAR_SLICE_MACS).max(1);
    let by_rows = aim.min(rows / LINEAR_MIN_SLICE_ROWS).max(1);
    let by_columns = aim.div_ceil(by_rows).min(n / LINEAR_MIN_SLICE_ROWS).max(1);
    (by_rows, by_columns)
}

/// How many slices `linear` of `[rows, k] · [n, k]ᵀ` is computed in ([`linear_grid`]).
pub fn linear_slices(rows: u64, k: u64, n: u64) -> u64 {
    let (by_rows, by_columns) = linear_grid(rows, k, n);
    by_rows * by_columns
}

/// Multiply-accumulates in the largest slice of `linear` of `[rows, k] · [n, k]ᵀ`: what one
/// slice may do past the run's deadline (at most [`LINEAR_MAX_SLICE_MACS`], or refused).
pub fn linear_slice_macs(rows: u64, k: u64, n: u64) -> u64 {
    let (by_rows, by_columns) = linear_grid(rows, k, n);
    rows.div_ceil(by_rows)
        .saturating_mul(n.div_ceil(by_columns))
        .saturating_mul(k)
}

/// How many slices `gelu` of `elements` elements is computed in.
pub fn gelu_slices(elements: u64) -> u64 {
    elements.div_ceil(GELU_SLICE_ELEMENTS).max(1)
}

/// How many slices `layer-norm` of `rows` rows of `n` is computed in (whole rows each).
pub fn norm_slices(rows: u64, n: u64) -> u64 {
    rows.saturating_mul(n)
        .div_ceil(NORM_SLICE_ELEMENTS)
        .min(rows)
        .max(1)
}

/// How many slices an `upload` or `tensor.download` of `elements` floats copies in.
pub fn copy_slices(elements: u64) -> u64 {
    elements.div_ceil(COPY_SLICE_ELEMENTS).max(1)
}

/// Slice `i` of `count` over `total` units: `(start, length)`, lengths differing by one at most.
fn slice_of(total: usize, count: usize, i: usize) -> (usize, usize) {
    let (start, end) = (i * total / count, (i + 1) * total / count);
    (start, end - start)
}

/// Runs `count` slices over `total` units (`run(start, length)`), asking `past` between two
/// of them (not before the first: the call checked the deadline as it began); `None` when it
/// said to stop.
fn in_slices(
    total: usize,
    count: usize,
    past: &dyn Fn() -> bool,
    mut run: impl FnMut(usize, usize) -> candle_core::Result<()>,
) -> candle_core::Result<Option<()>> {
    for i in 0..count {
        if i > 0 && past() {
            return Ok(None);
        }
        let (start, length) = slice_of(total, count, i);
        run(start, length)?;
    }
    Ok(Some(()))
}

type Store<'a, T> = StoreContextMut<'a, T>;
type Answer<T> = wasmtime::Result<(Result<T, AccelError>,)>;
type Handle = Resource<DeviceTensor>;
/// `layer-norm`'s arguments: x, residual, scale, shift, eps.
type NormArgs = (Handle, Option<Handle>, Handle, Handle, f32);

/// Starts a call: the deadline check, then the fuel (a trap if either is spent). A call that
/// begins past the deadline is stopped there before any of its work, and counted as
/// interrupted like one stopped between its slices: wherever the deadline falls in a run of
/// long calls (in a call, or between two), the call it stopped is counted.
fn begin<T: AccelState>(store: &mut Store<'_, T>, fuel: u64) -> wasmtime::Result<()> {
    if store.data_mut().deadline_passed() {
        return Err(interrupted(store));
    }
    let state = store.data_mut();
    state.device().ops += 1;
    charge(store, cost::CALL.saturating_add(fuel))
}

/// Takes `cost` fuel from the store (a trap when there is not that much left; nothing to do
/// without fuel metering).
pub(crate) fn charge<T>(store: &mut Store<'_, T>, cost: u64) -> wasmtime::Result<()> {
    if let Ok(left) = store.get_fuel() {
        if cost >= left {
            store.set_fuel(0)?;
            return Err(Trap::OutOfFuel.into());
        }
        store.set_fuel(left - cost)?;
    }
    Ok(())
}

fn device<T: AccelState>(store: &mut Store<'_, T>) -> Result<Device, AccelError> {
    let run = store.data_mut().device();
    if run.hidden {
        return Err(AccelError::Unsupported(
            "the accelerator is hidden from this run".into(),
        ));
    }
    run.accel.device.clone().ok_or_else(|| {
        AccelError::Unsupported("the host offers no accelerator (--accel off)".into())
    })
}

fn invalid(message: impl Into<String>) -> AccelError {
    AccelError::InvalidArgument(message.into())
}

/// Most dimensions a tensor may have: 8. Every tensor the host holds carries its shape and
/// strides (16 bytes a dimension), which the device budget does not see; real models use 4.
pub const MAX_RANK: usize = 8;

/// The element count of `shape`, or why it is not a shape the host takes: more than
/// [`MAX_RANK`] dimensions, a product that overflows or exceeds [`MAX_ELEMENTS`].
fn elements_of(shape: &[u32]) -> Result<u64, AccelError> {
    if shape.len() > MAX_RANK {
        return Err(invalid(format!(
            "a tensor has at most {MAX_RANK} dimensions, not {}",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(1u64, |product, &d| product.checked_mul(u64::from(d)))
        .filter(|&elements| elements <= MAX_ELEMENTS)
        .ok_or_else(|| {
            invalid(format!(
                "shape {shape:?} has more elements than one tensor may ({MAX_ELEMENTS})"
            ))
        })
}

/// A shape the guest passed, copied out of its memory only if it has at most [`MAX_RANK`]
/// dimensions (a longer list is refused where it lies).
fn shape_of<T>(store: &Store<'_, T>, shape: &WasmList<u32>) -> Result<Vec<u32>, AccelError> {
    if shape.len() > MAX_RANK {
        return Err(invalid(format!(
            "a tensor has at most {MAX_RANK} dimensions, not {}",
            shape.len()
        )));
    }
    Ok(shape
        .as_le_slice(store)
        .iter()
        .map(|&d| u32::from_le(d))
        .collect())
}

/// Gives back `fuel` taken for work that will not run (a refused allocation).
fn refund<T>(store: &mut Store<'_, T>, fuel: u64) -> wasmtime::Result<()> {
    if let Ok(left) = store.get_fuel() {
        store.set_fuel(left.saturating_add(fuel))?;
    }
    Ok(())
}

/// What an op's work gives [`create`]: the result, `None` when it stopped between two slices
/// at the run's deadline, or the guest's error; a trap stays a trap.
type Made = wasmtime::Result<Result<Option<Tensor>, AccelError>>;

/// A closure that says whether the run's deadline has passed (for long calls to ask between
/// slices of their work).
fn deadline<T: AccelState>(store: &mut Store<'_, T>) -> impl Fn() -> bool {
    let at = store.data_mut().deadline_at();
    move || std::time::Instant::now() >= at
}

/// Ends a call stopped between two slices at the run's deadline: recorded for the run's error
/// and counted in its usage (`accel_interrupted`), then the interrupt trap.
fn interrupted<T: AccelState>(store: &mut Store<'_, T>) -> wasmtime::Error {
    store.data_mut().deadline_passed();
    store.data_mut().device().interrupted += 1;
    Trap::Interrupt.into()
}

/// Charges `work` fuel, then allocates `elements` f32 (the result) and `scratch` bytes (what
/// the work holds on the device while it runs: [`scratch`]) on the run's account, runs `make`,
/// returns the scratch and stores the result.
///
/// The charge comes first: a run without the fuel for the work traps before anything is
/// allocated or computed. A refused allocation gives the work's fuel back, so a refusal costs
/// only the call's floor, whatever the shape. Work stopped at the deadline ([`Made`]), or
/// that ended past it, returns what it held and ends the run ([`interrupted`]).
fn create<T: AccelState>(
    store: &mut Store<'_, T>,
    elements: u64,
    scratch: u64,
    work: u64,
    make: impl FnOnce(&mut Store<'_, T>) -> Made,
) -> wasmtime::Result<Result<Resource<DeviceTensor>, AccelError>> {
    if elements > MAX_ELEMENTS {
        return Ok(Err(invalid(format!(
            "{elements} elements is more than one call may create ({MAX_ELEMENTS})"
        ))));
    }
    let bytes = elements * 4;
    charge(store, work)?;
    let run = store.data_mut().device();
    let granted = run.alloc(bytes).and_then(|()| match scratch {
        0 => Ok(()),
        _ => run.alloc(scratch).inspect_err(|_| run.free(bytes, true)),
    });
    if let Err(e) = granted {
        refund(store, work)?;
        return Ok(Err(e));
    }
    let made = make(store);
    store.data_mut().device().free(scratch, true);
    // Work that ended past the deadline ends the run here, as if stopped after its last slice:
    // the wall time then holds at the call's end, not at the guest's next epoch check, and
    // the call is counted as interrupted wherever in it the deadline fell.
    let late = std::time::Instant::now() >= store.data_mut().deadline_at();
    match made {
        Ok(Ok(Some(_))) if late => {
            store.data_mut().device().free(bytes, true);
            Err(interrupted(store))
        }
        Ok(Ok(Some(tensor))) => {
            let resource = store.data_mut().tensors().push(DeviceTensor {
                tensor,
                bytes,
                resident: None,
            })?;
            Ok(Ok(resource))
        }
        other => {
            store.data_mut().device().free(bytes, true);
            match other? {
                Ok(_) => Err(interrupted(store)),
                Err(e) => Ok(Err(e)),
            }
        }
    }
}

/// A candle result as [`Made`] (a device failure is the guest's error, logged).
fn made(result: candle_core::Result<Option<Tensor>>) -> Made {
    Ok(result.map_err(failure))
}

/// The tensor behind a guest's handle (a clone: candle tensors share their storage).
fn tensor<T: AccelState>(
    store: &mut Store<'_, T>,
    handle: &Resource<DeviceTensor>,
) -> wasmtime::Result<Tensor> {
    Ok(store.data_mut().tensors().get(handle)?.tensor.clone())
}

/// Defines `wasm-infer:model/accel` in `linker`.
pub(crate) fn add_to_linker<T: AccelState>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    let mut accel = linker.instance("wasm-infer:model/accel@0.1.0")?;
    accel.resource(
        "tensor",
        ResourceType::host::<DeviceTensor>(),
        |mut store, rep| {
            let tensor = store
                .data_mut()
                .tensors()
                .delete(Resource::<DeviceTensor>::new_own(rep))?;
            let pooled = tensor.resident.is_none();
            store.data_mut().device().free(tensor.bytes, pooled);
            Ok(())
        },
    )?;

    accel.func_wrap("info", |mut store: Store<'_, T>, (): ()| {
        let run = store.data_mut().device();
        if run.hidden {
            return Ok((DeviceInfo {
                kind: DeviceKind::None,
                name: "none".into(),
                budget: 0,
                used: 0,
            },));
        }
        Ok((DeviceInfo {
            kind: run.accel.kind,
            name: run.accel.name.clone(),
            budget: run.budget,
            used: run.used,
        },))
    })?;

    accel.func_wrap(
        "upload",
        |mut store: Store<'_, T>,
         (shape, data): (WasmList<u32>, WasmList<f32>)|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let device = match device(&mut store) {
                Ok(device) => device,
                Err(e) => return Ok((Err(e),)),
            };
            // The shape and the data stay in the guest until the call is charged for them.
            let shape = match shape_of(&store, &shape) {
                Ok(shape) => shape,
                Err(e) => return Ok((Err(e),)),
            };
            let elements = match elements_of(&shape) {
                Ok(elements) => elements,
                Err(e) => return Ok((Err(e),)),
            };
            if elements != data.len() as u64 {
                return Ok((Err(invalid(format!(
                    "shape {shape:?} has {elements} elements, the data {}",
                    data.len()
                ))),));
            }
            let bytes = elements * 4;
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            let work = cost::upload(elements) - cost::CALL;
            let past = deadline(&mut store);
            let created = create(&mut store, elements, 0, work, |store| {
                // Copied in slices, the deadline asked between two of them.
                let total = data.len();
                let count = copy_slices(elements) as usize;
                let mut values = Vec::with_capacity(total);
                let mut items = data.iter(&mut *store)?;
                for i in 0..count {
                    if i > 0 && past() {
                        return Ok(Ok(None));
                    }
                    for _ in 0..slice_of(total, count, i).1 {
                        values.push(items.next().expect("the list's length")?);
                    }
                }
                made(Tensor::from_vec(values, dims, &device).map(Some))
            })?;
            if created.is_ok() {
                store.data_mut().device().uploaded += bytes;
            }
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "resident",
        |mut store: Store<'_, T>,
         (name, shape, data): (WasmStr, WasmList<u32>, WasmList<u8>)|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            // The name is read where it lies (UTF-8 needs no copy) and copied only within its
            // cap; the shape likewise ([`shape_of`]).
            let name = {
                let name = name.to_str(&store)?;
                if name.len() > super::MAX_RESIDENT_NAME_BYTES {
                    return Ok((Err(invalid(format!(
                        "a resident weight's name is {} bytes, over the {}-byte cap",
                        name.len(),
                        super::MAX_RESIDENT_NAME_BYTES
                    ))),));
                }
                name.into_owned()
            };
            let device = match device(&mut store) {
                Ok(device) => device,
                Err(e) => return Ok((Err(e),)),
            };
            let shape = match shape_of(&store, &shape) {
                Ok(shape) => shape,
                Err(e) => return Ok((Err(e),)),
            };
            let elements = match elements_of(&shape) {
                Ok(elements) => elements,
                Err(e) => return Ok((Err(e),)),
            };
            let bytes = elements * 4;
            if bytes != data.len() as u64 {
                return Ok((Err(invalid(format!(
                    "shape {shape:?} has {elements} f32 elements ({bytes} bytes), the data {} bytes",
                    data.len()
                ))),));
            }
            // Charged by rule, as an upload of this shape, before looking at the cache: the
            // fuel first, then the run's budget (a refusal gives the fuel back).
            let work = cost::resident(bytes) - cost::CALL;
            charge(&mut store, work)?;
            if let Err(e) = store.data_mut().device().alloc_by_rule(bytes) {
                refund(&mut store, work)?;
                return Ok((Err(e),));
            }
            let run = store.data_mut().device();
            let (weights, accel) = (run.weights.clone(), run.accel.clone());
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            let bound = weights.bind(&accel, &device, &name, &dims, || {
                data.as_le_slice(&store)
            });
            let resident = match bound {
                Ok(resident) => resident,
                Err(e) => {
                    refund(&mut store, work)?;
                    let run = store.data_mut().device();
                    run.free(bytes, false);
                    return Ok((Err(match e {
                        BindError::Budget(refusal) => run.refuse(refusal),
                        BindError::Other(e) => e,
                    }),));
                }
            };
            store.data_mut().device().uploaded += bytes;
            let tensor = DeviceTensor {
                tensor: resident.tensor.clone(),
                bytes,
                resident: Some(resident as Arc<dyn std::any::Any + Send + Sync>),
            };
            Ok((Ok(store.data_mut().tensors().push(tensor)?),))
        },
    )?;

    accel.func_wrap(
        "linear",
        |mut store: Store<'_, T>,
         (x, weight, bias): (
            Resource<DeviceTensor>,
            Resource<DeviceTensor>,
            Option<Resource<DeviceTensor>>,
        )|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let (x, w) = (tensor(&mut store, &x)?, tensor(&mut store, &weight)?);
            let b = match &bias {
                Some(b) => Some(tensor(&mut store, b)?),
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
            let slice = linear_slice_macs(rows, k, n);
            if slice > LINEAR_MAX_SLICE_MACS {
                return Ok((Err(invalid(format!(
                    "a {rows}x{k}·{n} product cannot be computed in slices of at most \
                     {LINEAR_MAX_SLICE_MACS} multiply-accumulates (its slices would be {slice})"
                ))),));
            }
            let elements = rows * n;
            let work = cost::linear(rows, k, n) - cost::CALL;
            let mut out_dims = x.dims().to_vec();
            *out_dims.last_mut().unwrap() = n as usize;
            let grid = linear_grid(rows, k, n);
            let held = scratch::linear(rows, n, grid, b.is_some());
            let past = deadline(&mut store);
            let created = create(&mut store, elements, held, work, |_| {
                let y = x
                    .reshape((rows as usize, k as usize))
                    .and_then(|x2| linear_in_slices(&x2, &w, b.as_ref(), grid, &past))
                    .and_then(|y| y.map(|y| y.reshape(out_dims)).transpose());
                made(y)
            })?;
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "gelu",
        |mut store: Store<'_, T>,
         (x,): (Resource<DeviceTensor>,)|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let x = tensor(&mut store, &x)?;
            let elements = x.elem_count() as u64;
            let work = cost::gelu(elements) - cost::CALL;
            let count = gelu_slices(elements);
            // Sliced, each slice's values are held until copied into the result.
            let held = match count {
                1 => 0,
                _ => elements.div_ceil(count) * 4,
            };
            let past = deadline(&mut store);
            let created = create(&mut store, elements, held, work, |_| {
                made(gelu_in_slices(&x, count as usize, &past))
            })?;
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "attention",
        |mut store: Store<'_, T>,
         (q, k, v, heads): (
            Resource<DeviceTensor>,
            Resource<DeviceTensor>,
            Resource<DeviceTensor>,
            u32,
        )|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let (q, k, v) = (
                tensor(&mut store, &q)?,
                tensor(&mut store, &k)?,
                tensor(&mut store, &v)?,
            );
            let (tokens, hidden) = match attention_dims(&q, &k, &v, heads) {
                Ok(dims) => dims,
                Err(e) => return Ok((Err(e),)),
            };
            // q·kᵀ and probs·v: tokens² × head_size per head each.
            let macs = 2u64
                .saturating_mul(tokens)
                .saturating_mul(tokens)
                .saturating_mul(hidden);
            if macs > MAX_OP_MACS {
                return Ok((Err(invalid(format!(
                    "{macs} multiply-accumulates is more than one call may do ({MAX_OP_MACS})"
                ))),));
            }
            let scores = u64::from(heads) * tokens * tokens;
            let elements = tokens * hidden;
            if scores > MAX_ELEMENTS {
                return Ok((Err(invalid(format!(
                    "{scores} attention scores is more than one call may create ({MAX_ELEMENTS})"
                ))),));
            }
            let work = cost::attention(tokens, hidden, u64::from(heads)) - cost::CALL;
            let held = scratch::attention(tokens, hidden, u64::from(heads));
            let past = deadline(&mut store);
            let created = create(&mut store, elements, held, work, |_| {
                made(multi_head_attention(
                    &q,
                    &k,
                    &v,
                    heads as usize,
                    ATTENTION_SLICE_MACS,
                    &past,
                ))
            })?;
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "layer-norm",
        |mut store: Store<'_, T>,
         (x, residual, scale, shift, eps): NormArgs|
         -> Answer<Resource<DeviceTensor>> {
            begin(&mut store, 0)?;
            let x = tensor(&mut store, &x)?;
            let residual = match &residual {
                Some(r) => Some(tensor(&mut store, r)?),
                None => None,
            };
            let (scale, shift) = (tensor(&mut store, &scale)?, tensor(&mut store, &shift)?);
            if let Err(e) = norm_dims(&x, residual.as_ref(), &scale, &shift, eps) {
                return Ok((Err(e),));
            }
            let elements = x.elem_count() as u64;
            let n = x.dims().last().map_or(1, |&n| n as u64);
            let work = cost::layer_norm(elements / n, n) - cost::CALL;
            let held = scratch::layer_norm(elements / n, n, residual.is_some());
            let count = norm_slices(elements / n, n);
            let past = deadline(&mut store);
            let created = create(&mut store, elements, held, work, |_| {
                made(layer_norm_in_slices(
                    &x,
                    residual.as_ref(),
                    (&scale, &shift, eps),
                    count as usize,
                    &past,
                ))
            })?;
            Ok((created,))
        },
    )?;

    accel.func_wrap(
        "[method]tensor.shape",
        |mut store: Store<'_, T>, (this,): (Resource<DeviceTensor>,)| {
            begin(&mut store, 0)?;
            let dims: Vec<u32> = tensor(&mut store, &this)?
                .dims()
                .iter()
                .map(|&d| d as u32)
                .collect();
            Ok((dims,))
        },
    )?;

    accel.func_wrap(
        "[method]tensor.download",
        |mut store: Store<'_, T>, (this,): (Resource<DeviceTensor>,)| -> Answer<Vec<f32>> {
            if store.data_mut().tensors().get(&this)?.resident.is_some() {
                begin(&mut store, 0)?;
                return Ok((Err(AccelError::ReadOnly(
                    "a resident weight cannot be downloaded".into(),
                )),));
            }
            let t = tensor(&mut store, &this)?;
            let elements = t.elem_count() as u64;
            let bytes = elements * 4;
            let work = cost::download(elements) - cost::CALL;
            begin(&mut store, work)?;
            // The staging copy is held on the run's account while the values cross.
            let staging = scratch::download(elements);
            if let Err(e) = store.data_mut().device().alloc(staging) {
                refund(&mut store, work)?;
                return Ok((Err(e),));
            }
            let past = deadline(&mut store);
            let values = download_in_slices(&t, copy_slices(elements) as usize, &past);
            let run = store.data_mut().device();
            run.free(staging, true);
            match values {
                Ok(Some(values)) => {
                    run.downloaded += bytes;
                    Ok((Ok(values),))
                }
                Ok(None) => Err(interrupted(&mut store)),
                Err(e) => Ok((Err(failure(e)),)),
            }
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
    if k == 0 {
        return Err(invalid("x's last dimension (k) must be at least 1"));
    }
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

/// `(tokens, hidden)` of an attention over `q`, `k`, `v`, or why the shapes do not fit.
fn attention_dims(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: u32,
) -> Result<(u64, u64), AccelError> {
    let (tokens, hidden) = q
        .dims2()
        .map_err(|_| invalid(format!("q must be [tokens, hidden], got {:?}", q.dims())))?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        return Err(invalid(format!(
            "q, k and v must have one shape, got {:?}, {:?}, {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if heads == 0 || hidden % heads as usize != 0 || tokens == 0 {
        return Err(invalid(format!(
            "{heads} heads do not divide [{tokens}, {hidden}] into non-empty heads"
        )));
    }
    Ok((tokens as u64, hidden as u64))
}

/// What [`attention_dims`] accepted, computed as the guest's candle would: per head,
/// softmax(q·kᵀ / √head_size)·v. Every step reduces within one row on one thread (candle's CPU
/// matmul splits its output between threads, never a sum), so the bits do not depend on the
/// number of threads, nor on the slices: heads, then query rows, at most `slice_macs`
/// multiply-accumulates each (at least one row of one head). Between two slices `past` is
/// asked whether to stop; `None` when it said so.
fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    slice_macs: u64,
    past: &dyn Fn() -> bool,
) -> candle_core::Result<Option<Tensor>> {
    let (tokens, hidden) = q.dims2()?;
    let head_size = hidden / heads;
    let split = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.reshape((tokens, heads, head_size))?
            .transpose(0, 1)?
            .contiguous()
    };
    let (q, kt, v) = (split(q)?, split(k)?.t()?.contiguous()?, split(v)?);
    // q·kᵀ and probs·v for one query row of one head.
    let row_macs = (2 * tokens * head_size).max(1) as u64;
    let rows = (slice_macs / row_macs).clamp(1, tokens as u64) as usize;
    let heads_per_slice = if rows == tokens {
        (slice_macs / (row_macs * tokens as u64)).clamp(1, heads as u64) as usize
    } else {
        1
    };
    let mut by_head = Vec::new();
    // Whether a slice has run (the deadline is asked between slices, not before the first).
    let mut started = false;
    for h in (0..heads).step_by(heads_per_slice) {
        let n = heads_per_slice.min(heads - h);
        let (qh, kh, vh) = if n == heads {
            (q.clone(), kt.clone(), v.clone())
        } else {
            (
                q.narrow(0, h, n)?.contiguous()?,
                kt.narrow(0, h, n)?.contiguous()?,
                v.narrow(0, h, n)?.contiguous()?,
            )
        };
        let mut by_row = Vec::new();
        for r in (0..tokens).step_by(rows) {
            if std::mem::replace(&mut started, true) && past() {
                return Ok(None);
            }
            let m = rows.min(tokens - r);
            let qr = if m == tokens {
                qh.clone()
            } else {
                qh.narrow(1, r, m)?.contiguous()?
            };
            let scores = (qr.matmul(&kh)? / (head_size as f64).sqrt())?;
            // softmax over the last dimension, as candle_nn::ops::softmax: exp(x - max) / sum.
            let max = scores.max_keepdim(D::Minus1)?;
            let exp = scores.broadcast_sub(&max)?.exp()?;
            let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
            by_row.push(probs.matmul(&vh)?);
        }
        by_head.push(if by_row.len() == 1 {
            by_row.pop().unwrap()
        } else {
            Tensor::cat(&by_row, 1)?
        });
    }
    let out = if by_head.len() == 1 {
        by_head.pop().unwrap()
    } else {
        Tensor::cat(&by_head, 0)?
    };
    Ok(Some(
        out.transpose(0, 1)?
            .contiguous()?
            .reshape((tokens, hidden))?,
    ))
}

/// `x · wᵀ (+ b)` for x `[rows, k]`, in a grid of `(row slices, column slices)`
/// ([`linear_grid`]), `past` asked between two slices; `None` when it said to stop. Each
/// slice has at least [`LINEAR_MIN_SLICE_ROWS`] rows and columns (or all of them), so it sums
/// each output in the order the whole product would (the bits do not depend on the slices),
/// and is copied into its place in the result as it is made.
fn linear_in_slices(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    (by_rows, by_columns): (u64, u64),
    past: &dyn Fn() -> bool,
) -> candle_core::Result<Option<Tensor>> {
    let product = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let y = x.matmul(&w.t()?)?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    };
    let (by_rows, by_columns) = (by_rows as usize, by_columns as usize);
    let count = by_rows * by_columns;
    if count <= 1 {
        return product(x, w, b).map(Some);
    }
    let (rows, n) = (x.dim(0)?, w.dim(0)?);
    let out = Tensor::zeros((rows, n), x.dtype(), x.device())?;
    let done = in_slices(count, count, past, |i, _| {
        let (start, length) = slice_of(rows, by_rows, i / by_columns);
        let (first, width) = slice_of(n, by_columns, i % by_columns);
        let b = b.map(|b| b.narrow(0, first, width)).transpose()?;
        let block = product(
            &x.narrow(0, start, length)?,
            &w.narrow(0, first, width)?,
            b.as_ref(),
        )?;
        // Rows of a contiguous tensor are contiguous: the block goes into its rows, at its
        // first column.
        out.narrow(0, start, length)?.slice_set(&block, 1, first)
    })?;
    Ok(done.map(|()| out))
}

/// GELU (erf) of `x`, in `count` slices of its elements, `past` asked between two of them.
fn gelu_in_slices(
    x: &Tensor,
    count: usize,
    past: &dyn Fn() -> bool,
) -> candle_core::Result<Option<Tensor>> {
    if count <= 1 {
        return x.gelu_erf().map(Some);
    }
    let flat = x.flatten_all()?;
    let total = flat.elem_count();
    let out = Tensor::zeros(total, x.dtype(), x.device())?;
    let done = in_slices(total, count, past, |start, length| {
        out.slice_set(&flat.narrow(0, start, length)?.gelu_erf()?, 0, start)
    })?;
    done.map(|()| out.reshape(x.shape())).transpose()
}

/// [`layer_norm`] of `x` (plus `residual`) with `(scale, shift, eps)`, in `count` slices of
/// whole rows, `past` asked between two of them (every step works within one row, so the bits
/// do not depend on the slices).
fn layer_norm_in_slices(
    x: &Tensor,
    residual: Option<&Tensor>,
    (scale, shift, eps): (&Tensor, &Tensor, f32),
    count: usize,
    past: &dyn Fn() -> bool,
) -> candle_core::Result<Option<Tensor>> {
    let norm = |x: &Tensor, residual: Option<&Tensor>| -> candle_core::Result<Tensor> {
        match residual {
            Some(r) => layer_norm(&x.add(r)?, scale, shift, eps),
            None => layer_norm(x, scale, shift, eps),
        }
    };
    if count <= 1 {
        return norm(x, residual).map(Some);
    }
    let n = x.dim(D::Minus1)?;
    let rows = x.elem_count() / n;
    let x2 = x.reshape((rows, n))?;
    let r2 = residual.map(|r| r.reshape((rows, n))).transpose()?;
    let out = Tensor::zeros((rows, n), x.dtype(), x.device())?;
    let done = in_slices(rows, count, past, |start, length| {
        let r = r2
            .as_ref()
            .map(|r| r.narrow(0, start, length))
            .transpose()?;
        let y = norm(&x2.narrow(0, start, length)?, r.as_ref())?;
        out.slice_set(&y, 0, start)
    })?;
    done.map(|()| out.reshape(x.shape())).transpose()
}

/// The values of `t` as f32, flattened, copied out in `count` slices, `past` asked between
/// two of them.
fn download_in_slices(
    t: &Tensor,
    count: usize,
    past: &dyn Fn() -> bool,
) -> candle_core::Result<Option<Vec<f32>>> {
    let flat = t.to_dtype(DType::F32)?.flatten_all()?;
    if count <= 1 {
        return flat.to_vec1().map(Some);
    }
    let total = flat.elem_count();
    let mut values = Vec::with_capacity(total);
    let done = in_slices(total, count, past, |start, length| {
        values.extend_from_slice(&flat.narrow(0, start, length)?.to_vec1::<f32>()?);
        Ok(())
    })?;
    Ok(done.map(|()| values))
}

/// Checks a layer norm's operands: `residual` shaped as `x`, `scale` and `shift` [last dim].
fn norm_dims(
    x: &Tensor,
    residual: Option<&Tensor>,
    scale: &Tensor,
    shift: &Tensor,
    eps: f32,
) -> Result<(), AccelError> {
    let n = *x
        .dims()
        .last()
        .ok_or_else(|| invalid("x must have at least one dimension"))?;
    if n == 0 {
        return Err(invalid("x's last dimension must be at least 1"));
    }
    if let Some(r) = residual {
        if r.dims() != x.dims() {
            return Err(invalid(format!(
                "residual must be {:?}, got {:?}",
                x.dims(),
                r.dims()
            )));
        }
    }
    if scale.dims() != [n] || shift.dims() != [n] {
        return Err(invalid(format!(
            "scale and shift must be [{n}], got {:?} and {:?}",
            scale.dims(),
            shift.dims()
        )));
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(invalid(format!(
            "eps must be positive and finite, got {eps}"
        )));
    }
    Ok(())
}

/// (x - mean) / √(variance + eps) · scale + shift over the last dimension, the steps of
/// candle-nn's unfused `LayerNorm` (per-row reductions: the bits do not depend on threads).
fn layer_norm(x: &Tensor, scale: &Tensor, shift: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / n)?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = (centred.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let normed = centred.broadcast_div(&(variance + f64::from(eps))?.sqrt()?)?;
    normed.broadcast_mul(scale)?.broadcast_add(shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_before_anything_is_allocated() {
        assert_eq!(elements_of(&[2, 3, 4]), Ok(24));
        assert_eq!(elements_of(&[]), Ok(1));
        let too_deep = vec![1; MAX_RANK + 1];
        assert!(matches!(
            elements_of(&too_deep),
            Err(AccelError::InvalidArgument(_))
        ));
        // 65536^4 = 2^64: overflows u64.
        assert!(matches!(
            elements_of(&[65536; 4]),
            Err(AccelError::InvalidArgument(_))
        ));
        assert!(matches!(
            elements_of(&[3340214413, 2761311370, 2]),
            Err(AccelError::InvalidArgument(_))
        ));
        // 2^32 elements: past MAX_ELEMENTS without overflowing.
        assert!(matches!(
            elements_of(&[1 << 16, 1 << 16]),
            Err(AccelError::InvalidArgument(_))
        ));
    }

    fn zeros(dims: &[usize]) -> Tensor {
        Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn attention_and_layer_norm_operands_are_checked_before_anything_runs() {
        let x = zeros(&[3, 8]);
        assert_eq!(attention_dims(&x, &x, &x, 2), Ok((3, 8)));
        for heads in [0, 3] {
            assert!(matches!(
                attention_dims(&x, &x, &x, heads),
                Err(AccelError::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            attention_dims(&x, &zeros(&[4, 8]), &x, 2),
            Err(AccelError::InvalidArgument(_))
        ));
        assert!(matches!(
            attention_dims(&zeros(&[2, 3, 8]), &x, &x, 2),
            Err(AccelError::InvalidArgument(_))
        ));
        let n = zeros(&[8]);
        assert_eq!(norm_dims(&x, Some(&x), &n, &n, 1e-12), Ok(()));
        for bad in [
            norm_dims(&x, Some(&zeros(&[8])), &n, &n, 1e-12),
            norm_dims(&x, None, &zeros(&[3]), &n, 1e-12),
            norm_dims(&x, None, &n, &n, 0.0),
            norm_dims(&x, None, &n, &n, f32::NAN),
            norm_dims(&zeros(&[3, 0]), None, &zeros(&[0]), &zeros(&[0]), 1e-12),
        ] {
            assert!(
                matches!(bad, Err(AccelError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn attention_and_layer_norm_compute_what_they_say() {
        // One head, two tokens, head size 2.
        let t =
            |v: &[f32], dims: (usize, usize)| Tensor::from_slice(v, dims, &Device::Cpu).unwrap();
        let (q, v) = (t(&[1., 0., 0., 1.], (2, 2)), t(&[1., 2., 3., 4.], (2, 2)));
        let out: Vec<f32> = multi_head_attention(&q, &q, &v, 1, ATTENTION_SLICE_MACS, &|| false)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Token 0's scores are [1/√2, 0]; token 1's [0, 1/√2].
        let p = 1.0 / (1.0 + (-std::f64::consts::FRAC_1_SQRT_2).exp());
        let expected = [
            p * 1.0 + (1.0 - p) * 3.0,
            p * 2.0 + (1.0 - p) * 4.0,
            (1.0 - p) * 1.0 + p * 3.0,
            (1.0 - p) * 2.0 + p * 4.0,
        ];
        for (got, want) in out.iter().zip(expected) {
            assert!(
                (f64::from(*got) - want).abs() < 1e-6,
                "{out:?} vs {expected:?}"
            );
        }
        // Mean 2.5, variance 1.25; scale 2, shift 1.
        let x = t(&[1., 2., 3., 4.], (1, 4));
        let scale = Tensor::from_slice(&[2f32; 4], 4, &Device::Cpu).unwrap();
        let shift = Tensor::from_slice(&[1f32; 4], 4, &Device::Cpu).unwrap();
        let y: Vec<f32> = layer_norm(&x, &scale, &shift, 1e-12)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (got, xi) in y.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            let want = (xi - 2.5) / 1.25f64.sqrt() * 2.0 + 1.0;
            assert!((f64::from(*got) - want).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn attention_in_slices_gives_the_same_bits_and_stops_between_slices() {
        // 4 heads of 8 over 16 tokens, values from a fixed sequence.
        let data: Vec<f32> = (0..16 * 32)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let q = Tensor::from_vec(data.clone(), (16, 32), &Device::Cpu).unwrap();
        let k = (q.clone() * 0.5).unwrap();
        let bits = |slice_macs: u64| -> Vec<u32> {
            multi_head_attention(&q, &k, &q, 4, slice_macs, &|| false)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let whole = bits(u64::MAX);
        // One row of one head a slice (64 slices); two heads a slice; four rows a slice.
        for slice_macs in [1, 2 * 2 * 16 * 8 * 16, 4 * 2 * 16 * 8] {
            assert_eq!(bits(slice_macs), whole, "slices of {slice_macs}");
        }
        // Told to stop at its third question (before the fourth slice): it stops there.
        let asked = std::cell::Cell::new(0);
        let past = || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        };
        assert!(multi_head_attention(&q, &k, &q, 4, 1, &past)
            .unwrap()
            .is_none());
        assert_eq!(asked.get(), 3);
        // Past the deadline from the start: one slice, then it stops at the first question.
        let (asked, stopped) = asking(true);
        assert!(multi_head_attention(&q, &k, &q, 4, 1, &stopped)
            .unwrap()
            .is_none());
        assert_eq!(asked.get(), 1);
        // Never stopped: 64 slices, asked between each two.
        let (asked, never) = asking(false);
        assert!(multi_head_attention(&q, &k, &q, 4, 1, &never)
            .unwrap()
            .is_some());
        assert_eq!(asked.get(), 63);
    }

    /// A deadline check that always answers `answer` and counts the questions.
    fn asking(answer: bool) -> (std::rc::Rc<std::cell::Cell<u32>>, impl Fn() -> bool) {
        let asked = std::rc::Rc::new(std::cell::Cell::new(0));
        let counter = asked.clone();
        (asked, move || {
            counter.set(counter.get() + 1);
            answer
        })
    }

    /// A `[rows, cols]` tensor of fixed values in about [-3, 3].
    fn filled(rows: usize, cols: usize, salt: usize) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 37 + salt * 11) % 101) as f32 - 50.0) / 17.0)
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    fn bits_of(t: &Tensor) -> Vec<u32> {
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn slice_counts_are_their_formulas() {
        // linear: aim for ceil(macs / 2^26) slices: rows first, at most rows / 257 of them,
        // then columns, ceil(aim / row slices) and at most n / 257 of them.
        // 4096·1024·2048 = 2^33: an aim of 128; 15 by the rows (4096 / 257 = 15.9), then
        // ceil(128 / 15) = 9 but at most 7 by the columns (2048 / 257 = 7.97): 105 slices of
        // at most 274 x 293 outputs, 82,206,720 MACs.
        assert_eq!(linear_grid(4096, 1024, 2048), (15, 7));
        assert_eq!(linear_slices(4096, 1024, 2048), 105);
        assert_eq!(linear_slice_macs(4096, 1024, 2048), 274 * 293 * 1024);
        // 1028·256·512 = 134,742,016 MACs: an aim of 3 (2.008 rounded up), 4 by the rows.
        assert_eq!(linear_grid(1028, 256, 512), (3, 1));
        // MiniLM's largest at 128 tokens: 128·384·1536 = 75,497,472 MACs, an aim of 2; 128
        // rows cannot be sliced, 1536 columns can (5 at most): two slices of 768 columns.
        assert_eq!(linear_grid(128, 384, 1536), (1, 2));
        // MiniLM's at its 512-token maximum: 302 M MACs, an aim of 5; 1 by the rows
        // (512 / 257), 5 by the columns (1536 / 257 = 5.98).
        assert_eq!(linear_grid(512, 384, 1536), (1, 5));
        // Its other two at 128 tokens (56.6 M and 18.9 M MACs): one slice.
        assert_eq!(linear_slices(128, 1536, 384), 1);
        assert_eq!(linear_slices(128, 384, 384), 1);
        // 513 rows, once one slice whatever the MACs (2^33 here): now 15 slices of columns.
        assert_eq!(linear_grid(513, 4096, 4088), (1, 15));
        assert_eq!(linear_slice_macs(513, 4096, 4088), 513 * 273 * 4096);
        assert_eq!(linear_grid(514, 4096, 4080), (2, 15));
        // Fewer than 514 rows and columns: one slice, refused past 2^30 MACs.
        assert_eq!(linear_grid(513, 4080, 513), (1, 1));
        assert!(linear_slice_macs(513, 4080, 513) <= LINEAR_MAX_SLICE_MACS);
        assert!(linear_slice_macs(513, 4081, 513) > LINEAR_MAX_SLICE_MACS);
        // Scratch: one slice with a bias holds the product beside the result; in slices, each
        // slice's product and its sum with the bias (or the product alone without one).
        assert_eq!(scratch::linear(64, 64, (1, 1), true), 64 * 64 * 4);
        assert_eq!(scratch::linear(64, 64, (1, 1), false), 0);
        assert_eq!(scratch::linear(1028, 512, (3, 1), true), 2 * 343 * 512 * 4);
        assert_eq!(scratch::linear(128, 1536, (1, 2), true), 2 * 128 * 768 * 4);
        assert_eq!(scratch::linear(128, 1536, (1, 2), false), 128 * 768 * 4);
        // gelu: ceil(elements / 2^20).
        assert_eq!(gelu_slices(128 * 1536), 1);
        assert_eq!(gelu_slices(1 << 20), 1);
        assert_eq!(gelu_slices((1 << 20) + 1), 2);
        assert_eq!(gelu_slices(1 << 24), 16);
        // layer-norm: ceil(elements / 2^20) whole rows, at least one row a slice.
        assert_eq!(norm_slices(128, 384), 1);
        assert_eq!(norm_slices(4096, 1024), 4);
        assert_eq!(norm_slices(3, 1 << 20), 3);
        assert_eq!(norm_slices(1, 1 << 22), 1);
        // upload and download: ceil(elements / 2^22).
        assert_eq!(copy_slices(1), 1);
        assert_eq!(copy_slices(1 << 22), 1);
        assert_eq!(copy_slices((1 << 22) + 1), 2);
        assert_eq!(copy_slices(1 << 31), 512);
        // The slices cover the whole evenly: 10 in 3 is 3, 3, 4.
        let parts: Vec<_> = (0..3).map(|i| slice_of(10, 3, i)).collect();
        assert_eq!(parts, [(0, 3), (3, 3), (6, 4)]);
    }

    /// Each path the CPU backend's matrix product takes for a shape (its general kernel, the
    /// matrix-vector one for one row or n = 1, the one for k <= 2, tall, wide and square
    /// outputs, MiniLM's shapes, k over gemm's 512 block and not a multiple of it): the product
    /// in a grid of slices of at least 257 rows and 257 columns has the bits of the whole, for
    /// every grid the shape allows.
    #[test]
    fn linear_in_slices_gives_the_same_bits_and_stops_between_slices() {
        for (rows, k, n) in [
            (600, 37, 70),
            (1030, 600, 9),
            (520, 700, 1),
            (600, 2, 9),
            (777, 513, 3),
            // Rows too few to slice: the columns are.
            (1, 700, 1030),
            (1, 1, 600),
            (2, 2, 771),
            (3, 1025, 520),
            (64, 64, 1028),
            (65, 100, 600),
            (128, 384, 1536),
            (257, 333, 514),
            (513, 1100, 530),
            // Both.
            (530, 77, 800),
            (1028, 513, 771),
        ] {
            let (x, w, b) = (filled(rows, k, 1), filled(n, k, 2), filled(1, n, 3));
            let b = b.reshape(n).unwrap();
            for bias in [None, Some(&b)] {
                let whole = linear_in_slices(&x, &w, bias, (1, 1), &|| false)
                    .unwrap()
                    .unwrap();
                let min = LINEAR_MIN_SLICE_ROWS as usize;
                for by_rows in 1..=(rows / min).max(1) {
                    for by_columns in 1..=(n / min).max(1) {
                        let count = by_rows * by_columns;
                        if count == 1 {
                            continue;
                        }
                        let (asked, never) = asking(false);
                        let grid = (by_rows as u64, by_columns as u64);
                        let sliced = linear_in_slices(&x, &w, bias, grid, &never)
                            .unwrap()
                            .unwrap();
                        assert_eq!(
                            bits_of(&sliced),
                            bits_of(&whole),
                            "{rows}x{k}x{n} in {grid:?}"
                        );
                        assert_eq!(asked.get() as usize, count - 1);
                    }
                }
            }
            let grid = match (rows >= 514, n >= 514) {
                (true, _) => (2, 1),
                (false, true) => (1, 2),
                (false, false) => continue,
            };
            let (asked, stopped) = asking(true);
            assert!(linear_in_slices(&x, &w, None, grid, &stopped)
                .unwrap()
                .is_none());
            assert_eq!(asked.get(), 1);
        }
    }

    #[test]
    fn gelu_layer_norm_and_download_in_slices_give_the_same_bits_and_stop_between_slices() {
        let x = filled(37, 271, 4);
        let whole = gelu_in_slices(&x, 1, &|| false).unwrap().unwrap();
        for count in [2, 3, 7, 37 * 271] {
            let (asked, never) = asking(false);
            let sliced = gelu_in_slices(&x, count, &never).unwrap().unwrap();
            assert_eq!(sliced.dims(), [37, 271]);
            assert_eq!(bits_of(&sliced), bits_of(&whole), "gelu in {count}");
            assert_eq!(asked.get() as usize, count - 1);
        }
        let (asked, stopped) = asking(true);
        assert!(gelu_in_slices(&x, 3, &stopped).unwrap().is_none());
        assert_eq!(asked.get(), 1);

        let r = filled(37, 271, 5);
        let (scale, shift) = (
            filled(1, 271, 6).reshape(271).unwrap(),
            filled(1, 271, 7).reshape(271).unwrap(),
        );
        let args = (&scale, &shift, 1e-5f32);
        for residual in [None, Some(&r)] {
            let whole = layer_norm_in_slices(&x, residual, args, 1, &|| false)
                .unwrap()
                .unwrap();
            for count in [2, 5, 37] {
                let (asked, never) = asking(false);
                let sliced = layer_norm_in_slices(&x, residual, args, count, &never)
                    .unwrap()
                    .unwrap();
                assert_eq!(bits_of(&sliced), bits_of(&whole), "layer-norm in {count}");
                assert_eq!(asked.get() as usize, count - 1);
            }
            let (asked, stopped) = asking(true);
            assert!(layer_norm_in_slices(&x, residual, args, 5, &stopped)
                .unwrap()
                .is_none());
            assert_eq!(asked.get(), 1);
        }

        let whole: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for count in [1, 2, 9] {
            let (asked, never) = asking(false);
            let values = download_in_slices(&x, count, &never).unwrap().unwrap();
            assert_eq!(values, whole);
            assert_eq!(asked.get() as usize, count - 1);
        }
        let (asked, stopped) = asking(true);
        assert!(download_in_slices(&x, 9, &stopped).unwrap().is_none());
        assert_eq!(asked.get(), 1);
    }
}
