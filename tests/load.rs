//! Loading: what is accepted as a model, what is refused and how, and the compiled-code cache.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{hostile_wasm, invalid, runtime, text, wat_model, WatModel};
use wasm_infer::{
    CodeSource, Error, InvalidModel, LimitExceeded, Limits, LoadOptions, LoadPhase, Model,
    Progress, Runtime, RuntimeConfig,
};

/// A runtime with its own empty cache directory, `name`d per test.
fn fresh_runtime(name: &str, pool: Option<u32>) -> (Runtime, std::path::PathBuf) {
    let dir = support::target_dir().join(format!("cache-{name}-{}", std::process::id()));
    support::remove_cache(&dir);
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(dir.clone()),
        pool,
        ..RuntimeConfig::default()
    })
    .unwrap();
    (runtime, dir)
}

fn entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Load options whose progress is recorded in the returned list.
fn recording_phases() -> (LoadOptions, Arc<Mutex<Vec<LoadPhase>>>) {
    let phases = Arc::new(Mutex::new(Vec::new()));
    let seen = phases.clone();
    let options = LoadOptions {
        progress: Some(Progress(Arc::new(move |phase| {
            seen.lock().unwrap().push(phase)
        }))),
        ..LoadOptions::default()
    };
    (options, phases)
}

/// WIT for the two WASI functions a model needs to block for an hour in a host call.
const SLEEP_WIT: &str = r#"
package wasi:io@0.2.0 {
    interface poll {
        resource pollable {
            block: func();
        }
    }
}
package wasi:clocks@0.2.0 {
    interface monotonic-clock {
        use wasi:io/poll@0.2.0.{pollable};
        subscribe-duration: func(when: u64) -> pollable;
    }
}
"#;

