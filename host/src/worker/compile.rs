//! The load worker's side of bounded compilation (`wasm-infer __load-worker`): the parent
//! side, and the why, are in [`crate::isolate`].

use std::io::{Read, Write};

use crate::error::Error;
use crate::isolate::{LoadAnswer, LoadReply, LoadRequest, Step};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::wire::{read_frame, read_raw_frame, write_frame, write_raw_frame, MAX_REQUEST_FRAME};

/// The worker side: reads the request and the component from `input`, takes the step, writes
/// the answer (and the bytes that follow it) to `output`. Returns the process exit status
/// (0 when it answered).
pub fn load_worker_main(mut input: impl Read, mut output: impl Write) -> u8 {
    crate::worker::probe_load_cgroup();
    let Ok(request) = read_frame::<LoadRequest>(&mut input, MAX_REQUEST_FRAME) else {
        return 1;
    };
    let Ok(wasm) = read_raw_frame(&mut input, MAX_REQUEST_FRAME) else {
        return 1;
    };
    let (reply, payload): (LoadReply, Vec<u8>) = match take_step(&request, &wasm) {
        Ok((answer, payload)) => (Ok(answer), payload),
        Err(error) => (Err(error.into()), Vec::new()),
    };
    let answered = write_frame(&mut output, &reply).and_then(|()| match reply {
        Ok(_) => write_raw_frame(&mut output, &payload),
        Err(_) => Ok(()),
    });
    if answered.is_err() {
        return 1;
    }
    0
}

fn config(request: &LoadRequest) -> RuntimeConfig {
    RuntimeConfig {
        cache_dir: None,
        accel: request.accel,
        ..RuntimeConfig::default()
    }
    .with_engine_settings(request.engine.clone())
}

fn take_step(request: &LoadRequest, wasm: &[u8]) -> Result<(LoadAnswer, Vec<u8>), Error> {
    match request.step {
        Step::Compile => {
            // An engine only (no runtime: no epoch ticker, no device), then the lock-down,
            // then the compiler: the untrusted input meets only a locked process.
            let engine = wasmtime::Engine::new(&config(request).engine_settings().config()?)
                .map_err(|e| Error::Internal(format!("{e:#}")))?;
            // glibc reads /proc/sys/vm/overcommit_memory the first time it shrinks a thread's
            // heap, which the compiler's threads do, and a locked process may not open it.
            // A short-lived process need not give memory back: no trimming, no shrinking.
            // SAFETY: mallopt changes a malloc parameter; no allocation is in progress here.
            unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
            crate::worker::lockdown::lock_down_compiler()
                .map_err(|e| Error::Internal(format!("locking down: {e}")))?;
            crate::worker::escape_drill("compile");
            let code = engine
                .precompile_component(wasm)
                .map_err(|e| crate::component::diagnose(wasm, &e))?;
            Ok((LoadAnswer::Compiled, code))
        }
        Step::Preinit => {
            let runtime = Runtime::with_config(config(request))?;
            // Warmed before the lock-down: the first use of the CPU backend sizes its thread
            // pool from /proc and /sys, which a locked process may not open.
            crate::accel::warm_up();
            let snapshot = crate::runtime::block_on(crate::snapshot::make_locked(
                &runtime,
                wasm,
                &request.limits,
                Some(lock),
            ))??;
            let mut wasm = snapshot.wasm;
            if let Some(kind) = poison_drill() {
                poison(&kind, &mut wasm, &request.limits).map_err(Error::Internal)?;
            }
            Ok((LoadAnswer::Snapshot, wasm))
        }
    }
}

/// The pre-initialisation child's lock-down, as a run worker's, with the test-only drill
/// (`WASM_INFER_TEST_ESCAPE`, see [`crate::worker::escape_drill`]) after it.
fn lock() -> Result<(), String> {
    crate::worker::lockdown::lock_down()?;
    crate::worker::escape_drill("preinit");
    Ok(())
}

