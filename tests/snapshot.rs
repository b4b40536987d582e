//! Pre-initialised snapshots: runs that start from the built model give the very bits a plain
//! run gives, their fuel measures the request alone (the one-time initialisation is reported
//! once), every run after a trip starts from the clean snapshot, and a snapshot made under
//! another engine configuration is refused by name.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use support::{assert_golden, bits, case, cosine, minilm, minilm_no_preinit, minilm_wasm, runtime};
use wasm_infer::snapshot::{self, Snapshot, SNAPSHOT_SECTION};
use wasm_infer::{
    Error, Input, InvalidModel, LimitExceeded, Limits, Model, Outcome, PreinitSource, Runtime,
    RuntimeConfig, Trap,
};

fn run(model: &Model, name: &str) -> Outcome {
    model
        .run(Input::Text(case(name).text), &Limits::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A snapshot file made through the library (as `wasm-infer snapshot` does).
fn snapshot_file() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        let wasm = std::fs::read(minilm_wasm()).unwrap();
        snapshot::snapshot(runtime(), &wasm, &Limits::default()).expect("making the snapshot")
    })
}

#[test]
fn snapshot_and_plain_runs_are_bit_identical_with_documented_fuel() {
    let preinit = minilm()
        .load_report()
        .preinit
        .clone()
        .expect("minilm is pre-initialised");
    assert_golden("minilm_init_fuel", preinit.init.fuel);
    assert!(minilm_no_preinit().load_report().preinit.is_none());

    for name in ["short_bench", "long_bench", "cjk_japanese", "empty"] {
        let snap = run(minilm(), name);
        let plain = run(minilm_no_preinit(), name);
        assert_eq!(bits(&snap), bits(&plain), "{name}: embeddings differ");
        let vector = &snap.output.embeddings().unwrap()[0];
        assert!(cosine(vector, &case(name).embedding) >= 0.9999, "{name}");
        assert_golden(&format!("minilm_{name}"), snap.usage.fuel_consumed);
        assert_golden(
            &format!("minilm_no_preinit_{name}"),
            plain.usage.fuel_consumed,
        );
        // The plain run pays for initialisation inside the request; the snapshot run does
        // not. (Not exactly the init figure: the plain run initialises lazily inside `infer`.)
        let saved = plain.usage.fuel_consumed - snap.usage.fuel_consumed;
        let diff = saved.abs_diff(preinit.init.fuel);
        assert!(
            diff < preinit.init.fuel / 1000,
            "{name}: saved {saved}, init {}",
            preinit.init.fuel
        );
        // The snapshot starts with the model built: its initial memory is what init left.
        assert_eq!(snap.usage.initial_memory_bytes, preinit.init.memory_bytes);
        assert!(plain.usage.initial_memory_bytes < snap.usage.initial_memory_bytes);
    }
}

#[test]
fn a_snapshot_file_runs_like_the_transparent_snapshot() {
    let snap = snapshot_file();
    let wasm = std::fs::read(minilm_wasm()).unwrap();
    assert_eq!(
        snap.info.source_sha256,
        minilm().load_report().component_sha256
    );
    assert_eq!(
        snap.info.init.fuel,
        minilm().load_report().preinit.as_ref().unwrap().init.fuel
    );
    assert_eq!(snap.info.init.source_bytes, wasm.len() as u64);
    assert_eq!(snap.info.init.snapshot_bytes, snap.wasm.len() as u64);
    assert_eq!(
        snapshot::snapshot_info(&snap.wasm).unwrap().as_ref(),
        Some(&snap.info)
    );

    let model = Model::from_bytes(runtime(), &snap.wasm).expect("loading the snapshot file");
    let preinit = model.load_report().preinit.as_ref().unwrap();
    assert_eq!(preinit.source, PreinitSource::File);
    assert_eq!(preinit.init, snap.info.init);
    let from_file = run(&model, "short_bench");
    let transparent = run(minilm(), "short_bench");
    assert_eq!(bits(&from_file), bits(&transparent));
    assert_eq!(
        from_file.usage.fuel_consumed,
        transparent.usage.fuel_consumed
    );

    // A snapshot is not snapshotted again.
    assert!(matches!(
        snapshot::snapshot(runtime(), &snap.wasm, &Limits::default()),
        Err(Error::InvalidModel(InvalidModel::Malformed(_)))
    ));
}

