//! The compile worker's side of bounded compilation (`wasm-infer __load-worker`): the parent
//! side, and the why, are in [`crate::isolate`].

use std::io::{Read, Write};

use crate::error::Error;
use crate::isolate::{LoadAnswer, LoadRequest};
use crate::model::{LoadOptions, Model};
use crate::runtime::{Runtime, RuntimeConfig};

/// The worker side: reads the request and the component from `input`, loads, writes the
/// answer to `output`. Returns the process exit status (0 when it answered).
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
    let answer = match worker_load(&request, wasm) {
        Ok(()) => LoadAnswer::Loaded,
        Err(error) => answer_for(error),
    };
    let line = serde_json::to_string(&answer).expect("answers serialise");
    if writeln!(output, "{line}").is_err() {
        return 1;
    }
    0
}

fn worker_load(request: &LoadRequest, wasm: &[u8]) -> Result<(), Error> {
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(request.cache_dir.clone()),
        meter_fuel: request.meter_fuel,
        pool: request.pool,
        nan_canonicalization: request.nan_canonicalization,
        cpu_features: request.cpu_features,
        accel: request.accel,
        ..RuntimeConfig::default()
    })?;
    let options = LoadOptions {
        preinit: request.preinit,
        limits: request.limits.clone(),
        ..LoadOptions::default()
    };
    Model::from_bytes_with(&runtime, wasm, &options).map(|_| ())
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
    LoadAnswer::Failed {
        kind: error.kind().as_str().to_string(),
        message: error.to_string(),
    }
}
