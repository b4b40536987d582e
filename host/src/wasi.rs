//! The guest's view of the world: WASI with no ambient authority (no arguments, environment,
//! preopened directories, network or stdin), frozen clocks and timers on them, seeded
//! randomness bounded per call, and stdout and stderr captured into bounded logs.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable, WasmList, WasmStr};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::io::streams::StreamError as WitStreamError;
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, DynPollable, OutputStream, Pollable, StreamError, StreamResult,
};
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

/// The fuel cost model of WASI calls: each a deterministic function of the call's arguments.
/// Every linked WASI function costs at least [`cost::WASI_CALL`]; those whose work grows with
/// an argument (random bytes, stream writes and reads, the pollables of one `poll`) add a
/// charge per unit of it, taken before the work (figures: `just cost-audit`,
/// docs/cost-audit.md).
pub mod cost {
    /// Every WASI call's floor (a table lookup, a context switch into the host: about 50-100
    /// ns of host CPU).
    pub const WASI_CALL: u64 = 100;
    /// Every random-bytes call.
    pub const RANDOM_CALL: u64 = WASI_CALL;
    /// Per random byte asked for (the seeded generator: about 5 ns a byte).
    pub const RANDOM_PER_BYTE: u64 = 16;
    /// Per byte a stream call asks to move (written, read, skipped or spliced: copied once or
    /// twice, about 0.1 ns a byte).
    pub const STREAM_PER_BYTE: u64 = 1;
    /// Per entry of a `poll` list (looked up, grouped, a future made for it).
    pub const POLL_PER_POLLABLE: u64 = 100;

    /// A random-bytes call for `len` bytes.
    pub fn random(len: u64) -> u64 {
        RANDOM_CALL.saturating_add(len.saturating_mul(RANDOM_PER_BYTE))
    }
    /// A stream call that asks to move `bytes` bytes (after the per-call cap).
    pub fn stream(bytes: u64) -> u64 {
        WASI_CALL.saturating_add(bytes.saturating_mul(STREAM_PER_BYTE))
    }
    /// A `poll` of `pollables` entries.
    pub fn poll(pollables: u64) -> u64 {
        WASI_CALL.saturating_add(pollables.saturating_mul(POLL_PER_POLLABLE))
    }
}

/// Most bytes one stream call moves: a `write` or `write-zeroes` past it is refused (it is
/// the [`LOG_WRITE_PERMIT`] that `check-write` grants), a `read`, `skip` or `splice` asking
/// for more is served as if it asked for this much (WASI lets a read return fewer bytes).
pub const MAX_STREAM_BYTES_PER_CALL: u64 = LOG_WRITE_PERMIT as u64;

/// What a store must give the metered WASI functions: its WASI view, and a place to record
/// the floor of calls that go through wasmtime-wasi's own implementations, which see only the
/// store's data. The store settles that debt as the outermost host call in progress returns
/// to the guest (its `ReturningFromHost` call hook, [`settle`]).
pub(crate) trait WasiMeter: WasiView + Send + 'static {
    /// Fuel owed by WASI calls made since the last settlement.
    fn wasi_owed(&mut self) -> &mut u64;
    /// Fuel WASI calls have been charged so far in the run (for its usage).
    fn wasi_charged(&mut self) -> &mut u64;
    /// Whether the run's wall-time limit has passed (recording it for the run's result).
    fn wasi_deadline_passed(&mut self) -> bool;
}

/// Starts a WASI call whose work grows with its arguments: the run's deadline, then `fuel`
/// (a trap if either is spent), before any of the work. Each such call's work is capped
/// (1 MiB of random bytes, 64 KiB moved on a stream), so past the deadline a run goes on for
/// at most one epoch tick plus one call.
pub(crate) fn begin<T: WasiMeter>(
    store: &mut wasmtime::StoreContextMut<'_, T>,
    fuel: u64,
) -> wasmtime::Result<()> {
    if store.data_mut().wasi_deadline_passed() {
        return Err(wasmtime::Trap::Interrupt.into());
    }
    charge(store, fuel)
}

/// Takes `fuel` from the run for a WASI call, counting it in the run's WASI fuel.
fn charge<T: WasiMeter>(
    store: &mut wasmtime::StoreContextMut<'_, T>,
    fuel: u64,
) -> wasmtime::Result<()> {
    crate::accel::charge(store, fuel)?;
    let charged = store.data_mut().wasi_charged();
    *charged = charged.saturating_add(fuel);
    Ok(())
}