#[test]
fn runs_after_fuel_memory_and_timeout_trips_start_from_the_clean_snapshot() {
    let reference = run(minilm(), "short_bench");
    let input = Input::Text(case("short_bench").text);
    let needed = reference.usage.fuel_consumed;
    let long_batch = Input::Texts(vec![case("long_truncated").text; 8]);
    let trips = [
        (Limits::default().fuel(needed - 1), input.clone()),
        (
            Limits::default().memory(reference.usage.initial_memory_bytes - 1),
            input.clone(),
        ),
        // About 6 s of work stopped after 20 ms.
        (
            Limits::default().wall_time(Duration::from_millis(20)),
            long_batch,
        ),
    ];
    for (limits, trip_input) in trips {
        let failure = minilm().run(trip_input, &limits).unwrap_err();
        assert!(
            matches!(
                failure.error,
                Error::Limit(
                    LimitExceeded::Fuel { .. }
                        | LimitExceeded::Memory { .. }
                        | LimitExceeded::WallTime { .. }
                )
            ),
            "{}",
            failure.error
        );
        let after = minilm().run(input.clone(), &Limits::default()).unwrap();
        assert_eq!(bits(&after), bits(&reference));
        assert_eq!(after.usage.fuel_consumed, needed);
        assert_eq!(
            after.usage.peak_memory_bytes,
            reference.usage.peak_memory_bytes
        );
    }
}

