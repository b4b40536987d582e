//! Reading a Cargo.lock, for build.rs (and tests/codegen_patch.rs, which checks it on real
//! lockfiles).
#![allow(dead_code)] // each includer uses a subset

/// The `[[package]]` entry of `name` in a lockfile (the first, if several versions).
pub fn lock_entry<'a>(lock: &'a str, name: &str) -> Option<&'a str> {
    let header = format!("[[package]]\nname = \"{name}\"\n");
    let start = lock.find(&header)?;
    let rest = &lock[start..];
    let end = rest[1..].find("\n[[").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

/// The locked version of `name`.
pub fn locked_version(lock: &str, name: &str) -> Option<String> {
    let entry = lock_entry(lock, name)?;
    let line = entry.lines().find(|l| l.starts_with("version = "))?;
    Some(line["version = ".len()..].trim_matches('"').to_string())
}

/// Why a workspace with this lockfile does not build the vendored, patched
/// `wasmtime-internal-cranelift`, or `None` when it does: a `[patch]` cargo could not use (the
/// pinned version moved away from the vendored one), or the crate taken from the registry.
pub fn unpatched(lock: &str) -> Option<&'static str> {
    if lock.is_empty() {
        return None;
    }
    if lock.contains("[[patch.unused]]") {
        return Some("records an unused [patch]");
    }
    let entry = lock_entry(lock, "wasmtime-internal-cranelift")?;
    entry
        .contains("\nsource = ")
        .then_some("resolves wasmtime-internal-cranelift from the registry")
}