/// Charges the fuel that WASI calls owe (the floor of the calls that do no work in proportion
/// to their arguments); a trap when the run has not that much left.
pub(crate) fn settle<T: WasiMeter>(
    store: &mut wasmtime::StoreContextMut<'_, T>,
) -> wasmtime::Result<()> {
    let owed = std::mem::take(store.data_mut().wasi_owed());
    if owed > 0 {
        charge(store, owed)?;
    }
    Ok(())
}

/// The getters through which wasmtime-wasi's implementations reach the store: each counts
/// one call's floor ([`cost::WASI_CALL`]), so no linked function is free.
mod getters {
    use super::{cost, WasiMeter};
    use wasmtime::component::ResourceTable;
    use wasmtime_wasi::cli::{WasiCliCtxView, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocksCtxView, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystemCtxView, WasiFilesystemView};
    use wasmtime_wasi::random::WasiRandomCtx;
    use wasmtime_wasi::sockets::{WasiSocketsCtxView, WasiSocketsView};

    fn owe<T: WasiMeter>(t: &mut T) {
        let owed = t.wasi_owed();
        *owed = owed.saturating_add(cost::WASI_CALL);
    }
    pub(super) fn io<T: WasiMeter>(t: &mut T) -> &mut ResourceTable {
        owe(t);
        t.ctx().table
    }
    pub(super) fn cli<T: WasiMeter>(t: &mut T) -> WasiCliCtxView<'_> {
        owe(t);
        t.cli()
    }
    pub(super) fn clocks<T: WasiMeter>(t: &mut T) -> WasiClocksCtxView<'_> {
        owe(t);
        t.clocks()
    }
    pub(super) fn filesystem<T: WasiMeter>(t: &mut T) -> WasiFilesystemCtxView<'_> {
        owe(t);
        t.filesystem()
    }
    pub(super) fn random<T: WasiMeter>(t: &mut T) -> &mut WasiRandomCtx {
        owe(t);
        t.ctx().ctx.random()
    }
    pub(super) fn sockets<T: WasiMeter>(t: &mut T) -> WasiSocketsCtxView<'_> {
        owe(t);
        t.sockets()
    }
}

/// [`HasData`] for wasi:io: wasmtime-wasi-io implements it on the resource table.
struct Io;

impl HasData for Io {
    type Data<'a> = &'a mut ResourceTable;
}

/// Links every WASI interface wasmtime-wasi offers (its `add_to_linker_async`: the
/// `wasi:cli/imports` world), each function metered: through [`getters`] a floor per call, and
/// for the functions whose work grows with an argument a charge taken before the work
/// ([`add_metered_random`], [`add_metered_streams`], [`add_metered_poll`]), and name lookup,
/// which is off, refused after its floor without reading the name
/// ([`add_metered_name_lookup`]). The monotonic clock is the frozen one ([`add_frozen_clock`]).
pub(crate) fn add_to_linker<T: WasiMeter>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::WasiCli;
    use wasmtime_wasi::clocks::WasiClocks;
    use wasmtime_wasi::filesystem::WasiFilesystem;
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, io, random, sockets};
    use wasmtime_wasi::random::WasiRandom;
    use wasmtime_wasi::sockets::WasiSockets;
    let l = linker;
    io::error::add_to_linker::<T, Io>(l, getters::io)?;
    io::poll::add_to_linker::<T, Io>(l, getters::io)?;
    io::streams::add_to_linker::<T, Io>(l, getters::io)?;
    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, getters::clocks)?;
    filesystem::preopens::add_to_linker::<T, WasiFilesystem>(l, getters::filesystem)?;
    filesystem::types::add_to_linker::<T, WasiFilesystem>(l, getters::filesystem)?;
    random::random::add_to_linker::<T, WasiRandom>(l, getters::random)?;
    random::insecure::add_to_linker::<T, WasiRandom>(l, getters::random)?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(l, getters::random)?;
    cli::exit::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, getters::cli)?;
    sockets::tcp_create_socket::add_to_linker::<T, WasiSockets>(l, getters::sockets)?;
    sockets::instance_network::add_to_linker::<T, WasiSockets>(l, getters::sockets)?;
    sockets::network::add_to_linker::<T, WasiSockets>(l, &Default::default(), getters::sockets)?;
    sockets::ip_name_lookup::add_to_linker::<T, WasiSockets>(l, getters::sockets)?;
    sockets::tcp::add_to_linker::<T, WasiSockets>(l, getters::sockets)?;
    sockets::udp::add_to_linker::<T, WasiSockets>(l, getters::sockets)?;
    sockets::udp_create_socket::add_to_linker::<T, WasiSockets>(l, getters::sockets)?;
    add_frozen_clock(l)?;
    add_metered_random(l)?;
    add_metered_streams(l)?;
    add_metered_poll(l)?;
    add_metered_name_lookup(l)?;
    Ok(())
}

