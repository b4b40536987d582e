//! The one run-under-limits sequence, used by every call into a guest: runs (`infer`), the
//! model's `info` at load, and pre-initialisation.
//!
//! [`call_limited`] takes a pooled slot (if the runtime has a pool), builds a fresh store for
//! the limits (fuel budget, hostcall copy budget, memory limiter, device account, deadline),
//! runs the caller's body (instantiate, then call) under an outer timeout that ends even a run
//! blocked inside a host call, reads the usage back from the store, and classifies a failure
//! from what the host observed ([`classify`]).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTableError;
use wasmtime::{Store, Trap};

use crate::error::{Error, LimitExceeded};
use crate::limits::{Limits, MAX_HANDLES};
use crate::runtime::Runtime;
use crate::store::{self, fuel_used, RunState};
use crate::usage::Usage;

/// What a body does with a fresh store: instantiate and call, borrowing the store.
pub(crate) type GuestCall<'s, T> = Pin<Box<dyn Future<Output = wasmtime::Result<T>> + Send + 's>>;

/// How a limited call ended, with what it used. The store (and the pooled slot it occupies)
/// is handed back for a caller that still needs the instance: pre-initialisation snapshots it.
pub(crate) struct Limited<T> {
    pub(crate) result: Result<T, Error>,
    pub(crate) usage: Usage,
    pub(crate) store: Option<Store<RunState>>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Calls into a guest under `limits`: see the module docs.
pub(crate) async fn call_limited<T, F>(runtime: &Runtime, limits: &Limits, body: F) -> Limited<T>
where
    F: for<'s> FnOnce(&'s mut Store<RunState>) -> GuestCall<'s, T>,
{
    let queued = Instant::now();
    let slot = runtime.slot().await;
    let queue_time = queued.elapsed();
    let accel = runtime.accel().clone();
    let meter_fuel = runtime.config().meter_fuel;
    let mut store = match store::new_store(runtime.engine(), accel, meter_fuel, limits) {
        Ok(store) => store,
        Err(error) => {
            return Limited {
                result: Err(error),
                usage: Usage {
                    queue_time,
                    ..Usage::default()
                },
                store: None,
                _slot: slot,
            }
        }
    };
    let deadline = store.data().deadline;
    let hard_stop = deadline.hard_stop(runtime.epoch_tick());
    // The epoch callback stops runaway wasm; this outer timeout also ends a call that is
    // blocked in a host call, where no epoch check happens.
    let outcome = tokio::time::timeout_at(hard_stop.into(), body(&mut store)).await;
    let elapsed = deadline.started().elapsed();
    let (fuel_consumed, out_of_fuel) = fuel_used(&store, limits);
    let usage = usage_of(&store, fuel_consumed, queue_time, elapsed);
    let result = match outcome {
        Err(_blocked) => Err(store
            .data()
            .deadline
            .tripped()
            .unwrap_or_else(|| deadline.exceeded(elapsed))
            .into()),
        Ok(Err(e)) => Err(classify(e, store.data(), limits)),
        Ok(Ok(value)) => match out_of_fuel {
            Some(out_of_fuel) => Err(out_of_fuel.into()),
            None => Ok(value),
        },
    };
    Limited {
        result,
        usage,
        store: Some(store),
        _slot: slot,
    }
}

/// What the store says the call used (`fuel_consumed` read by the caller, once per run).
fn usage_of(
    store: &Store<RunState>,
    fuel_consumed: u64,
    queue_time: Duration,
    wall_time: Duration,
) -> Usage {
    let state = store.data();
    let started = state.deadline.started();
    let (instantiate_time, initial_memory_bytes) = state
        .instantiated
        .map_or((Duration::ZERO, 0), |(at, memory)| (at - started, memory));
    Usage {
        fuel_consumed,
        peak_memory_bytes: state.limiter.peak,
        initial_memory_bytes,
        wall_time,
        queue_time,
        instantiate_time,
        guest_stdout_bytes: state.stdout.written(),
        guest_stderr_bytes: state.stderr.written(),
        device_peak_bytes: state.device.peak,
        device_uploaded_bytes: state.device.uploaded,
        device_downloaded_bytes: state.device.downloaded,
        accel_ops: state.device.ops,
        accel_refusals: state.device.refusals,
        accel_interrupted: state.device.interrupted,
        wasi_fuel: state.wasi_fuel,
        // The input's and the output's sizes are the caller's: only it knows what they are
        // (a run's, in `Model::run_async`; a model's info and a pre-initialisation have none).
        ..Usage::default()
    }
}

