//! One run's store: its state (WASI context, memory limiter, device account, captured stdio,
//! deadline), and how a store is set up for a run's limits: the fuel budget, the hostcall copy
//! budget and the epoch callback that enforces the wall-time limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::accel::{Accel, AccelState, RunDevice};
use crate::attribution::Attribution;
use crate::error::{Error, LimitExceeded, Result};
use crate::limiter::MemoryLimiter;
use crate::limits::{Limits, DEFAULT_MAX_LOG_BYTES};
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
}

impl RunState {
    fn new(limits: &Limits, accel: Arc<Accel>) -> Self {
        let log_capacity = DEFAULT_MAX_LOG_BYTES as usize;
        let stdout = GuestLog::new(log_capacity);
        let stderr = GuestLog::new(log_capacity);
        let attribution = Attribution::default();
        Self {
            wasi: wasi::no_authority(&stdout, &stderr),
            table: ResourceTable::new(),
            device: RunDevice::new(accel, limits.device_memory, attribution.clone()),
            limiter: MemoryLimiter::new(limits.memory, attribution.clone()),
            attribution,
            stdout,
            stderr,
            deadline: Deadline::new(limits.wall_time),
            instantiated: None,
        }
    }

    /// Records that the instance now exists (for the usage's instantiation time and initial
    /// memory).
    pub(crate) fn mark_instantiated(&mut self) {
        self.instantiated = Some((Instant::now(), self.limiter.peak));
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
}

/// The fuel a store gets under `limits`. wasmtime checks fuel only at function entries and loop
/// headers, and `get_fuel` clamps at zero, so a run may end slightly past its fuel and still
/// "succeed". Giving it limit + 1 and treating a zero balance as a trip makes the cap exact: a
/// run that needs N units succeeds with `--fuel N` and fails with `--fuel N-1`.
pub(crate) fn fuel_budget(limits: &Limits) -> u64 {
    limits.fuel.map_or(u64::MAX, |f| f.saturating_add(1))
}

/// The fuel a store has used, and the fuel trip if a capped run ended with none left (0 used
/// without fuel metering).
pub(crate) fn fuel_used(store: &Store<RunState>, limits: &Limits) -> (u64, Option<LimitExceeded>) {
    let budget = fuel_budget(limits);
    let remaining = store.get_fuel().unwrap_or(budget);
    let tripped = match limits.fuel {
        Some(limit) if remaining == 0 => Some(LimitExceeded::Fuel {
            limit,
            consumed: budget,
        }),
        _ => None,
    };
    (budget - remaining, tripped)
}

/// Bytes the host may copy out of the guest in one call (its output, an accel upload, or a
/// WASI call's arguments): the larger of the output limit and the device budget (an upload
/// bigger than that is refused anyway), plus 1 MiB for the host-side list and string headers.
/// Bounds the host memory a guest can make the host allocate.
pub(crate) fn hostcall_budget(limits: &Limits) -> usize {
    let largest = limits.max_output.max(limits.device_memory);
    usize::try_from(largest.saturating_add(1 << 20)).unwrap_or(usize::MAX)
}

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
            .map_err(|e| Error::Internal(format!("{e:#}")))?;
    }
    Ok(store)
}