/// Links only `wasi:random` (the three interfaces), metered as in a run: what
/// pre-initialisation may call ([`crate::snapshot`]). Its generators are the run's, seeded
/// alike in every store, so the bytes a snapshot holds are the ones a run would have drawn;
/// each call costs its floor and random bytes 16 a byte, charged to the initialisation's fuel,
/// and at most [`MAX_RANDOM_BYTES_PER_CALL`] a call.
pub(crate) fn add_random_only<T: WasiMeter>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::random;
    use wasmtime_wasi::random::WasiRandom;
    random::random::add_to_linker::<T, WasiRandom>(linker, getters::random)?;
    random::insecure::add_to_linker::<T, WasiRandom>(linker, getters::random)?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(linker, getters::random)?;
    add_metered_random(linker)
}

/// Links `wasi:cli/environment` (arguments, environment variables, initial directory) for
/// pre-initialisation ([`crate::snapshot`]): a run's are empty ([`no_authority`]), and so are
/// initialisation's, so a library that reads a variable while the model is built (candle's
/// `QMatMul` reads `CANDLE_DEQUANTIZE_ALL` once and caches it) finds in the snapshot what a run
/// would have found. Each call costs the WASI floor.
pub(crate) fn add_environment_only<T: WasiMeter>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::WasiCli;
    use wasmtime_wasi::p2::bindings::cli;
    cli::environment::add_to_linker::<T, WasiCli>(linker, getters::cli)
}

/// Replaces wasmtime-wasi's `get-random-bytes` and `get-insecure-random-bytes` (which cost the
/// guest no fuel however many bytes it asks for) with the same generators behind a charge of
/// [`cost::random`], taken before the bytes are made; past [`MAX_RANDOM_BYTES_PER_CALL`] the
/// call traps as before.
pub(crate) fn add_metered_random<T: WasiMeter>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::random::{insecure, random};
    linker.allow_shadowing(true);
    let linked = (|| -> wasmtime::Result<()> {
        linker.instance("wasi:random/random@0.2.12")?.func_wrap(
            "get-random-bytes",
            |mut store: wasmtime::StoreContextMut<'_, T>, (len,): (u64,)| {
                begin(&mut store, cost::random(len))?;
                let ctx = store.data_mut().ctx().ctx.random();
                Ok((random::Host::get_random_bytes(ctx, len)?,))
            },
        )?;
        linker.instance("wasi:random/insecure@0.2.12")?.func_wrap(
            "get-insecure-random-bytes",
            |mut store: wasmtime::StoreContextMut<'_, T>, (len,): (u64,)| {
                begin(&mut store, cost::random(len))?;
                let ctx = store.data_mut().ctx().ctx.random();
                Ok((insecure::Host::get_insecure_random_bytes(ctx, len)?,))
            },
        )?;
        Ok(())
    })();
    linker.allow_shadowing(false);
    linked
}

type Store<'a, T> = wasmtime::StoreContextMut<'a, T>;
type StreamAnswer<R> = wasmtime::Result<(Result<R, WitStreamError>,)>;
type Boxed<'a, R> = Box<dyn std::future::Future<Output = StreamAnswer<R>> + Send + 'a>;

/// A stream result as the guest sees it (a trap stays a trap).
fn answer<R>(table: &mut ResourceTable, result: StreamResult<R>) -> StreamAnswer<R> {
    use wasmtime_wasi::p2::bindings::io::streams::Host;
    match result {
        Ok(r) => Ok((Ok(r),)),
        Err(e) => Ok((Err(table.convert_stream_error(e)?),)),
    }
}