/// Decides what a failed call means, from what the host observed rather than the message: a
/// passed deadline, then exhausted fuel, then a refusal that stands as the cause (see
/// [`Error`]'s attribution rule), then the handle cap, then the hostcall copy budget, else a
/// trap. Two wasmtime refusals expose no type and are recognised by their message, each
/// pinned by a test so that a wasmtime change cannot slip by.
pub(crate) fn classify(e: wasmtime::Error, state: &RunState, limits: &Limits) -> Error {
    if let Some(trip) = state.deadline.tripped() {
        return trip.into();
    }
    let code = e.downcast_ref::<Trap>().copied();
    if code == Some(Trap::OutOfFuel) {
        if let Some(out_of_fuel) = store::fuel_exceeded(limits) {
            return out_of_fuel.into();
        }
    }
    if let Some(cause) = state.attribution.cause() {
        return cause.into();
    }
    // Host resources are refused by the run's table (typed); guest-defined ones by wasmtime's
    // store-wide handle count, which says so only in its message (pinned by tests/hostile.rs).
    let table_full = e
        .downcast_ref::<ResourceTableError>()
        .is_some_and(|e| matches!(e, ResourceTableError::Full));
    if table_full
        || e.chain()
            .any(|cause| cause.to_string().contains("store handle limit exceeded"))
    {
        return LimitExceeded::Handles { limit: MAX_HANDLES }.into();
    }
    // wasmtime stops copying data out of the guest past the store's copy budget
    // (`store::CopyBudgets`) and exposes no type for it. Whatever the guest was handing over
    // (its result, or an argument of a host call) was larger than the budget, which is above
    // what the output limit admits: the size is known only to be past it.
    if e.chain()
        .any(|cause| cause.to_string().contains("fuel allocated for hostcalls"))
    {
        return LimitExceeded::Output {
            limit: limits.max_output,
            size: state.copy_budget() as u64 + 1,
            at_least: true,
        }
        .into();
    }
    // Not a trap, and the host's own resources failed (file descriptors, memory maps,
    // threads): the host's error, not the guest's.
    if code.is_none() {
        if let Some(cause) = host_resource_failure(&e) {
            return Error::Internal(format!("the host ran out of a resource: {cause}"));
        }
    }
    let stderr = state.stderr.contents();
    let tail = &stderr[stderr.len().saturating_sub(GUEST_STDERR_TAIL_BYTES)..];
    Error::Trap {
        code,
        message: trap_message(&e, code),
        guest_stderr: String::from_utf8_lossy(tail).into_owned(),
    }
}

/// The operating-system error in `e`'s chain, if any: an `std::io::Error` (or one that
/// reports an OS error code, as `rustix`'s do: "Too many open files (os error 24)"). A guest
/// reaches the host's files, memory maps and threads only through wasmtime and the host's own
/// code, which never turn a guest's action into an OS error: WASI gives the guest its errors
/// as values, and refusals (limits, tables, copy budgets) are classified above.
pub(crate) fn host_resource_failure(e: &wasmtime::Error) -> Option<String> {
    e.chain()
        .find(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some()
                || cause.to_string().contains("(os error ")
        })
        .map(|_| format!("{e:#}"))
}

/// How much of the guest's stderr a trap error carries: enough for a panic message.
const GUEST_STDERR_TAIL_BYTES: usize = 4096;

/// The trap in wasmtime's words ("wasm trap: call stack exhausted"); the full guest backtrace
/// goes to the debug log (`WASM_INFER_LOG=debug`), not into the error.
fn trap_message(e: &wasmtime::Error, code: Option<Trap>) -> String {
    tracing::debug!("guest trap: {e:?}");
    match code {
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    }
}
