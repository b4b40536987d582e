//! The on-disk cache of compiled models, keyed by engine configuration and component bytes.
//!
//! Compiling a model takes seconds; loading its compiled form is a file map. A cache entry's
//! name is the SHA-256 of wasmtime's precompile-compatibility hash (wasmtime version, target,
//! every codegen-relevant engine setting) and of the component's bytes, so a stale or foreign
//! entry is never even looked at. The cache directory is trusted like the binary itself: its
//! entries are native code, and they are memory-mapped while a model is loaded, so they are
//! only ever replaced whole (write to a temporary file, then rename), never rewritten in place.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Adapts `Hash` (wasmtime's compatibility hash) onto SHA-256.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        unreachable!("only `write` is used")
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// SHA-256 of a component's bytes, as lowercase hex.
pub(crate) fn component_digest(wasm: &[u8]) -> String {
    hex(&Sha256::digest(wasm))
}

/// The cache key of the component with digest `component_digest` compiled by `engine`.
pub(crate) fn key(engine: &Engine, component_digest: &str) -> String {
    use std::hash::Hash;
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.0.update(component_digest.as_bytes());
    hex(&hasher.0.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn entry_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.cwasm"))
}

/// Loads a cached compilation, or `None` if there is none or it is unusable (then the caller
/// compiles and overwrites it).
pub(crate) fn load(engine: &Engine, path: &Path) -> Option<Component> {
    if !path.is_file() {
        return None;
    }
    // SAFETY: the entry was written by `store` from `Component::serialize` under a key that
    // includes this engine's compatibility hash, in a directory as trusted as this binary.
    // wasmtime still checks the header and configuration and refuses a mismatch.
    match unsafe { Component::deserialize_file(engine, path) } {
        Ok(component) => Some(component),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cache entry");
            None
        }
    }
}

/// Writes a compiled component atomically (temp file + rename), so a concurrent reader never
/// sees half an entry. Failure only costs the next load a compilation.
pub(crate) fn store(component: &Component, path: &Path) {
    match component.serialize() {
        Ok(bytes) => {
            store_bytes(&bytes, path);
        }
        Err(e) => tracing::warn!(error = %e, "could not serialise the compiled model"),
    }
}

/// Writes `bytes` to `path` atomically; `false` (and a warning) if that failed.
pub(crate) fn store_bytes(bytes: &[u8], path: &Path) -> bool {
    let result = (|| -> std::io::Result<()> {
        let dir = path.parent().expect("cache entries live in a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name().unwrap().to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = &result {
        tracing::warn!(path = %path.display(), error = %e, "could not write the compiled-model cache");
    }
    result.is_ok()
}
