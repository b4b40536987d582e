//! The guest's view of the world: WASI with no ambient authority (no arguments, environment,
//! preopened directories, network or stdin), frozen clocks and timers on them, seeded
//! randomness bounded per call, and stdout and stderr captured into bounded logs.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::random::Deterministic;
use wasmtime_wasi::{WasiCtx, WasiView};

/// Seed for the guest's random source. Rust's std seeds its `HashMap`s from WASI random; a
/// fixed seed makes every run take the same code paths and so consume the same fuel.
const RANDOM_SEED: [u8; 32] = *b"wasm-infer deterministic seed v1";

/// The wall clock the guest sees: always 2000-01-01T00:00:00Z. Real time would leak host
/// information and make runs differ.
const FIXED_WALL_CLOCK: Duration = Duration::from_secs(946_684_800);

/// Most bytes one `get-random-bytes` (or `get-insecure-random-bytes`) call may ask for: 1 MiB.
/// A larger request traps before any byte is made (wasmtime-wasi's default is 64 MiB, about
/// 350 ms of host CPU in one call that no epoch check can interrupt). Seeding a hash map takes
/// 16 bytes; a guest that wants more calls again.
pub const MAX_RANDOM_BYTES_PER_CALL: u64 = 1 << 20;

/// Fuel for `get-random-bytes` and `get-insecure-random-bytes`: a floor per call plus 16 per
/// byte, taken before any byte is made (the seeded generator costs about 5 ns of host CPU a
/// byte: `just cost-audit`).
pub mod cost {
    /// Every call.
    pub const RANDOM_CALL: u64 = 100;
    /// Per byte asked for.
    pub const RANDOM_PER_BYTE: u64 = 16;

    /// A random-bytes call for `len` bytes.
    pub fn random(len: u64) -> u64 {
        RANDOM_CALL.saturating_add(len.saturating_mul(RANDOM_PER_BYTE))
    }
}

/// Replaces wasmtime-wasi's `get-random-bytes` and `get-insecure-random-bytes` (which cost the
/// guest no fuel however many bytes it asks for) with the same generators behind a charge of
/// [`cost::random`], taken before the bytes are made; past [`MAX_RANDOM_BYTES_PER_CALL`] the
/// call traps as before.
pub(crate) fn add_metered_random<T: WasiView + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::random::{insecure, random};
    linker.allow_shadowing(true);
    let linked = (|| -> wasmtime::Result<()> {
        linker.instance("wasi:random/random@0.2.12")?.func_wrap(
            "get-random-bytes",
            |mut store: wasmtime::StoreContextMut<'_, T>, (len,): (u64,)| {
                crate::accel::charge(&mut store, cost::random(len))?;
                let ctx = store.data_mut().ctx().ctx.random();
                Ok((random::Host::get_random_bytes(ctx, len)?,))
            },
        )?;
        linker.instance("wasi:random/insecure@0.2.12")?.func_wrap(
            "get-insecure-random-bytes",
            |mut store: wasmtime::StoreContextMut<'_, T>, (len,): (u64,)| {
                crate::accel::charge(&mut store, cost::random(len))?;
                let ctx = store.data_mut().ctx().ctx.random();
                Ok((insecure::Host::get_insecure_random_bytes(ctx, len)?,))
            },
        )?;
        Ok(())
    })();
    linker.allow_shadowing(false);
    linked
}

/// The WASI context of one run, writing the guest's stdout and stderr to the given logs.
pub(crate) fn no_authority(stdout: &GuestLog, stderr: &GuestLog) -> WasiCtx {
    // No args, no env, no preopens, no network (the default socket check denies every
    // address, and name lookup is off), no stdin: only fixed clocks and seeded randomness.
    WasiCtx::builder()
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .secure_random(Deterministic::new(RANDOM_SEED.to_vec()))
        .insecure_random(Deterministic::new(RANDOM_SEED.to_vec()))
        .insecure_random_seed(u128::from_le_bytes(RANDOM_SEED[..16].try_into().unwrap()))
        .max_random_size(MAX_RANDOM_BYTES_PER_CALL)
        .wall_clock(FixedWallClock)
        .monotonic_clock(VirtualMonotonicClock)
        .allow_ip_name_lookup(false)
        .allow_tcp(false)
        .allow_udp(false)
        .build()
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

/// Replaces wasmtime-wasi's monotonic clock, whose timers (`subscribe-duration`,
/// `subscribe-instant`) fire on the host's real time, with one whose timers run on the frozen
/// clock the guest reads: now is always 0, so a timer for 0 ns (or an instant at or before 0)
/// is ready at once and any later one never is. A guest that polls a timer between units of
/// work therefore sees the same answer on every run, whatever the host's speed or load; one
/// that blocks on a future timer waits until its wall-time limit ends the run.
pub(crate) fn add_frozen_clock<T: WasiView + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked = monotonic_clock::add_to_linker::<T, FrozenClock>(linker, |state| FrozenTimers {
        table: state.ctx().table,
    });
    linker.allow_shadowing(false);
    linked
}

/// [`HasData`] for [`add_frozen_clock`]: the run's resource table, where timers live.
struct FrozenClock;

impl HasData for FrozenClock {
    type Data<'a> = FrozenTimers<'a>;
}

struct FrozenTimers<'a> {
    table: &'a mut ResourceTable,
}

impl FrozenTimers<'_> {
    fn timer(&mut self, ready: bool) -> wasmtime::Result<Resource<DynPollable>> {
        let timer = self.table.push(FrozenTimer { ready })?;
        wasmtime_wasi::p2::subscribe(self.table, timer)
    }
}

impl monotonic_clock::Host for FrozenTimers<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(VirtualMonotonicClock.now())
    }
    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(VirtualMonotonicClock.resolution())
    }
    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.timer(when <= VirtualMonotonicClock.now())
    }
    fn subscribe_duration(&mut self, duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.timer(duration == 0)
    }
}

/// A timer on the frozen clock: ready from the start, or never.
struct FrozenTimer {
    ready: bool,
}

#[async_trait::async_trait]
impl Pollable for FrozenTimer {
    async fn ready(&mut self) {
        if !self.ready {
            std::future::pending::<()>().await
        }
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

/// What `check-write` grants per call, and the most one `write` may carry: WASI says a write
/// of more than the last `check-write` granted is an error, and so it is here (the guest's
/// write traps). The write's bytes are copied out of the guest before the host sees them, so
/// this bounds that copy for a guest that asks first; the hostcall copy budget bounds it for
/// one that does not.
const LOG_WRITE_PERMIT: usize = 64 << 10;

impl GuestLog {
    pub(crate) fn new(capacity: usize) -> Self {
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
        if bytes.len() > LOG_WRITE_PERMIT {
            return Err(StreamError::Trap(wasmtime::format_err!(
                "a write of {} bytes to stdout or stderr, over the {LOG_WRITE_PERMIT} bytes \
                 check-write permits",
                bytes.len()
            )));
        }
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
