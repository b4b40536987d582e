//! Points the component build at the GGUF it embeds: `$WASM_INFER_SMOLLM2_DIR`, default
//! `~/.cache/wasm-infer/smollm2`, which `just model` fills. Native builds (tests) read the file
//! at run time instead.
use std::path::PathBuf;

/// The weights, tokenizer and chat template, in one file (`scripts/setup.sh` verifies it).
pub const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn main() {
    println!("cargo:rerun-if-env-changed=WASM_INFER_SMOLLM2_DIR");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("wasm32") {
        return;
    }
    let dir = match std::env::var_os("WASM_INFER_SMOLLM2_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/wasm-infer/smollm2")
        }
    };
    let path = dir.join(GGUF);
    if !path.is_file() {
        panic!(
            "model file {} is missing: run `just model` (or set WASM_INFER_SMOLLM2_DIR)",
            path.display()
        );
    }
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=SMOLLM2_GGUF={}", path.display());
}
