//! Arbitrary bytes as a model: loading must end in `Ok` or a typed error, never a panic, and
//! the snapshot-section and export scanners must cope with anything.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wasm_infer::{Error, Runtime, RuntimeConfig};

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Runtime::with_config(RuntimeConfig {
            cache_dir: None,
            ..RuntimeConfig::default()
        })
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = wasm_infer::snapshot::read_info(data);
    let _ = wasm_infer::snapshot::exports_init(data);
    match wasm_infer::Model::from_bytes(runtime(), data) {
        Ok(_) | Err(Error::InvalidModel(_)) | Err(Error::Trap { .. }) | Err(Error::Init(_)) => {}
        Err(Error::Limit(_)) | Err(Error::Model { .. }) => {}
        Err(other @ (Error::Internal(_) | Error::Io { .. })) => {
            panic!("loading arbitrary bytes gave an untyped error: {other}")
        }
    }
});
