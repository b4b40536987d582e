//! Records the wasmtime version this build links, for the engine fingerprint that snapshots
//! carry (wasmtime has no public version constant), read from the workspace's Cargo.lock, and
//! the target triple (for `CpuFeatures::Baseline`).
//!
//! It also decides what this build says about the vendored code-generation patch
//! (vendor/README.md): the patched `wasmtime-internal-cranelift` declares
//! `links = "wasm_infer_codegen_patch"`, so `DEP_WASM_INFER_CODEGEN_PATCH_APPLIED` is set here
//! exactly when the crate being compiled is the patched one.
//! - Patched: `WASM_INFER_CODEGEN_PATCH` is the SHA-256 of the patch file (the compiled-code
//!   cache key carries it, so code from another patch or none is never reused).
//! - Not patched, and this workspace's own lockfile says so (the `[patch]` went unused, or the
//!   crate resolves from the registry): the build fails with what to run. A `cargo update` or a
//!   pin moved without re-vendoring cannot silently ship the slower code generator.
//! - Not patched, built by an application that depends on this library (its lockfile, not
//!   ours, decides, and it cannot see our `[patch]`): `WASM_INFER_CODEGEN_PATCH` is `absent`,
//!   the build warns, and the runtime logs one line saying the patch is absent.
use std::path::Path;

// The lockfile reading is its own file so that tests/codegen_patch.rs can check it on real
// lockfiles.
#[path = "build/lockfile.rs"]
mod lockfile;
use lockfile::{locked_version, unpatched};

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let root = Path::new(&manifest_dir).join("..");
    let lock = root.join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let version = locked_version(&text, "wasmtime").unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=WASM_INFER_WASMTIME_VERSION={version}");
    // The triple this build runs on, for compiling guests to its baseline CPU features.
    println!(
        "cargo:rustc-env=WASM_INFER_TARGET={}",
        std::env::var("TARGET").unwrap()
    );
    codegen_patch(&root, &text);
}

fn codegen_patch(root: &Path, lock: &str) {
    let patch_file = root.join("vendor/wasmtime-internal-cranelift.patch");
    println!("cargo:rerun-if-changed={}", patch_file.display());
    println!("cargo:rerun-if-env-changed=DEP_WASM_INFER_CODEGEN_PATCH_APPLIED");
    let applied = std::env::var_os("DEP_WASM_INFER_CODEGEN_PATCH_APPLIED").is_some();
    let patch = std::fs::read(&patch_file).ok();
    if applied {
        let patch = patch.unwrap_or_else(|| {
            panic!(
                "the patched wasmtime-internal-cranelift is being built but {} is missing",
                patch_file.display()
            )
        });
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&patch);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        println!("cargo:rustc-env=WASM_INFER_CODEGEN_PATCH={hex}");
        return;
    }
    // Not the patched crate. In this workspace (its lockfile beside the patch file) that is a
    // broken update, never acceptable.
    if patch.is_some() {
        if let Some(why) = unpatched(lock) {
            panic!(
                "\n\nthe vendored code-generation patch is not applied: Cargo.lock {why}.\n\
                 The pinned wasmtime and vendor/wasmtime-internal-cranelift must be the same \
                 version: run `just vendor-update VERSION` (scripts/vendor.sh) for the version \
                 you want, then `just vendor-check`.\n\n"
            );
        }
    }
    println!(
        "cargo:warning=wasm-infer is built without its code-generation patch \
         (vendor/README.md): correct, but in-sandbox kernels run slower"
    );
    println!("cargo:rustc-env=WASM_INFER_CODEGEN_PATCH=absent");
}
