//! The load worker's side of bounded compilation (`wasm-infer __load-worker`): the parent
//! side, and the why, are in [`crate::isolate`].

use std::io::{Read, Write};

use crate::error::Error;
use crate::isolate::{LoadAnswer, LoadRequest, Step};
use crate::runtime::{Runtime, RuntimeConfig};

/// The worker side: reads the request and the component from `input`, takes the step, writes
/// the answer (and the bytes that follow it) to `output`. Returns the process exit status
/// (0 when it answered).
pub fn load_worker_main(mut input: impl Read, mut output: impl Write) -> u8 {
    let mut bytes = Vec::new();
    if input.read_to_end(&mut bytes).is_err() {
        return 1;
    }
    let Some(split) = bytes.iter().position(|&b| b == b'\n') else {
        return 1;
    };
    let Ok(request) = serde_json::from_slice::<LoadRequest>(&bytes[..split]) else {
        return 1;
    };
    let wasm = &bytes[split + 1..];
    let (answer, payload) = match take_step(&request, wasm) {
        Ok((answer, payload)) => (answer, payload),
        Err(error) => (answer_for(error), Vec::new()),
    };
    let mut line = serde_json::to_vec(&answer).expect("answers serialise");
    line.push(b'\n');
    if output
        .write_all(&line)
        .and_then(|()| output.write_all(&payload))
        .and_then(|()| output.flush())
        .is_err()
    {
        return 1;
    }
    0
}

fn config(request: &LoadRequest) -> RuntimeConfig {
    RuntimeConfig {
        cache_dir: None,
        meter_fuel: request.meter_fuel,
        pool: request.pool,
        nan_canonicalization: request.nan_canonicalization,
        cpu_features: request.cpu_features,
        accel: request.accel,
        ..RuntimeConfig::default()
    }
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
            Ok((LoadAnswer::Snapshot, snapshot.wasm))
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

fn answer_for(error: Error) -> LoadAnswer {
    match error {
        Error::InvalidModel(reason) => LoadAnswer::Invalid(reason),
        Error::Limit(limit) => LoadAnswer::Limit { init: false, limit },
        Error::Init(inner) => match *inner {
            Error::Limit(limit) => LoadAnswer::Limit { init: true, limit },
            other => answer_for_other(&other),
        },
        other => answer_for_other(&other),
    }
}

fn answer_for_other(error: &Error) -> LoadAnswer {
    // An internal error's own text: the parent makes it an internal error again, whose
    // display adds the "internal error: " this one's would have carried.
    let message = match error {
        Error::Internal(message) => message.clone(),
        other => other.to_string(),
    };
    LoadAnswer::Failed {
        kind: error.kind().as_str().to_string(),
        message,
    }
}