/// A model whose `info` blocks in a host call for an hour (a WASI sleep): no epoch check
/// happens while it waits.
fn sleepy_info_wasm() -> Vec<u8> {
    WatModel {
        info: "(call $block (call $subscribe (i64.const 3600000000000)))",
        core_imports: r#"
            (import "wasi:clocks/monotonic-clock@0.2.0" "subscribe-duration"
                (func $subscribe (param i64) (result i32)))
            (import "wasi:io/poll@0.2.0" "[method]pollable.block" (func $block (param i32)))"#,
        wit_packages: SLEEP_WIT,
        imports: &["wasi:clocks/monotonic-clock@0.2.0"],
        ..WatModel::default()
    }
    .build()
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
    support::remove_cache(&dir);
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

    // A corrupt entry is never trusted: its load is refused naming the cache, the entry is
    // discarded, and the next load compiles it again. (A private file, so that what refuses it
    // is its authentication, not its mode.)
    drop((first, second));
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let garbage = dir.join("garbage.tmp");
    std::fs::write(&garbage, b"garbage").unwrap();
    std::fs::set_permissions(
        &garbage,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::rename(&garbage, &entry).unwrap();
    let refused = Model::from_bytes(&runtime, &bytes).unwrap_err();
    support::assert_cache_refusal(&refused, &dir, &entry);
    assert!(!entry.exists(), "the corrupt entry was kept");
    let third = Model::from_bytes(&runtime, &bytes).unwrap();
    assert_eq!(third.load_report().code, CodeSource::Compiled);
    assert!(third
        .run(
            wasm_infer::Input::Text("echo:ok".into()),
            &Default::default()
        )
        .is_ok());
    support::remove_cache(&dir);
}

#[test]
fn a_model_whose_info_blocks_in_a_host_call_fails_to_load_at_its_wall_time_limit() {
    // One pooled slot: the blocked load must give it back.
    let (runtime, dir) = fresh_runtime("sleepy", Some(1));
    let options = LoadOptions {
        limits: Limits::default().wall_time(Duration::from_millis(300)),
        ..LoadOptions::default()
    };
    let started = Instant::now();
    match Model::from_bytes_with(&runtime, &sleepy_info_wasm(), &options) {
        Err(Error::Limit(LimitExceeded::WallTime { limit, elapsed })) => {
            assert_eq!(limit, Duration::from_millis(300));
            assert!(elapsed >= limit, "{elapsed:?}");
        }
        other => panic!("expected a wall-time trip at load, got {other:?}"),
    }
    // Generous: the load ends within a tick of its limit, not after an hour.
    assert!(started.elapsed() < Duration::from_secs(20));
    // The refused model is not cached, and the slot is free for the next model.
    assert_eq!(entries(&dir), 0);
    let good = Model::load(&runtime, hostile_wasm()).expect("a good model loads after it");
    good.run(text("echo:ok"), &Limits::default()).unwrap();
    support::remove_cache(&dir);
}

#[test]
fn load_time_limits_apply_to_the_info_call() {
    let options = LoadOptions {
        limits: Limits::default().memory(64 << 10),
        ..LoadOptions::default()
    };
    // The hostile guest's image is larger than 64 KiB: its `info` instance cannot be made.
    match Model::load_with(runtime(), hostile_wasm(), &options) {
        Err(Error::Limit(LimitExceeded::Memory { limit, requested })) => {
            assert_eq!(limit, 64 << 10);
            assert!(requested > 64 << 10, "{requested}");
        }
        other => panic!("expected a memory trip at load, got {other:?}"),
    }
    let model = Model::load_with(runtime(), hostile_wasm(), &LoadOptions::default()).unwrap();
    assert_eq!(model.load_report().limits, Limits::default());
}

#[test]
fn a_refused_model_is_neither_compiled_nor_cached() {
    let (runtime, dir) = fresh_runtime("refused", None);
    let foreign = wat::parse_str(
        r#"(component (import "evil:host/escape" (instance (export "open-door" (func)))))"#,
    )
    .unwrap();
    let (options, phases) = recording_phases();
    assert!(matches!(
        invalid(Model::from_bytes_with(&runtime, &foreign, &options)),
        InvalidModel::UnsupportedImport(message) if message.contains("evil:host/escape")
    ));
    // Refused while inspecting: no compilation phase, no cache entry.
    assert_eq!(*phases.lock().unwrap(), [LoadPhase::Inspecting]);
    assert_eq!(entries(&dir), 0);
    // Refused after compiling (a trap in `info`): compiled, but still not cached.
    let trapping = WatModel {
        info: "unreachable",
        ..WatModel::default()
    }
    .build();
    assert!(matches!(
        Model::from_bytes(&runtime, &trapping),
        Err(Error::Trap { .. })
    ));
    assert_eq!(entries(&dir), 0);
    support::remove_cache(&dir);
}

#[test]
fn a_component_using_a_proposal_the_host_leaves_off_says_which() {
    // A shared memory needs the threads proposal, which this engine does not enable.
    let shared = wat_model("", "(memory $shared 1 1 shared)");
    assert_eq!(
        invalid(Model::from_bytes(runtime(), &shared)),
        InvalidModel::UnsupportedProposal {
            proposal: "threads".into()
        }
    );
    let message = invalid(Model::from_bytes(runtime(), &shared)).to_string();
    assert_eq!(
        message,
        "component uses threads, which this host does not enable"
    );
}

#[test]
fn a_load_reports_its_phases_and_a_cached_load_skips_compiling() {
    let (runtime, dir) = fresh_runtime("phases", None);
    let load = || {
        let (options, phases) = recording_phases();
        Model::load_with(&runtime, hostile_wasm(), &options).unwrap();
        let phases = phases.lock().unwrap().clone();
        phases
    };
    use LoadPhase::*;
    assert_eq!(load(), [Inspecting, Cache, Compiling, Checking]);
    assert_eq!(load(), [Inspecting, Cache, Checking]);
    support::remove_cache(&dir);
}
