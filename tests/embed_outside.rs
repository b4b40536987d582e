//! The library embedded from outside this workspace, as a user's application would:
//! `host/examples/embed-outside` (its own `[workspace]`, the host library by path, none of this
//! workspace's `[patch]`) is copied into an empty directory outside the repository, built with
//! cargo and run on MiniLM. It builds against the stock Cranelift (the build says so, and so
//! does the binary), and its embedding matches the independent reference, its bits the
//! in-workspace library's, and its fuel and peak memory the golden figures: the patch changes
//! code generation only, never results or fuel (docs/library.md#outside-this-workspace).
//!
//! The build shares this checkout's target directory (`$CARGO_TARGET_DIR`), with the
//! workspace's lockfile and release profile, so it reuses the dependencies already compiled
//! with the same features and rebuilds what sits above the unpatched code generator:
//! wasmtime-internal-cranelift, wasmtime, wasmtime-wasi(-io), wasmtime-wizer, the host library
//! and the example (3m24s on a shared 2-core VM where `cargo build` had built the rest). Where
//! only `cargo test` built the target, a few crates whose features the test dependencies
//! widen (wasmparser, semver) and their dependents may be rebuilt too.

mod support;

use std::process::Command;

use support::{
    assert_golden, cache_dir, case, cosine, embedding_bits, empty_dir, minilm, minilm_wasm, stderr,
    target_dir, workspace_root,
};
use wasm_infer::{Input, Limits};

/// What the build prints when the library is compiled without the patch (host/build.rs).
const UNPATCHED_WARNING: &str = "wasm-infer is built without its code-generation patch";

/// The reference embeddings' bound, as tests/embeddings.rs holds the in-workspace library to.
const MIN_COSINE_VS_REFERENCE: f64 = 0.9999;

#[test]
fn an_application_outside_the_workspace_builds_unpatched_and_embeds_exactly_as_the_library_does() {
    let example = workspace_root().join("host/examples/embed-outside");
    let host = workspace_root().join("host").canonicalize().unwrap();
    let manifest = std::fs::read_to_string(example.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\n[workspace]\n"),
        "a workspace of its own"
    );
    assert!(!manifest.contains("\n[patch"), "no [patch]: {manifest}");
    let dependency = "wasm-infer = { path = \"../..\" }";
    assert!(manifest.contains(dependency), "{manifest}");
    let manifest = manifest.replace(
        dependency,
        &format!("wasm-infer = {{ path = \"{}\" }}", host.display()),
    );

    // An empty directory outside the repository: no .cargo/config.toml of this checkout (or
    // of a directory above it) applies, as for a user's application.
    let app = empty_dir("embed-outside");
    std::fs::create_dir(app.join("src")).unwrap();
    std::fs::write(app.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(example.join("src/main.rs"), app.join("src/main.rs")).unwrap();
    for file in ["Cargo.lock", "rust-toolchain.toml"] {
        std::fs::copy(workspace_root().join(file), app.join(file)).unwrap();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = |offline: bool| {
        let mut command = Command::new(&cargo);
        command
            .current_dir(&app)
            .env("CARGO_TARGET_DIR", target_dir())
            .args(["build", "--release"]);
        if offline {
            command.arg("--offline");
        }
        command.output().unwrap()
    };
    // The registry's (unpatched) wasmtime-internal-cranelift is not one of the workspace's
    // dependencies: offline when it is in cargo's cache, else fetched.
    let mut built = build(true);
    if !built.status.success() {
        built = build(false);
    }
    assert!(built.status.success(), "cargo build: {}", stderr(&built));
    assert!(
        stderr(&built).contains(UNPATCHED_WARNING),
        "the library was built with the patch: {}",
        stderr(&built)
    );
    let lock = std::fs::read_to_string(app.join("Cargo.lock")).unwrap();
    let cranelift = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"wasmtime-internal-cranelift\""))
        .expect("wasmtime-internal-cranelift in the application's lockfile");
    assert!(
        cranelift.contains("source = \"registry+"),
        "the registry's crate: {cranelift}"
    );

    let text = case("short_bench").text;
    let ran = Command::new(target_dir().join("release/embed-outside"))
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .arg(minilm_wasm())
        .arg(&text)
        .output()
        .unwrap();
    assert!(ran.status.success(), "{}", stderr(&ran));
    let report: serde_json::Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_eq!(report["model"], "all-MiniLM-L6-v2");
    assert_eq!(report["codegen_patch"], "absent");
    let embedding: Vec<f32> = serde_json::from_value(report["embedding"].clone()).unwrap();
    assert_eq!(embedding.len(), 384);
    let similarity = cosine(&embedding, &case("short_bench").embedding);
    assert!(
        similarity >= MIN_COSINE_VS_REFERENCE,
        "cosine {similarity} against the reference"
    );
    // The same bits as this workspace's (patched) library gives for the same text.
    let here = minilm().run(Input::Text(text), &Limits::default()).unwrap();
    assert_eq!(
        embedding_bits(&[embedding]),
        embedding_bits(&here.output.embeddings().unwrap()[..1])
    );
    let fuel = report["usage"]["fuel_consumed"].as_u64().unwrap();
    let peak = report["usage"]["peak_memory_bytes"].as_u64().unwrap();
    assert_eq!(fuel, here.usage.fuel_consumed);
    assert_golden("minilm_short_bench", fuel);
    assert_golden("minilm_short_bench_peak_memory", peak);

    std::fs::remove_dir_all(&app).unwrap();
}
