//! The per-run store state: WASI with no ambient authority, the memory limiter, captured stdio.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::random::Deterministic;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::accel::{Accel, RunDevice};
use crate::limits::{Limits, MAX_INSTANCES, MAX_MEMORIES, MAX_TABLES, MAX_TABLE_ELEMENTS};

/// Seed for the guest's random source. Rust's std seeds its `HashMap`s from WASI random; a
/// fixed seed makes every run take the same code paths and so consume the same fuel.
const RANDOM_SEED: [u8; 32] = *b"wasm-infer deterministic seed v1";

/// The wall clock the guest sees: always 2000-01-01T00:00:00Z. Real time would leak host
/// information and make runs differ.
const FIXED_WALL_CLOCK: Duration = Duration::from_secs(946_684_800);

/// Everything a run's `Store` holds.
pub(crate) struct RunState {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    /// This run's account on the accelerator (returns its bytes to the pool when dropped).
    pub(crate) device: RunDevice,
    /// The run's wall-time limit (the accel calls check it too).
    pub(crate) wall_limit: Duration,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) stdout: GuestLog,
    pub(crate) stderr: GuestLog,
    /// When the run started; the epoch callback measures the wall-time limit from here.
    pub(crate) started: Instant,
    /// Set by the epoch callback when it stops the run for its wall-time limit.
    pub(crate) timed_out: Option<Duration>,
}

impl RunState {
    pub(crate) fn new(
        limits: &Limits,
        accel: Arc<Accel>,
        log_capacity: usize,
        started: Instant,
    ) -> Self {
        let stdout = GuestLog::new(log_capacity);
        let stderr = GuestLog::new(log_capacity);
        // No args, no env, no preopens, no network (the default socket check denies every
        // address, and name lookup is off), no stdin: only fixed clocks and seeded randomness.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .secure_random(Deterministic::new(RANDOM_SEED.to_vec()))
            .insecure_random(Deterministic::new(RANDOM_SEED.to_vec()))
            .insecure_random_seed(u128::from_le_bytes(RANDOM_SEED[..16].try_into().unwrap()))
            .wall_clock(FixedWallClock)
            .monotonic_clock(VirtualMonotonicClock)
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            device: RunDevice::new(accel, limits.device_memory),
            wall_limit: limits.wall_time,
            limiter: MemoryLimiter::new(limits.memory),
            stdout,
            stderr,
            started,
            timed_out: None,
        }
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

/// A wall clock stuck at [`FIXED_WALL_CLOCK`].
struct FixedWallClock;

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        FIXED_WALL_CLOCK
    }
}

/// A monotonic clock that never advances: the guest cannot time anything, so it can neither
/// measure side channels nor behave differently under load.
struct VirtualMonotonicClock;

impl HostMonotonicClock for VirtualMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Caps the *total* linear memory of all the guest's memories and records the first refusal,
/// so that a run whose allocator turns a refused `memory.grow` into a trap is still reported as
/// a memory-limit trip, with the size it asked for.
pub(crate) struct MemoryLimiter {
    limit: u64,
    total: u64,
    pub(crate) peak: u64,
    /// Total bytes the first refused growth would have reached.
    pub(crate) refused: Option<u64>,
    /// The growth last allowed, taken back if the grow then fails anyway.
    last_growth: u64,
    table_elements: u64,
    /// Total table elements the first refused table growth would have reached.
    pub(crate) table_refused: Option<u64>,
}

impl MemoryLimiter {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            total: 0,
            peak: 0,
            refused: None,
            last_growth: 0,
            table_elements: 0,
            table_refused: None,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let requested = self.total.saturating_add((desired - current) as u64);
        if requested > self.limit {
            self.refused.get_or_insert(requested);
            return Ok(false);
        }
        self.last_growth = requested - self.total;
        self.total = requested;
        self.peak = self.peak.max(requested);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Growth we allowed but the OS or the memory's own maximum refused: nothing was added.
        self.total -= std::mem::take(&mut self.last_growth);
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let requested = self
            .table_elements
            .saturating_add((desired - current) as u64);
        if requested > MAX_TABLE_ELEMENTS {
            self.table_refused.get_or_insert(requested);
            return Ok(false);
        }
        self.table_elements = requested;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }
    fn tables(&self) -> usize {
        MAX_TABLES
    }
    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Captures what the guest writes to stdout or stderr: keeps the first `capacity` bytes, counts
/// and discards the rest. A chatty guest therefore neither fails (its writes always succeed) nor
/// makes the host hold more than `capacity` bytes.
#[derive(Clone)]
pub(crate) struct GuestLog {
    inner: Arc<Mutex<LogBuffer>>,
}

struct LogBuffer {
    kept: Vec<u8>,
    capacity: usize,
    written: u64,
}

/// What `check-write` grants per call: any size works, since writes never block or fail.
const LOG_WRITE_PERMIT: usize = 64 << 10;

impl GuestLog {
    fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LogBuffer {
                kept: Vec::new(),
                capacity,
                written: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogBuffer> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, bytes: &[u8]) {
        let mut log = self.lock();
        let room = log.capacity - log.kept.len();
        log.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
        log.written += bytes.len() as u64;
    }

    /// The kept bytes (at most the capacity).
    pub(crate) fn contents(&self) -> Vec<u8> {
        self.lock().kept.clone()
    }

    /// Everything the guest wrote, kept or not.
    pub(crate) fn written(&self) -> u64 {
        self.lock().written
    }
}

#[async_trait::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

#[async_trait::async_trait]
impl OutputStream for GuestLog {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(LOG_WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for GuestLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}
