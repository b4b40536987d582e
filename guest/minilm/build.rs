//! Points the component build at the model files it embeds.
//!
//! The wasm32 component carries its weights, config and tokenizer inside itself (see
//! `src/component.rs` for why). They are read from `$WASM_INFER_MODEL_DIR`, default
//! `~/.cache/wasm-infer/model`, which `just model` fills. Native builds (tests, benchmarks)
//! load the files at run time instead and need nothing here.
use std::path::PathBuf;

const FILES: [(&str, &str); 3] = [
    ("MINILM_WEIGHTS", "model.safetensors"),
    ("MINILM_CONFIG", "config.json"),
    ("MINILM_TOKENIZER", "tokenizer.json"),
];

fn main() {
    println!("cargo:rerun-if-env-changed=WASM_INFER_MODEL_DIR");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("wasm32") {
        return;
    }
    let dir = match std::env::var_os("WASM_INFER_MODEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/wasm-infer/model")
        }
    };
    for (var, file) in FILES {
        let path = dir.join(file);
        if !path.is_file() {
            panic!(
                "model file {} is missing: run `just model` (or set WASM_INFER_MODEL_DIR)",
                path.display()
            );
        }
        println!("cargo:rerun-if-changed={}", path.display());
        println!("cargo:rustc-env={var}={}", path.display());
    }
}
