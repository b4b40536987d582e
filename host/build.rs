//! Records the wasmtime version this build links, for the engine fingerprint that snapshots
//! carry (wasmtime has no public version constant), read from the workspace's Cargo.lock, and
//! the target triple (for `CpuFeatures::Baseline`).
fn main() {
    let lock =
        std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let mut lines = text.lines();
    let mut version = "unknown".to_string();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"wasmtime\"" {
            if let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
            {
                version = v.trim_matches('"').to_string();
            }
            break;
        }
    }
    println!("cargo:rustc-env=WASM_INFER_WASMTIME_VERSION={version}");
    // The triple this build runs on, for compiling guests to its baseline CPU features.
    println!(
        "cargo:rustc-env=WASM_INFER_TARGET={}",
        std::env::var("TARGET").unwrap()
    );
}