#[test]
fn a_snapshot_from_another_engine_configuration_is_refused_by_name() {
    // Made by a runtime without fuel metering, loaded into one with it.
    let unmetered = Runtime::with_config(RuntimeConfig {
        cache_dir: None,
        meter_fuel: false,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let wasm = std::fs::read(minilm_wasm()).unwrap();
    let foreign = snapshot::snapshot(&unmetered, &wasm, &Limits::default()).unwrap();
    assert_eq!(foreign.info.init.fuel, 0);
    match Model::from_bytes(runtime(), &foreign.wasm) {
        Err(Error::InvalidModel(InvalidModel::SnapshotMismatch(message))) => {
            assert!(
                message.contains("fuel=off (this runtime: fuel=on)"),
                "{message}"
            );
        }
        other => panic!("expected a snapshot mismatch, got {other:?}"),
    }

    // Another wasmtime version: the section's version string, rewritten in place.
    let ours = format!("\"wasmtime\":\"{}\"", snapshot_file().info.engine.wasmtime);
    let theirs = format!(
        "\"wasmtime\":\"{}\"",
        "9".repeat(snapshot_file().info.engine.wasmtime.len())
    );
    let mut forged = snapshot_file().wasm.clone();
    let at = find(&forged, SNAPSHOT_SECTION.as_bytes()).unwrap();
    let offset = at + find(&forged[at..], ours.as_bytes()).unwrap();
    forged[offset..offset + theirs.len()].copy_from_slice(theirs.as_bytes());
    match Model::from_bytes(runtime(), &forged) {
        Err(Error::InvalidModel(InvalidModel::SnapshotMismatch(message))) => {
            assert!(message.contains("wasmtime 99"), "{message}");
            assert!(message.contains("wasm-infer snapshot"), "{message}");
        }
        other => panic!("expected a snapshot mismatch, got {other:?}"),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// A component exporting `wizer-initialize` whose body is `body` (core wasm instructions),
/// with one imported host function (WASI's monotonic clock) it may call as `$f`.
fn init_component(body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(component
            (import "wasi:clocks/monotonic-clock@0.2.0" (instance $clock
                (export "now" (func (result u64)))))
            (alias export $clock "now" (func $f))
            (core func $f_lowered (canon lower (func $f)))
            (core module $m
                (import "" "f" (func $f (result i64)))
                (memory (export "memory") 1)
                (func (export "init") {body}))
            (core instance $i (instantiate $m
                (with "" (instance (export "f" (func $f_lowered))))))
            (func (export "wizer-initialize") (canon lift (core func $i "init")))
        )"#
    ))
    .unwrap()
}

#[test]
fn initialisation_that_calls_an_import_traps_or_overruns_is_refused() {
    let import = snapshot::snapshot(
        runtime(),
        &init_component("(drop (call $f))"),
        &Limits::default(),
    );
    match import {
        Err(Error::Init(inner)) => assert!(
            matches!(*inner, Error::Trap { .. }),
            "expected a trap, got {inner}"
        ),
        other => panic!("expected an init failure, got {other:?}"),
    }

    let trap = snapshot::snapshot(
        runtime(),
        &init_component("unreachable"),
        &Limits::default(),
    );
    match trap {
        Err(Error::Init(inner)) => assert!(
            matches!(
                *inner,
                Error::Trap {
                    code: Some(Trap::UnreachableCodeReached),
                    ..
                }
            ),
            "{inner}"
        ),
        other => panic!("expected an init failure, got {other:?}"),
    }

    let spin = snapshot::snapshot(
        runtime(),
        &init_component("(loop br 0)"),
        &Limits::default().fuel(1_000_000),
    );
    match spin {
        Err(e @ Error::Init(_)) => assert_eq!(
            e.limit(),
            Some(&LimitExceeded::Fuel {
                limit: 1_000_000,
                consumed: 1_000_001
            })
        ),
        other => panic!("expected an init fuel trip, got {other:?}"),
    }

    // A component without the export is not pre-initialisable.
    let plain = wat::parse_str("(component)").unwrap();
    assert!(matches!(
        snapshot::snapshot(runtime(), &plain, &Limits::default()),
        Err(Error::InvalidModel(InvalidModel::NotPreinitialisable))
    ));
}

/// A component exporting `wizer-initialize` that draws `len` bytes from
/// `wasi:random/random.get-random-bytes` into its memory (at 64; the list's pointer and length
/// at 0) and does nothing else.
fn random_init_component(len: u64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(component
            (import "wasi:random/random@0.2.12" (instance $random
                (export "get-random-bytes" (func (param "len" u64) (result (list u8))))))
            (alias export $random "get-random-bytes" (func $f))
            (core module $libc
                (memory (export "memory") 1)
                (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 64))
            (core instance $libc (instantiate $libc))
            (alias core export $libc "memory" (core memory $memory))
            (alias core export $libc "realloc" (core func $realloc))
            (core func $f_lowered (canon lower (func $f) (memory $memory) (realloc $realloc)))
            (core module $m
                (import "" "f" (func $f (param i64 i32)))
                (func (export "init") (call $f (i64.const {len}) (i32.const 0))))
            (core instance $i (instantiate $m
                (with "" (instance (export "f" (func $f_lowered))))))
            (func (export "wizer-initialize") (canon lift (core func $i "init")))
        )"#
    ))
    .unwrap()
}

