//! The on-disk cache of compiled models, keyed by engine configuration and component bytes,
//! with a size cap and least-recently-used eviction.
//!
//! Compiling a model takes seconds; loading its compiled form is a file map. An entry's name
//! is the SHA-256 of wasmtime's precompile-compatibility hash (wasmtime version, target, every
//! codegen-relevant engine setting) and of what was compiled, so a stale or foreign entry is
//! never even looked at. An entry is `<key>.cwasm` (native code), plus `<key>.json` when it is a
//! pre-initialised snapshot (its description). Only models that passed every load check are
//! written. The directory is trusted like the binary itself: its entries are native code,
//! memory-mapped while a model is loaded, so they are only ever replaced whole (write to a
//! temporary file, then rename) and removed by unlinking (a mapping outlives the name).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The local change to Wasmtime's code generation (vendor/README.md) as built: the SHA-256 of
/// the patch file when the patched crate is compiled in, `absent` when it is not (build.rs).
/// Part of every cache key: code generated under another patch, or none, is never reused.
pub(crate) const CODEGEN_PATCH: &str = env!("WASM_INFER_CODEGEN_PATCH");

/// SHA-256 of a component's bytes, as lowercase hex.
pub(crate) fn component_digest(wasm: &[u8]) -> String {
    format!("{:x}", Sha256::digest(wasm))
}

/// A cache directory and its size cap.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: Option<u64>,
}

/// One cached model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheEntry {
    /// The compiled code's file (`<key>.cwasm`).
    pub path: PathBuf,
    /// Bytes on disk, description included.
    pub bytes: u64,
    /// When a load last used it (or it was written).
    #[serde(serialize_with = "unix_seconds")]
    pub last_used: SystemTime,
    /// Whether it holds a pre-initialised snapshot (with its description beside it).
    pub snapshot: bool,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    s.serialize_u64(secs)
}

/// Adapts `Hash` (wasmtime's compatibility hash) onto SHA-256.
struct Sha256Hasher(Sha256);

impl std::hash::Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        unreachable!("only `write` is used")
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl Cache {
    /// The cache in `dir`, kept under `max_bytes` if given.
    pub fn new(dir: PathBuf, max_bytes: Option<u64>) -> Self {
        Self { dir, max_bytes }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the code of `material` (a component digest, or one qualified by what was done to
    /// the component) compiled by `engine` lives.
    pub(crate) fn entry(&self, engine: &Engine, material: &str) -> PathBuf {
        use std::hash::Hash;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        // Code compiled under another version of the vendored code-generation patch
        // (vendor/README.md), or without it, has the same wasmtime version and flags: correct,
        // but not this build's code. A new key recompiles it.
        hasher.0.update(b"wasm-infer codegen patch ");
        hasher.0.update(CODEGEN_PATCH.as_bytes());
        hasher.0.update(material.as_bytes());
        self.dir.join(format!("{:x}.cwasm", hasher.0.finalize()))
    }

    /// Loads a cached compilation, or `None` if there is none or it is unusable (then the
    /// caller compiles and overwrites it). A hit counts as a use for eviction.
    pub(crate) fn load(&self, engine: &Engine, path: &Path) -> Option<Component> {
        if !path.is_file() {
            return None;
        }
        // SAFETY: the entry was written by `store` from `Component::serialize` under a key that
        // includes this engine's compatibility hash, in a directory as trusted as this binary.
        // wasmtime still checks the header and configuration and refuses a mismatch.
        match unsafe { Component::deserialize_file(engine, path) } {
            Ok(component) => {
                touch(path);
                Some(component)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cache entry");
                None
            }
        }
    }

    /// Writes a compiled component (and, for a snapshot, its description first: an entry
    /// counts only once its code is there), then evicts to the cap. Failure only costs the
    /// next load a compilation.
    pub(crate) fn store(&self, component: &Component, path: &Path, description: Option<&[u8]>) {
        if let Some(json) = description {
            if !store_bytes(json, &path.with_extension("json")) {
                return;
            }
        }
        match component.serialize() {
            Ok(bytes) => {
                store_bytes(&bytes, path);
            }
            Err(e) => tracing::warn!(error = %e, "could not serialise the compiled model"),
        }
        if let Err(e) = self.evict(path) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not evict cache entries");
        }
    }

    /// Every entry, most recently used first.
    pub fn list(&self) -> std::io::Result<Vec<CacheEntry>> {
        let read = match std::fs::read_dir(&self.dir) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut entries = Vec::new();
        for item in read {
            let path = item?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("cwasm") {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // removed meanwhile
            };
            let description = std::fs::metadata(path.with_extension("json")).ok();
            entries.push(CacheEntry {
                bytes: meta.len() + description.as_ref().map_or(0, |m| m.len()),
                last_used: meta.modified()?,
                snapshot: description.is_some(),
                path,
            });
        }
        entries.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.path.cmp(&b.path)));
        Ok(entries)
    }

    /// Removes every entry; returns how many and their bytes.
    pub fn clear(&self) -> std::io::Result<(usize, u64)> {
        let entries = self.list()?;
        let bytes = entries.iter().map(|e| e.bytes).sum();
        for entry in &entries {
            remove(&entry.path);
        }
        Ok((entries.len(), bytes))
    }

    /// Removes least recently used entries until the cache fits its cap, never `keep` (the
    /// entry just written).
    fn evict(&self, keep: &Path) -> std::io::Result<()> {
        let Some(max) = self.max_bytes else {
            return Ok(());
        };
        let entries = self.list()?;
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        for entry in entries.iter().rev() {
            if total <= max {
                break;
            }
            if entry.path != keep {
                tracing::info!(path = %entry.path.display(), bytes = entry.bytes, "evicting a cache entry");
                remove(&entry.path);
                total -= entry.bytes;
            }
        }
        Ok(())
    }
}

/// Marks an entry as just used (its modification time is the cache's clock: access times are
/// often not kept).
fn touch(path: &Path) {
    let result = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|file| file.set_modified(SystemTime::now()));
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), error = %e, "could not mark a cache entry used");
    }
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("json"));
}

/// Writes `bytes` to `path` atomically; `false` (and a warning) if that failed.
fn store_bytes(bytes: &[u8], path: &Path) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(dir: &Path, name: &str, bytes: usize, age_secs: u64) -> PathBuf {
        let path = dir.join(format!("{name}.cwasm"));
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_secs);
        std::fs::File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        path
    }

    #[test]
    fn eviction_removes_least_recently_used_entries_down_to_the_cap() {
        let dir =
            std::env::temp_dir().join(format!("wasm-infer-cache-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let oldest = entry(&dir, "a", 100, 300);
        let middle = entry(&dir, "b", 100, 200);
        let newest = entry(&dir, "c", 100, 100);
        std::fs::write(middle.with_extension("json"), b"{}").unwrap();
        let cache = Cache::new(dir.clone(), Some(150));
        let listed = cache.list().unwrap();
        assert_eq!(
            listed.iter().map(|e| &e.path).collect::<Vec<_>>(),
            [&newest, &middle, &oldest]
        );
        assert_eq!(listed[1].bytes, 102);
        assert!(listed[1].snapshot);
        // The oldest entry is protected (just written): the two others go.
        cache.evict(&oldest).unwrap();
        let left: Vec<_> = cache.list().unwrap().into_iter().map(|e| e.path).collect();
        assert_eq!(left, std::slice::from_ref(&oldest));
        assert!(!middle.with_extension("json").exists());
        assert_eq!(cache.clear().unwrap(), (1, 100));
        assert!(cache.list().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
