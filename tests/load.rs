//! Loading: what is accepted as a model, what is refused and how, and the compiled-code cache.

mod support;

use support::{hostile_wasm, runtime};
use wasm_infer::{CodeSource, Error, InvalidModel, Model, Runtime, RuntimeConfig};

fn invalid(result: wasm_infer::Result<Model>) -> InvalidModel {
    match result {
        Err(Error::InvalidModel(reason)) => reason,
        Err(other) => panic!("expected an invalid-model error, got {other}"),
        Ok(_) => panic!("expected an invalid-model error, the model loaded"),
    }
}

#[test]
fn bytes_that_are_not_wasm_are_refused() {
    assert_eq!(
        invalid(Model::from_bytes(runtime(), b"")),
        InvalidModel::NotWasm
    );
    assert_eq!(
        invalid(Model::from_bytes(runtime(), b"#!/bin/sh\necho")),
        InvalidModel::NotWasm
    );
}

#[test]
fn a_core_module_is_refused_as_not_a_component() {
    let core = wat::parse_str("(module (func (export \"infer\")))").unwrap();
    assert_eq!(
        invalid(Model::from_bytes(runtime(), &core)),
        InvalidModel::NotAComponent
    );
}

#[test]
fn a_truncated_component_is_malformed() {
    let bytes = std::fs::read(hostile_wasm()).unwrap();
    assert!(matches!(
        invalid(Model::from_bytes(runtime(), &bytes[..bytes.len() / 2])),
        InvalidModel::Malformed(_)
    ));
}

#[test]
fn a_component_of_another_world_is_refused() {
    // The empty component: valid, but exports neither `info` nor `infer`.
    let empty = b"\0asm\x0d\0\x01\0";
    assert!(matches!(
        invalid(Model::from_bytes(runtime(), empty)),
        InvalidModel::WrongWorld(message) if message.contains("info") || message.contains("infer")
    ));
    // Right names, wrong types.
    let wrong_types = wat::parse_str(
        r#"(component
             (core module $m (func (export "f")))
             (core instance $i (instantiate $m))
             (func $f (canon lift (core func $i "f")))
             (export "info" (func $f))
             (export "infer" (func $f)))"#,
    )
    .unwrap();
    assert!(matches!(
        invalid(Model::from_bytes(runtime(), &wrong_types)),
        InvalidModel::WrongWorld(_)
    ));
}

#[test]
fn a_component_importing_what_the_host_lacks_is_refused() {
    let component = wat::parse_str(
        r#"(component (import "evil:host/escape" (instance (export "open-door" (func)))))"#,
    )
    .unwrap();
    assert!(matches!(
        invalid(Model::from_bytes(runtime(), &component)),
        InvalidModel::UnsupportedImport(message) if message.contains("evil:host/escape")
    ));
}

#[test]
fn a_missing_file_is_an_io_error_naming_the_path() {
    match Model::load(runtime(), "/nonexistent/model.wasm") {
        Err(Error::Io { path, .. }) => assert_eq!(path.to_str(), Some("/nonexistent/model.wasm")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn compiled_code_is_cached_and_reused() {
    let dir = support::target_dir().join(format!("cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(dir.clone()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(hostile_wasm()).unwrap();
    let first = Model::from_bytes(&runtime, &bytes).unwrap();
    assert_eq!(first.load_report().code, CodeSource::Compiled);
    let entries = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(entries, 1, "one cache entry");
    let second = Model::from_bytes(&runtime, &bytes).unwrap();
    assert_eq!(second.load_report().code, CodeSource::Cached);
    assert_eq!(
        second.load_report().component_sha256,
        first.load_report().component_sha256
    );

    // A corrupt entry is ignored and rewritten, never trusted. (Loaded code is mapped from
    // its file, so entries are only ever replaced by rename, as the cache itself does; an
    // in-place rewrite under a live model would pull its pages away.)
    drop((first, second));
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let garbage = dir.join("garbage.tmp");
    std::fs::write(&garbage, b"garbage").unwrap();
    std::fs::rename(&garbage, &entry).unwrap();
    let third = Model::from_bytes(&runtime, &bytes).unwrap();
    assert_eq!(third.load_report().code, CodeSource::Compiled);
    assert!(third
        .run(
            wasm_infer::Input::Text("echo:ok".into()),
            &Default::default()
        )
        .is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
