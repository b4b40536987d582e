//! One run's store: its state (WASI context, memory limiter, device account, captured stdio,
//! deadline), and how a store is set up for a run's limits: the fuel budget, the hostcall copy
//! budget and the epoch callback that enforces the wall-time limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{CallHook, Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::accel::{Accel, AccelState, RunDevice};
use crate::attribution::Attribution;
use crate::error::{Error, LimitExceeded, Result};
use crate::limiter::MemoryLimiter;
use crate::limits::{Limits, DEFAULT_MAX_LOG_BYTES, MAX_HANDLES};
use crate::wasi::{self, GuestLog};

/// A run's wall-time limit, measured from the moment the run started. The epoch callback and
/// the accelerator's per-call check both ask it, and the first to see it passed records when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    started: Instant,
    limit: Duration,
    passed: Option<Duration>,
}

impl Deadline {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            started: Instant::now(),
            limit,
            passed: None,
        }
    }

    /// Whether the limit has passed; the first time it has, records the elapsed time.
    pub(crate) fn check(&mut self) -> bool {
        if self.passed.is_none() {
            let elapsed = self.started.elapsed();
            if elapsed >= self.limit {
                self.passed = Some(elapsed);
            }
        }
        self.passed.is_some()
    }

    /// The trip, if the limit was seen to pass.
    pub(crate) fn tripped(&self) -> Option<LimitExceeded> {
        self.passed.map(|elapsed| self.exceeded(elapsed))
    }

    /// The trip after `elapsed`.
    pub(crate) fn exceeded(&self, elapsed: Duration) -> LimitExceeded {
        LimitExceeded::WallTime {
            limit: self.limit,
            elapsed,
        }
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// The latest moment a run may still be going: the limit plus one epoch tick, the time the
    /// epoch callback needs to notice. Past it, the host stops waiting on the run at all (it is
    /// blocked in a host call, where no epoch check happens).
    pub(crate) fn hard_stop(&self, tick: Duration) -> Instant {
        self.started + self.limit + tick
    }
}

/// Everything a run's `Store` holds.
pub(crate) struct RunState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// This run's account on the accelerator (returns its bytes to the pool when dropped).
    pub(crate) device: RunDevice,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) attribution: Attribution,
    pub(crate) stdout: GuestLog,
    pub(crate) stderr: GuestLog,
    pub(crate) deadline: Deadline,
    /// When instantiation finished and the memory it took (set by the call's body).
    pub(crate) instantiated: Option<(Instant, u64)>,
    /// How much the host may copy out of the guest (see [`CopyBudgets`]).
    copy_budgets: CopyBudgets,
    /// Fuel owed by the WASI calls now in progress (see [`wasi::WasiMeter`]).
    wasi_owed: u64,
    /// Host calls in progress, nested ones included (see the call hook in [`new_store`]).
    host_calls: u32,
    /// Fuel WASI calls have been charged (reported as [`Usage::wasi_fuel`](crate::Usage)).
    pub(crate) wasi_fuel: u64,
    /// What a generation has streamed so far (`generate.rs`).
    pub(crate) stream: crate::sink::Stream,
}

/// How many bytes the host may copy out of the guest, and so allocate for it, in one crossing
/// (wasmtime's "hostcall fuel", which counts list and string bytes and 24 bytes of header for
/// every list it builds). Two budgets, switched by a call hook as control crosses: one for the
/// guest's calls into the host while it runs, one for the result it returns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyBudgets {
    /// Each host call the guest makes (an accelerator upload, a WASI write):
    /// [`hostcall_budget`].
    pub(crate) calls: usize,
    /// The value the guest returns (its output, its info): [`result_budget`].
    pub(crate) result: usize,
    /// Whether control is back with the host (copying a result) rather than in the guest.
    pub(crate) returned: bool,
}

impl CopyBudgets {
    /// The budget that applies now.
    pub(crate) fn current(&self) -> usize {
        if self.returned {
            self.result
        } else {
            self.calls
        }
    }
}

