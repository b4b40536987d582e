//! Arbitrary bytes as a model: loading must end in `Ok` or a typed error, never a panic, and
//! the static inspection (snapshot section, imports, exports, counts) must cope with anything.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wasm_infer::{Runtime, RuntimeConfig};

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
    let _ = wasm_infer::snapshot::snapshot_info(data);
    match wasm_infer::Model::from_bytes(runtime(), data) {
        Ok(_) => {}
        Err(e) if e.kind() == wasm_infer::ErrorKind::Internal => {
            panic!("loading arbitrary bytes gave an untyped error: {e}")
        }
        Err(_) => {}
    }
});
