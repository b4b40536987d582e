//! The on-disk cache of compiled models, keyed by engine configuration and component bytes,
//! with a size cap and least-recently-used eviction.
//!
//! Compiling a model takes seconds; loading its compiled form is a read and a copy. An entry's
//! name is the SHA-256 of wasmtime's precompile-compatibility hash (wasmtime version, target,
//! every codegen-relevant engine setting) and of what was compiled, so a stale or foreign entry
//! is never even looked at. An entry is `<key>.cwasm` (native code), plus `<key>.json` when it
//! is a pre-initialised snapshot (its description). Only the process that owns the cache writes
//! it (a compile or pre-initialisation child hands its result back over a pipe), and only
//! models that passed the load checks before compilation are written.
//!
//! Entries are native code, so nothing in the directory is taken on trust: the directory must
//! be private to this user (mode 0700, checked when a runtime opens it; refused if looser),
//! files are written 0600, and every file carries an HMAC-SHA256 of its name and contents under
//! a per-host key kept outside the directory (`<dir>.key`, 32 random bytes, created 0600 on
//! first use). A load reads the whole file, checks its tag, and only then hands the bytes to
//! wasmtime, which copies them into a mapping of its own: no code is ever mapped from a file
//! another process could rewrite. An entry that fails the check is refused with an error
//! naming the cache and removed (the next load compiles it again).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::Engine;

use crate::error::Error;

/// The local change to Wasmtime's code generation (vendor/README.md) as built: the SHA-256 of
/// the patch file when the patched crate is compiled in, `absent` when it is not (build.rs).
/// Part of every cache key: code generated under another patch, or none, is never reused.
pub const CODEGEN_PATCH: &str = env!("WASM_INFER_CODEGEN_PATCH");

/// SHA-256 of a component's bytes, as lowercase hex.
pub(crate) fn component_digest(wasm: &[u8]) -> String {
    format!("{:x}", Sha256::digest(wasm))
}

/// What every entry file starts with: a format tag, then the 32-byte HMAC, then the payload.
const ENTRY_MAGIC: &[u8; 8] = b"wi-mac1\0";
const TAG_BYTES: usize = 32;
const HEADER_BYTES: usize = ENTRY_MAGIC.len() + TAG_BYTES;

/// The per-host key that authenticates cache entries.
#[derive(Clone)]
pub(crate) struct CacheKey(std::sync::Arc<[u8; 32]>);

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(..)")
    }
}

impl CacheKey {
    /// The tag of the file named `name` holding `payload`: the name is covered, so that an
    /// entry cannot be passed off as another (a valid entry of one model under another's key).
    fn tag(&self, name: &str, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..]).expect("any key length");
        mac.update(b"wasm-infer cache entry\0");
        mac.update(name.as_bytes());
        mac.update(b"\0");
        mac.update(payload);
        mac
    }
}

/// A cache directory and its size cap.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: Option<u64>,
    key: Option<CacheKey>,
}

/// The file beside `dir` that holds its key: `<dir>.key`.
pub fn key_path(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map_or_else(|| "cache".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!("{name}.key"))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no failure mode and touches no memory.
    unsafe { libc::geteuid() }
}

/// Creates the cache directory (0700) if it is missing, refuses one that is not private to
/// this user, and reads (or creates) its key.
pub(crate) fn open(dir: &Path) -> Result<CacheKey, Error> {
    open_private(dir).map_err(host_resource)
}

/// The host's own resources running out (file descriptors, memory) while the cache is read is
/// the host's failure (`internal`), not something wrong with the cache or the model.
pub(crate) fn host_resource(error: Error) -> Error {
    match error {
        Error::Io { path, error }
            if matches!(
                error.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
            ) =>
        {
            Error::Internal(format!(
                "the host ran out of a resource: {}: {error}",
                path.display()
            ))
        }
        other => other,
    }
}

fn open_private(dir: &Path) -> Result<CacheKey, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| Error::Io { path, error }
    };
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let meta = std::fs::metadata(dir).map_err(io(dir))?;
    if !meta.is_dir() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
        return Err(Error::Config(format!(
            "the compiled-model cache {} is not private to this user (owner {}, mode {:o}; \
             expected owner {} and mode 0700): its entries are native code this process runs. \
             Make it private (`chmod 700 {}`) or choose another directory",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777,
            euid(),
            dir.display()
        )));
    }
    let path = key_path(dir);
    match read_key(&path) {
        Err(Error::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            create_key(&path)?;
            read_key(&path)
        }
        other => other,
    }
}

fn read_key(path: &Path) -> Result<CacheKey, Error> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })?;
    let meta = file.metadata().map_err(|error| Error::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let mut key = [0u8; 32];
    if !meta.is_file()
        || meta.uid() != euid()
        || meta.mode() & 0o077 != 0
        || meta.len() != key.len() as u64
        || file.read_exact(&mut key).is_err()
    {
        return Err(Error::Config(format!(
            "the compiled-model cache key {} is not a private 32-byte file of this user \
             (owner {}, mode {:o}, {} bytes); remove it (a new one is made, and the entries \
             written under the old one are compiled again)",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777,
            meta.len()
        )));
    }
    Ok(CacheKey(std::sync::Arc::new(key)))
}