/// Replaces wasi:io/streams' functions that move a guest-chosen number of bytes with the same
/// implementations behind a charge of [`cost::stream`], taken before any byte moves: `write`
/// and `write-zeroes` past what `check-write` grants trap before the bytes are copied out of
/// the guest (WASI calls that an error), the blocking forms past their 4,096 bytes likewise,
/// and reads, skips and splices are capped at [`MAX_STREAM_BYTES_PER_CALL`] and charged for
/// what they ask, whatever the stream then has.
pub(crate) fn add_metered_streams<T: WasiMeter>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::io::streams::{HostInputStream, HostOutputStream};
    let capped = |len: u64| len.min(MAX_STREAM_BYTES_PER_CALL);
    linker.allow_shadowing(true);
    let linked = (|| -> wasmtime::Result<()> {
        let mut streams = linker.instance("wasi:io/streams@0.2.12")?;
        streams.func_wrap(
            "[method]output-stream.write",
            |mut store: Store<'_, T>,
             (stream, bytes): (Resource<DynOutputStream>, WasmList<u8>)|
             -> StreamAnswer<()> {
                let table = store.data_mut().ctx().table;
                let permit = match table.get_mut(&stream)?.check_write() {
                    Ok(permit) => permit,
                    Err(e) => return answer(table, Err(e)),
                };
                if bytes.len() > permit {
                    return Err(over_permit(bytes.len(), permit));
                }
                begin(&mut store, cost::stream(bytes.len() as u64))?;
                let data = bytes.as_le_slice(&store).to_vec();
                let table = store.data_mut().ctx().table;
                let written = table.write(stream, data);
                answer(table, written)
            },
        )?;
        streams.func_wrap(
            "[method]output-stream.write-zeroes",
            |mut store: Store<'_, T>, (stream, len): (Resource<DynOutputStream>, u64)| {
                let table = store.data_mut().ctx().table;
                let permit = match table.get_mut(&stream)?.check_write() {
                    Ok(permit) => permit,
                    Err(e) => return answer(table, Err(e)),
                };
                if len > permit as u64 {
                    return Err(over_permit(len as usize, permit));
                }
                begin(&mut store, cost::stream(len))?;
                let table = store.data_mut().ctx().table;
                let written = table.write_zeroes(stream, len);
                answer(table, written)
            },
        )?;
        streams.func_wrap_async(
            "[method]output-stream.blocking-write-and-flush",
            |mut store: Store<'_, T>,
             (stream, bytes): (Resource<DynOutputStream>, WasmList<u8>)|
             -> Boxed<'_, ()> {
                let len = bytes.len();
                let data = if len > BLOCKING_WRITE_MAX {
                    Err(blocking_too_large("blocking-write-and-flush"))
                } else {
                    begin(&mut store, cost::stream(len as u64))
                        .map(|()| bytes.as_le_slice(&store).to_vec())
                };
                Box::new(async move {
                    let data = data?;
                    let table = store.data_mut().ctx().table;
                    let written = table.blocking_write_and_flush(stream, data).await;
                    answer(table, written)
                })
            },
        )?;
        streams.func_wrap_async(
            "[method]output-stream.blocking-write-zeroes-and-flush",
            |mut store: Store<'_, T>,
             (stream, len): (Resource<DynOutputStream>, u64)|
             -> Boxed<'_, ()> {
                let charged = if len > BLOCKING_WRITE_MAX as u64 {
                    Err(blocking_too_large("blocking-write-zeroes-and-flush"))
                } else {
                    begin(&mut store, cost::stream(len))
                };
                Box::new(async move {
                    charged?;
                    let table = store.data_mut().ctx().table;
                    let written = table.blocking_write_zeroes_and_flush(stream, len).await;
                    answer(table, written)
                })
            },
        )?;
        streams.func_wrap(
            "[method]output-stream.splice",
            move |mut store: Store<'_, T>,
                  (dest, src, len): (Resource<DynOutputStream>, Resource<DynInputStream>, u64)| {
                let len = capped(len);
                begin(&mut store, cost::stream(len))?;
                let table = store.data_mut().ctx().table;
                let moved = table.splice(dest, src, len);
                answer(table, moved)
            },
        )?;
        streams.func_wrap_async(
            "[method]output-stream.blocking-splice",
            move |mut store: Store<'_, T>,
                  (dest, src, len): (Resource<DynOutputStream>, Resource<DynInputStream>, u64)|
                  -> Boxed<'_, u64> {
                let len = capped(len);
                let charged = begin(&mut store, cost::stream(len));
                Box::new(async move {
                    charged?;
                    let table = store.data_mut().ctx().table;
                    let moved = table.blocking_splice(dest, src, len).await;
                    answer(table, moved)
                })
            },
        )?;
        streams.func_wrap(
            "[method]input-stream.read",
            move |mut store: Store<'_, T>, (stream, len): (Resource<DynInputStream>, u64)| {
                let len = capped(len);
                begin(&mut store, cost::stream(len))?;
                let table = store.data_mut().ctx().table;
                let read = table.read(stream, len);
                answer(table, read)
            },
        )?;
        streams.func_wrap_async(
            "[method]input-stream.blocking-read",
            move |mut store: Store<'_, T>,
                  (stream, len): (Resource<DynInputStream>, u64)|
                  -> Boxed<'_, Vec<u8>> {
                let len = capped(len);
                let charged = begin(&mut store, cost::stream(len));
                Box::new(async move {
                    charged?;
                    let table = store.data_mut().ctx().table;
                    let read = table.blocking_read(stream, len).await;
                    answer(table, read)
                })
            },
        )?;
        streams.func_wrap(
            "[method]input-stream.skip",
            move |mut store: Store<'_, T>, (stream, len): (Resource<DynInputStream>, u64)| {
                let len = capped(len);
                begin(&mut store, cost::stream(len))?;
                let table = store.data_mut().ctx().table;
                let skipped = table.skip(stream, len);
                answer(table, skipped)
            },
        )?;
        streams.func_wrap_async(
            "[method]input-stream.blocking-skip",
            move |mut store: Store<'_, T>,
                  (stream, len): (Resource<DynInputStream>, u64)|
                  -> Boxed<'_, u64> {
                let len = capped(len);
                let charged = begin(&mut store, cost::stream(len));
                Box::new(async move {
                    charged?;
                    let table = store.data_mut().ctx().table;
                    let skipped = table.blocking_skip(stream, len).await;
                    answer(table, skipped)
                })
            },
        )?;
        Ok(())
    })();
    linker.allow_shadowing(false);
    linked
}