/// Issue 23: randomness drawn while pre-initialising is charged as in a run (100 a call, 16
/// a byte) and is the run's seeded stream, so the snapshot is the same every time. The two
/// components differ only in the length asked for, so their initialisations differ by 16
/// fuel a byte exactly; before, random bytes cost initialisation nothing (the difference was
/// 0). A call past the 1 MiB cap is refused.
#[test]
fn random_bytes_drawn_while_pre_initialising_are_charged_and_deterministic() {
    let init = |len: u64| {
        snapshot::snapshot(runtime(), &random_init_component(len), &Limits::default())
            .unwrap_or_else(|e| panic!("{len} bytes: {e}"))
    };
    let (small, large) = (init(16), init(1000));
    assert_eq!(
        large.info.init.fuel - small.info.init.fuel,
        16 * (1000 - 16)
    );
    // The whole call is charged: its floor and the bytes (the guest's instructions are a few).
    assert!(
        small.info.init.fuel >= 100 + 16 * 16,
        "{}",
        small.info.init.fuel
    );
    // Made again: the same fuel, and the same component up to the snapshot section (which
    // records the wall time), so the same random bytes in its memory. The section's header
    // (its id, its size, the length of its name) comes before its name, and the size counts
    // the wall time's digits (a CI run made 385 and 386 bytes: one more digit of
    // microseconds), so the body ends before the header.
    let again = init(1000);
    assert_eq!(again.info.init.fuel, large.info.init.fuel);
    let body = |s: &Snapshot| {
        let at = find(&s.wasm, SNAPSHOT_SECTION.as_bytes()).expect("the section");
        assert_eq!(usize::from(s.wasm[at - 1]), SNAPSHOT_SECTION.len());
        // The size's last byte, then back over its continuation bytes, then the id.
        let mut size = at - 2;
        while s.wasm[size - 1] & 0x80 != 0 {
            size -= 1;
        }
        assert_eq!(s.wasm[size - 1], 0, "a custom section's id");
        s.wasm[..size - 1].to_vec()
    };
    assert_eq!(body(&again), body(&large));
    assert_ne!(body(&small), body(&large));
    // Over the per-call cap: refused, nothing made.
    match snapshot::snapshot(
        runtime(),
        &random_init_component((1 << 20) + 1),
        &Limits::default(),
    ) {
        Err(Error::Init(inner)) => assert!(
            format!("{inner:?}").contains("requested len 1048577 exceeds limit 1048576"),
            "{inner:?}"
        ),
        other => panic!("expected an init failure, got {other:?}"),
    }
}

#[test]
fn one_model_handle_runs_many_fresh_sandboxes_concurrently() {
    let names = [
        "plain",
        "emoji",
        "cyrillic",
        "symbols",
        "accents",
        "mixed_case",
    ];
    let expected: Vec<Outcome> = names.iter().map(|n| run(minilm(), n)).collect();
    let model = minilm().clone();
    let parallel: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                let model = model.clone();
                scope.spawn(move || run(&model, n))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((name, seq), par) in names.iter().zip(&expected).zip(&parallel) {
        assert_eq!(bits(seq), bits(par), "{name}");
        assert_eq!(seq.usage.fuel_consumed, par.usage.fuel_consumed, "{name}");
    }
}

#[test]
fn a_pooled_runtime_reuses_slots_cleanly_after_trips_and_queues_beyond_its_size() {
    // In-sandbox compute (no accelerator), so that the long input grows the heap in its slot.
    let pooled = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(support::cache_dir()),
        pool: Some(2),
        accel: wasm_infer::AccelMode::Off,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let model = Model::load(&pooled, minilm_wasm()).unwrap();
    let reference = run(support::minilm_in_sandbox(), "short_bench");
    let check = |outcome: &Outcome| {
        assert_eq!(bits(outcome), bits(&reference));
        assert_eq!(outcome.usage.fuel_consumed, reference.usage.fuel_consumed);
        assert_eq!(
            outcome.usage.peak_memory_bytes,
            reference.usage.peak_memory_bytes
        );
    };
    check(&run(&model, "short_bench"));

    // A memory trip inside a pooled slot (the long input grows past the image), then fuel.
    let long = Input::Text(case("long_truncated").text);
    let peak = run(support::minilm_in_sandbox(), "long_truncated")
        .usage
        .peak_memory_bytes;
    let failure = model
        .run(long, &Limits::default().memory(peak - 1))
        .unwrap_err();
    assert_eq!(
        failure.error.limit(),
        Some(&LimitExceeded::Memory {
            limit: peak - 1,
            requested: peak
        })
    );
    check(&run(&model, "short_bench"));
    let input = Input::Text(case("short_bench").text);
    let failure = model
        .run(input, &Limits::default().fuel(1_000_000))
        .unwrap_err();
    assert!(matches!(
        failure.error.limit(),
        Some(LimitExceeded::Fuel { .. })
    ));

    // Six runs on two slots: all complete, with the same bits and fuel.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| run(&model, "short_bench")))
            .collect();
        for handle in handles {
            check(&handle.join().unwrap());
        }
    });
}