impl RunState {
    fn new(limits: &Limits, accel: Arc<Accel>) -> Self {
        let log_capacity = DEFAULT_MAX_LOG_BYTES as usize;
        let stdout = GuestLog::new(log_capacity);
        let stderr = GuestLog::new(log_capacity);
        let attribution = Attribution::default();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HANDLES as usize);
        Self {
            wasi: wasi::no_authority(&stdout, &stderr),
            table,
            device: RunDevice::new(
                accel,
                limits.device_memory,
                limits.device == crate::limits::DeviceAccess::Hidden,
                attribution.clone(),
            ),
            limiter: MemoryLimiter::new(limits.memory, attribution.clone()),
            attribution,
            stdout,
            stderr,
            deadline: Deadline::new(limits.wall_time),
            instantiated: None,
            copy_budgets: CopyBudgets {
                calls: hostcall_budget(limits),
                result: result_budget(limits),
                returned: false,
            },
            wasi_owed: 0,
            host_calls: 0,
            wasi_fuel: 0,
            stream: crate::sink::Stream {
                max_output: limits.max_output,
                ..Default::default()
            },
        }
    }

    /// Records that the instance now exists (for the usage's instantiation time and initial
    /// memory).
    pub(crate) fn mark_instantiated(&mut self) {
        self.instantiated = Some((Instant::now(), self.limiter.peak));
    }

    /// Sets the copy budget of the value the guest returns to `bytes` (a model's info is
    /// allowed less than an output; a snapshot's own read of the memories is not limited).
    pub(crate) fn limit_result_copy(&mut self, bytes: usize) {
        self.copy_budgets.result = bytes;
    }

    /// The copy budget that applies now (the one a refused copy ran past).
    pub(crate) fn copy_budget(&self) -> usize {
        self.copy_budgets.current()
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasi::WasiMeter for RunState {
    fn wasi_owed(&mut self) -> &mut u64 {
        &mut self.wasi_owed
    }
    fn wasi_charged(&mut self) -> &mut u64 {
        &mut self.wasi_fuel
    }
    fn wasi_deadline_passed(&mut self) -> bool {
        self.deadline.check()
    }
}

impl AccelState for RunState {
    fn device(&mut self) -> &mut RunDevice {
        &mut self.device
    }
    fn tensors(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
    fn deadline_passed(&mut self) -> bool {
        self.deadline.check()
    }
    fn deadline_at(&mut self) -> Instant {
        self.deadline.started() + self.deadline.limit
    }
}

/// The fuel a store gets under `limits`. wasmtime checks fuel only at function entries and loop
/// headers, and `get_fuel` clamps at zero, so a run may end slightly past its fuel and still
/// "succeed". Giving it limit + 1 and treating a zero balance as a trip makes the cap exact: a
/// run that needs N units succeeds with `--fuel N` and fails with `--fuel N-1`.
pub(crate) fn fuel_budget(limits: &Limits) -> u64 {
    limits.fuel.map_or(u64::MAX, |f| f.saturating_add(1))
}

/// The fuel trip of a capped run (`None` when the run has no fuel cap): the one place it is
/// built. A run that trips has used its whole budget, the cap plus the unit whose lack tripped.
pub(crate) fn fuel_exceeded(limits: &Limits) -> Option<LimitExceeded> {
    limits.fuel.map(|limit| LimitExceeded::Fuel {
        limit,
        consumed: fuel_budget(limits),
    })
}

/// The fuel a store has used, and the fuel trip if a capped run ended with none left (0 used
/// without fuel metering). Read once per run.
pub(crate) fn fuel_used(store: &Store<RunState>, limits: &Limits) -> (u64, Option<LimitExceeded>) {
    let budget = fuel_budget(limits);
    let remaining = store.get_fuel().unwrap_or(budget);
    let tripped = if remaining == 0 {
        fuel_exceeded(limits)
    } else {
        None
    };
    (budget - remaining, tripped)
}

/// Bytes the host may copy out of the guest in one host call it makes (an accel upload, a
/// WASI call's arguments): the larger of the output limit and the device budget (an upload
/// bigger than that is refused anyway), plus 1 MiB for the host-side list and string headers.
pub(crate) fn hostcall_budget(limits: &Limits) -> usize {
    let largest = limits.max_output.max(limits.device_memory);
    usize::try_from(largest.saturating_add(1 << 20)).unwrap_or(usize::MAX)
}

/// Bytes the host may copy out of the guest for the result of a call: three times the output
/// limit, plus 1 MiB. Any output within the limit fits (the host's copy of an embeddings
/// output costs 24 bytes a vector where the limit counts 8, and 4 a float as the limit does),
/// so whatever this stops is over the limit; and the host never builds more than this for a
/// result, however the guest shapes it (ten million empty vectors are 240 MB of headers).
pub(crate) fn result_budget(limits: &Limits) -> usize {
    let bytes = limits.max_output.saturating_mul(3).saturating_add(1 << 20);
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// How much fuel a run may burn between two points where the count it reports is brought up
/// to date: 10 million units, about 10 ms of compute here. Compiled wasm keeps its fuel in a
/// register and writes it back only at calls, returns and fuel checks, not at the epoch check
/// that stops a run at its deadline, so a loop without calls stopped by wall time would report
/// only the fuel of its last call. Yielding on fuel every interval writes the count back: a run
/// stopped by wall time reports what it burnt, less at most this much. (Fuel figures of runs
/// that finish are exact either way; the interval changes no figure, only when the executor
/// gets a turn.)
pub(crate) const FUEL_FLUSH_INTERVAL: u64 = 10_000_000;

/// A fresh store for one run: its own WASI context, memory limiter, device account, fuel
/// ([`fuel_budget`]) and deadline, and a wall-time check at every epoch tick that also yields
/// to the executor. A fuel cap on an engine without fuel metering is refused.
pub(crate) fn new_store(
    engine: &Engine,
    accel: Arc<Accel>,
    meter_fuel: bool,
    limits: &Limits,
) -> Result<Store<RunState>> {
    if !meter_fuel && limits.fuel.is_some() {
        return Err(Error::Config(
            "a fuel limit needs a runtime with fuel metering (RuntimeConfig::meter_fuel)".into(),
        ));
    }
    let mut store = Store::new(engine, RunState::new(limits, accel));
    store.limiter(|state| &mut state.limiter);
    store.set_hostcall_fuel(hostcall_budget(limits));
    // wasmtime reads the store's copy budget when it starts copying out of the guest.
    // A call into the host gets the calls budget; wasm returning to the host (the export's
    // result, or the guest's allocator called back while the host hands it a result) gets
    // the result budget, until the guest calls the host again.
    // A WASI call's floor (recorded by the call, see `wasi::WasiMeter`) is charged as the
    // outermost host call in progress returns, never as a nested one does. Host calls nest:
    // a WASI result is lowered through the guest's allocator, whose `memory.grow` or epoch
    // check is a libcall with these hooks of its own, made while that wasm function still
    // holds its fuel count in a register. A charge there re-split a stale count between the
    // active counter and the reserve, and the function's next flush counted the fuel used
    // since the last refill twice. When the outermost call returns, every wasm frame has
    // flushed its count.
    store.call_hook(|mut ctx, hook| {
        let returned = match hook {
            CallHook::CallingHost => {
                ctx.data_mut().host_calls += 1;
                false
            }
            CallHook::ReturningFromWasm => true,
            CallHook::ReturningFromHost => {
                let calls = &mut ctx.data_mut().host_calls;
                *calls = calls.saturating_sub(1);
                if *calls > 0 {
                    return Ok(());
                }
                return wasi::settle(&mut ctx);
            }
            CallHook::CallingWasm => return Ok(()),
        };
        let budgets = &mut ctx.data_mut().copy_budgets;
        budgets.returned = returned;
        let budget = budgets.current();
        ctx.set_hostcall_fuel(budget);
        Ok(())
    });
    // Handles of guest-defined resources count here; host resources in the state's table.
    store.set_max_component_handles(MAX_HANDLES as usize);
    store.epoch_deadline_callback(|mut ctx| {
        if ctx.data_mut().deadline.check() {
            Ok(UpdateDeadline::Interrupt)
        } else {
            // Let other tasks on this executor thread run, then check again next tick.
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store.set_epoch_deadline(1);
    if meter_fuel {
        store
            .set_fuel(fuel_budget(limits))
            .and_then(|()| store.fuel_async_yield_interval(Some(FUEL_FLUSH_INTERVAL)))
            .map_err(|e| Error::Internal(format!("{e:#}")))?;
    }
    Ok(store)
}

impl crate::sink::Streams for RunState {
    fn deadline_passed(&mut self) -> bool {
        self.deadline.check()
    }
    fn stream(&mut self) -> &mut crate::sink::Stream {
        &mut self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::AccelMode;
    use crate::wasi::{begin, cost, WasiMeter, MAX_RANDOM_BYTES_PER_CALL};
    use wasmtime::AsContextMut;

    /// A store as a run has it, under `limits`.
    fn store(limits: &Limits) -> wasmtime::Store<RunState> {
        // A run's engine as far as a store needs it (no code is compiled here).
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true).epoch_interruption(true);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let accel = Arc::new(Accel::new(AccelMode::Off, 0).unwrap());
        new_store(&engine, accel, true, limits).unwrap()
    }

    /// The gate every WASI call whose work grows with its arguments passes first (random
    /// bytes, stream writes, reads, skips, splices, `poll`): a call that begins past the
    /// run's deadline is an interrupt before it takes fuel or does any work, and the same
    /// call before the deadline takes exactly its charge.
    #[test]
    fn a_wasi_call_begun_past_the_deadline_takes_nothing_and_does_nothing() {
        let charge = cost::random(MAX_RANDOM_BYTES_PER_CALL);
        assert_eq!(charge, 100 + 16 * (1 << 20));
        // A wall-time limit of zero has passed when the call begins.
        let limits = Limits::default().fuel(20_000_000).wall_time(Duration::ZERO);
        let mut past = store(&limits);
        let refused = begin(&mut past.as_context_mut(), charge).unwrap_err();
        assert_eq!(
            refused.downcast_ref::<wasmtime::Trap>(),
            Some(&wasmtime::Trap::Interrupt)
        );
        assert_eq!(past.get_fuel().unwrap(), 20_000_001, "no fuel taken");
        assert_eq!(*past.data_mut().wasi_charged(), 0);
        assert!(matches!(
            past.data_mut().deadline.tripped(),
            Some(LimitExceeded::WallTime {
                limit: Duration::ZERO,
                ..
            })
        ));
        // Before the deadline: the call's charge, to the unit.
        let mut before = store(&limits.clone().wall_time(Duration::from_secs(3600)));
        begin(&mut before.as_context_mut(), charge).unwrap();
        assert_eq!(before.get_fuel().unwrap(), 20_000_001 - charge);
        assert_eq!(*before.data_mut().wasi_charged(), charge);
    }

    /// `run` spins, then calls the host's `owe`, which owes `floor` as a WASI call does and
    /// calls back into `grow` before it returns, as wasmtime lowers a WASI call's result
    /// through the guest's allocator; `grow` spins and grows memory, a libcall with call
    /// hooks of its own, nested in `owe`.
    const NESTED: &str = r#"(module
      (import "host" "owe" (func $owe))
      (memory 1)
      (func (export "grow")
        (local $i i32)
        (local.set $i (i32.const 100))
        (loop $l (br_if $l (local.tee $i (i32.sub (local.get $i) (i32.const 1)))))
        (drop (memory.grow (i32.const 1))))
      (func (export "run")
        (local $i i32)
        (local.set $i (i32.const 10000))
        (loop $l (br_if $l (local.tee $i (i32.sub (local.get $i) (i32.const 1)))))
        (call $owe)))"#;

    /// The fuel [`NESTED`]'s `run` uses in a run's store when `owe` owes `floor`.
    fn fuel_of_nested(floor: u64) -> u64 {
        let limits = Limits::default()
            .fuel(20_000_000)
            .wall_time(Duration::from_secs(3600));
        let mut store = store(&limits);
        let before = store.get_fuel().unwrap();
        let module = wasmtime::Module::new(store.engine(), NESTED).unwrap();
        let mut linker = wasmtime::Linker::<RunState>::new(store.engine());
        linker
            .func_wrap_async("host", "owe", move |mut caller, (): ()| {
                Box::new(async move {
                    *caller.data_mut().wasi_owed() += floor;
                    let grow = caller.get_export("grow").unwrap().into_func().unwrap();
                    grow.call_async(&mut caller, &[], &mut []).await
                })
            })
            .unwrap();
        futures::executor::block_on(async {
            let instance = linker.instantiate_async(&mut store, &module).await?;
            let run = instance.get_typed_func::<(), ()>(&mut store, "run")?;
            run.call_async(&mut store, ()).await
        })
        .unwrap();
        before - store.get_fuel().unwrap()
    }

    /// What a WASI call owes is charged as the outermost host call returns, not in a libcall
    /// nested in it: there the nested function's fuel count is still in a register, and a
    /// charge re-split that stale count, so the run's fuel until then was counted twice.
    #[test]
    fn a_floor_owed_by_a_host_call_is_charged_once_its_nested_calls_are_done() {
        assert_eq!(fuel_of_nested(100), fuel_of_nested(0) + 100);
    }
}