/// Writes 32 random bytes to a private temporary file and links it into place; a key another
/// process linked first wins (both then read the same one).
fn create_key(path: &Path) -> Result<(), Error> {
    let io = |error| Error::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|error| Error::Io {
            path: "/dev/urandom".into(),
            error,
        })?;
    // A name of its own per call: threads of one process (runtimes made at once, the tests)
    // and processes may race to make the first key.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "key.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &key));
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    });
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(io)
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
    /// The cache in `dir`, kept under `max_bytes` if given, for listing and clearing (loading
    /// and storing need the key a [`Runtime`](crate::Runtime) reads when it opens the cache).
    pub fn new(dir: PathBuf, max_bytes: Option<u64>) -> Self {
        Self {
            dir,
            max_bytes,
            key: None,
        }
    }

    pub(crate) fn with_key(dir: PathBuf, max_bytes: Option<u64>, key: CacheKey) -> Self {
        Self {
            dir,
            max_bytes,
            key: Some(key),
        }
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
        // Entries of the authenticated format only (older, untagged ones are never read).
        hasher.0.update(ENTRY_MAGIC);
        hasher.0.update(material.as_bytes());
        self.dir.join(format!("{:x}.cwasm", hasher.0.finalize()))
    }

    /// The payload of the entry file at `path` once its tag checks out under this cache's key,
    /// or `None` if there is no such file. A file that is not ours alone (another owner, open
    /// to others), not in the entry format, or whose tag does not match is refused with an
    /// [`Error::Internal`] naming the cache, and the entry (code and description) removed.
    pub(crate) fn read_verified(&self, path: &Path) -> Result<Option<Vec<u8>>, Error> {
        let key = self.key.as_ref().ok_or_else(|| {
            Error::Internal(format!(
                "the compiled-model cache {} was opened without its key",
                self.dir.display()
            ))
        })?;
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // Out of descriptors or memory: the host's failure, and the entry stays.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                ) =>
            {
                return Err(host_resource(Error::Io {
                    path: path.to_path_buf(),
                    error,
                }))
            }
            Err(e) => return Err(self.refuse(path, &format!("cannot be opened ({e})"))),
        };
        let meta = file.metadata().map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })?;
        if !meta.is_file() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
            return Err(self.refuse(
                path,
                &format!(
                    "is not a private file of this user (owner {}, mode {:o})",
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let authentic = bytes.len() >= HEADER_BYTES
            && bytes.starts_with(ENTRY_MAGIC)
            && key
                .tag(&name, &bytes[HEADER_BYTES..])
                .verify_slice(&bytes[ENTRY_MAGIC.len()..HEADER_BYTES])
                .is_ok();
        if !authentic {
            return Err(self.refuse(
                path,
                "failed authentication (altered, or not written under this host's cache key)",
            ));
        }
        bytes.drain(..HEADER_BYTES);
        Ok(Some(bytes))
    }

    /// Removes the entry `path` belongs to and says why, naming the cache.
    fn refuse(&self, path: &Path, why: &str) -> Error {
        tracing::error!(cache = %self.dir.display(), entry = %path.display(), why, "refusing a compiled-model cache entry");
        remove(&path.with_extension("cwasm"));
        Error::Internal(format!(
            "the compiled-model cache {}: entry {} {why}; it was discarded and will be \
             compiled again",
            self.dir.display(),
            path.file_name().unwrap_or_default().to_string_lossy()
        ))
    }

    /// Marks an entry as just used (for eviction).
    pub(crate) fn touch(&self, path: &Path) {
        touch(path);
    }

    /// Writes a compiled component's serialised code (and, for a snapshot, its description
    /// first: an entry counts only once its code is there), each tagged, then evicts to the
    /// cap. Failure only costs the next load a compilation.
    pub(crate) fn store(&self, code: &[u8], path: &Path, description: Option<&[u8]>) {
        let Some(key) = &self.key else {
            return;
        };
        if let Some(json) = description {
            if !store_bytes(key, json, &path.with_extension("json")) {
                return;
            }
        }
        store_bytes(key, code, path);
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

/// Writes `payload`, tagged, to `path` atomically and private to this user; `false` (and a
/// warning) if that failed.
fn store_bytes(key: &CacheKey, payload: &[u8], path: &Path) -> bool {
    let result = (|| -> std::io::Result<()> {
        let dir = path.parent().expect("cache entries live in a directory");
        let name = path.file_name().unwrap().to_string_lossy();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let tag = key.tag(&name, payload).finalize().into_bytes();
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // A umask cannot widen the mode, but a file system could ignore it: check.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        use std::io::Write;
        file.write_all(ENTRY_MAGIC)?;
        file.write_all(&tag)?;
        file.write_all(payload)?;
        drop(file);
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