/// Most bytes a `blocking-write-and-flush` or `blocking-write-zeroes-and-flush` may carry
/// (WASI's figure, which wasmtime-wasi enforces after copying; here before).
const BLOCKING_WRITE_MAX: usize = 4096;

fn blocking_too_large(what: &str) -> wasmtime::Error {
    wasmtime::format_err!("Buffer too large for {what} (expected at most {BLOCKING_WRITE_MAX})")
}

fn over_permit(len: usize, permit: usize) -> wasmtime::Error {
    wasmtime::format_err!(
        "a write of {len} bytes to stdout or stderr, over the {permit} bytes check-write permits"
    )
}

/// Replaces `wasi:io/poll.poll` with the same implementation behind a charge of
/// [`cost::poll`] for the list's length, taken before any pollable is looked at or the list
/// is copied out of the guest.
pub(crate) fn add_metered_poll<T: WasiMeter>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::io::poll::Host;
    linker.allow_shadowing(true);
    let linked = linker.instance("wasi:io/poll@0.2.12").and_then(|mut poll| {
        poll.func_wrap_async(
            "poll",
            |mut store: Store<'_, T>,
             (pollables,): (WasmList<Resource<DynPollable>>,)|
             -> Box<
                dyn std::future::Future<Output = wasmtime::Result<(Vec<u32>,)>> + Send + '_,
            > {
                // Charged from the list's length while the list is still in the guest's
                // memory: the host copies its entries only once they are paid for.
                let pollables = begin(&mut store, cost::poll(pollables.len() as u64))
                    .and_then(|()| pollables.iter(&mut store)?.collect());
                Box::new(async move {
                    let pollables: Vec<Resource<DynPollable>> = pollables?;
                    let table = store.data_mut().ctx().table;
                    Ok((table.poll(pollables).await?,))
                })
            },
        )
    });
    linker.allow_shadowing(false);
    linked
}

/// Replaces `wasi:sockets/ip-name-lookup.resolve-addresses`, which wasmtime-wasi implements
/// by copying the name out of the guest (and checking it is UTF-8) before it refuses it (name
/// lookup is off in every run), with one that takes the name where it lies (its bounds
/// checked, nothing copied or decoded), charges the call's floor with the run's deadline
/// checked first, checks the network handle as wasmtime-wasi does, and answers
/// `permanent-resolver-failure` as it did. The name is never read, so the floor is all the
/// call costs, whatever its length.
pub(crate) fn add_metered_name_lookup<T: WasiMeter>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::ResolveAddressStream;
    use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, Network};
    type Answer = wasmtime::Result<(Result<Resource<ResolveAddressStream>, ErrorCode>,)>;
    linker.allow_shadowing(true);
    let linked = linker
        .instance("wasi:sockets/ip-name-lookup@0.2.12")
        .and_then(|mut lookup| {
            lookup.func_wrap(
                "resolve-addresses",
                |mut store: Store<'_, T>,
                 (network, _name): (Resource<Network>, WasmStr)|
                 -> Answer {
                    begin(&mut store, cost::WASI_CALL)?;
                    store.data_mut().ctx().table.get(&network)?;
                    Ok((Err(ErrorCode::PermanentResolverFailure),))
                },
            )
        });
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
pub(crate) fn add_frozen_clock<T: WasiMeter>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked = monotonic_clock::add_to_linker::<T, FrozenClock>(linker, |state| {
        let owed = state.wasi_owed();
        *owed = owed.saturating_add(cost::WASI_CALL);
        FrozenTimers {
            table: state.ctx().table,
        }
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