/// The poison drill's kind, if the escape drill's variable names one: `preinit:poison-<kind>`
/// (see [`crate::wire::ESCAPE_VAR`]).
fn poison_drill() -> Option<String> {
    let drill = std::env::var(crate::wire::ESCAPE_VAR).ok()?;
    drill
        .strip_prefix("preinit:poison-")
        .map(ToString::to_string)
}

/// Tampers with a snapshot as guest code that took over this process could, for the tests:
/// `segment` moves a data segment past its memory, `memory` grows the main memory past the
/// load's memory limit, `global` changes a global's type, `code` changes a byte of code,
/// `digest` names another component in the description. The parent must refuse each.
fn poison(kind: &str, wasm: &mut [u8], limits: &crate::Limits) -> Result<(), String> {
    use wasmparser::{DataKind, Parser, Payload};
    let mut memory_min = None;
    let mut segment_offset: Option<(usize, usize)> = None;
    let mut global_type = None;
    let mut code = None;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| e.to_string())? {
            Payload::MemorySection(reader) if memory_min.is_none() => {
                if let Some(first) = reader.into_iter_with_offsets().next() {
                    // The limits' flags byte, then the initial size.
                    memory_min = Some(first.map_err(|e| e.to_string())?.0 + 1);
                }
            }
            Payload::DataSection(reader) => {
                for data in reader {
                    let data = data.map_err(|e| e.to_string())?;
                    if let DataKind::Active { offset_expr, .. } = data.kind {
                        // The `i32.const` opcode, then its immediate.
                        let at = offset_expr.get_binary_reader().original_position() + 1;
                        let width = leb_width(wasm, at);
                        if segment_offset.is_none_or(|(_, w)| width > w) {
                            segment_offset = Some((at, width));
                        }
                    }
                }
            }
            Payload::GlobalSection(reader) if global_type.is_none() => {
                if let Some(first) = reader.into_iter_with_offsets().next() {
                    global_type = Some(first.map_err(|e| e.to_string())?.0);
                }
            }
            Payload::CodeSectionStart { range, .. } if code.is_none() => code = Some(range),
            _ => {}
        }
    }
    let missing = |what: &str| format!("poison-{kind}: the snapshot has no {what}");
    match kind {
        "segment" => {
            let (at, width) = segment_offset.ok_or_else(|| missing("active data segment"))?;
            // The largest positive offset its encoding holds, at most i32::MAX.
            let value = ((1u64 << (7 * width - 1)) - 1).min(i32::MAX as u64);
            write_leb(wasm, at, value);
        }
        "memory" => {
            let at = memory_min.ok_or_else(|| missing("memory"))?;
            let width = leb_width(wasm, at);
            let value = ((limits.memory >> 16) + 1).min((1u64 << (7 * width)) - 1);
            write_leb(wasm, at, value);
        }
        "global" => {
            let at = global_type.ok_or_else(|| missing("global"))?;
            // i32 <-> i64.
            wasm[at] = if wasm[at] == 0x7f { 0x7e } else { 0x7f };
        }
        "code" => {
            let range = code.ok_or_else(|| missing("code"))?;
            wasm[range.start + range.len() / 2] ^= 1;
        }
        "digest" => {
            let key = b"\"source_sha256\":\"";
            let at = wasm
                .windows(key.len())
                .rposition(|w| w == key)
                .ok_or_else(|| missing("description"))?
                + key.len();
            let other = crate::cache::component_digest(b"another component");
            wasm[at..at + other.len()].copy_from_slice(other.as_bytes());
        }
        other => return Err(format!("no poison drill {other:?}")),
    }
    Ok(())
}

/// Bytes of the LEB128 number at `at`.
fn leb_width(wasm: &[u8], at: usize) -> usize {
    wasm[at..].iter().take_while(|&&b| b & 0x80 != 0).count() + 1
}

/// Writes `value` over the LEB128 number at `at`, in as many bytes as that one had.
fn write_leb(wasm: &mut [u8], at: usize, mut value: u64) {
    let width = leb_width(wasm, at);
    for (i, byte) in wasm[at..at + width].iter_mut().enumerate() {
        let more = if i + 1 < width { 0x80 } else { 0 };
        *byte = (value & 0x7f) as u8 | more;
        value >>= 7;
    }
}
