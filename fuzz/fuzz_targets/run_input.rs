//! Arbitrary bytes as an input file, decoded as the CLI does and run through the `hostile`
//! test guest (whose commands are text, so the fuzzer can find `spin`, `grow`, `recurse`...)
//! under tight limits: every run must end in an output or a typed error, never a panic, and
//! never an internal error. Needs the guest built first (`just fuzz` does it).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use wasm_infer::{Error, Input, Limits, Model, Runtime, RuntimeConfig};

static HOSTILE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/wasm32-wasip2/release/hostile.wasm"
));

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: None,
            ..RuntimeConfig::default()
        })
        .unwrap();
        Model::from_bytes(&runtime, HOSTILE).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default()
        .fuel(20_000_000)
        .memory(64 << 20)
        .wall_time(Duration::from_millis(200))
        .max_input(64 << 10)
        .max_output(64 << 10);
    let Ok(input) = Input::from_lines(data.to_vec()) else {
        return;
    };
    // Each line as a single text too (the guest's commands take one text).
    let single = match &input {
        Input::Texts(texts) => texts.first().cloned().map(Input::Text),
        _ => None,
    };
    for input in std::iter::once(input).chain(single) {
        if let Err(failure) = model().run(input, &limits) {
            if let Error::Internal(message) = failure.error {
                panic!("internal error on fuzzed input: {message}");
            }
        }
    }
});
