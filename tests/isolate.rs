//! Bounded compilation: an uncached model compiled (and pre-initialised) in a worker process
//! under OS limits. The worker is the real `wasm-infer` binary in its hidden worker mode.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{assert_golden, hostile_wasm, invalid, text, WatModel};
use wasm_infer::isolate::{CompileLimit, CompileLimits, Isolation};
use wasm_infer::{CodeSource, Error, Limits, LoadOptions, Model, Runtime, RuntimeConfig};

fn isolated(limits: CompileLimits) -> LoadOptions {
    LoadOptions {
        isolate: Some(Isolation {
            worker: PathBuf::from(env!("CARGO_BIN_EXE_wasm-infer")),
            limits,
        }),
        ..LoadOptions::default()
    }
}

fn fresh_runtime(name: &str) -> (Runtime, PathBuf) {
    let dir = support::target_dir().join(format!("isolate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(dir.clone()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    (runtime, dir)
}

/// A model with one enormous function (`n` additions in a row): cheap to validate, slow and
/// large for an optimising compiler.
fn slow_to_compile(n: usize) -> Vec<u8> {
    let body = "(local.set $x (i32.add (local.get $x) (i32.const 1)))\n".repeat(n);
    let extra =
        format!("(func $big (export \"big\") (param $x i32) (result i32) {body} (local.get $x))");
    WatModel {
        extra: &extra,
        ..WatModel::default()
    }
    .build()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_model_compiled_in_a_worker_runs_like_one_compiled_here() {
    let (runtime, dir) = fresh_runtime("good");
    let options = isolated(CompileLimits::default());
    let model = Model::load_with(&runtime, hostile_wasm(), &options).unwrap();
    assert_eq!(model.load_report().code, CodeSource::Compiled);
    let outcome = model.run(text("work:1000"), &Limits::default()).unwrap();
    assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
    let again = Model::load_with(&runtime, hostile_wasm(), &options).unwrap();
    assert_eq!(again.load_report().code, CodeSource::Cached);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_runtime_without_a_cache_gets_the_code_over_the_pipe() {
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: None,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let model = Model::load_with(
        &runtime,
        hostile_wasm(),
        &isolated(CompileLimits::default()),
    )
    .unwrap();
    let outcome = model
        .run(text("echo:handed over"), &Limits::default())
        .unwrap();
    assert_eq!(
        outcome.output,
        wasm_infer::Output::Text("handed over".into())
    );
}

#[test]
fn a_component_that_compiles_slowly_is_refused_at_the_compile_deadline() {
    let (runtime, dir) = fresh_runtime("slow");
    let wasm = slow_to_compile(300_000);
    let limits = CompileLimits {
        wall_time: Duration::from_millis(500),
        ..CompileLimits::default()
    };
    let rss_before = rss_kib();
    let started = Instant::now();
    let reason = invalid(Model::from_bytes_with(
        &runtime,
        &wasm,
        &isolated(limits.clone()),
    ));
    assert_eq!(
        reason,
        wasm_infer::InvalidModel::CompileLimit {
            limit: CompileLimit::WallTime,
            limits
        }
    );
    // Generous: killed at its deadline, not after compiling.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The parent compiled nothing: its resident memory grew by the component's bytes at most.
    let grown_kib = rss_kib().saturating_sub(rss_before);
    assert!(grown_kib < 64 << 10, "the parent grew {grown_kib} KiB");
    assert_eq!(std::fs::read_dir(&dir).map_or(0, |d| d.count()), 0);
    // The parent is unaffected: a good model loads (in a worker) afterwards.
    let good = Model::load_with(
        &runtime,
        hostile_wasm(),
        &isolated(CompileLimits::default()),
    );
    good.unwrap()
        .run(text("echo:ok"), &Limits::default())
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Loads the slow component in a worker under `limits` and returns the compile limit it hit.
fn slow_compile_hits(name: &str, limits: CompileLimits) -> CompileLimit {
    let (runtime, dir) = fresh_runtime(name);
    let reason = invalid(Model::from_bytes_with(
        &runtime,
        &slow_to_compile(300_000),
        &isolated(limits.clone()),
    ));
    let _ = std::fs::remove_dir_all(&dir);
    match reason {
        wasm_infer::InvalidModel::CompileLimit {
            limit,
            limits: reported,
        } => {
            assert_eq!(reported, limits);
            limit
        }
        other => panic!("expected a compile limit, got {other}"),
    }
}

#[test]
fn a_component_that_needs_more_cpu_than_allowed_is_refused_by_the_cpu_limit() {
    let limits = CompileLimits {
        cpu: Duration::from_secs(1),
        wall_time: Duration::from_secs(120),
        ..CompileLimits::default()
    };
    assert_eq!(slow_compile_hits("cpu", limits), CompileLimit::Cpu);
}

#[test]
fn a_component_that_needs_more_memory_than_allowed_is_refused_by_the_memory_limit() {
    let limits = CompileLimits {
        memory: 256 << 20,
        ..CompileLimits::default()
    };
    assert_eq!(slow_compile_hits("mem", limits), CompileLimit::Memory);
}

#[test]
fn a_directory_planted_under_the_old_handoff_name_does_not_capture_the_code() {
    // What a local attacker did: pre-create `wasm-infer-handoff-<pid>-<n>` (once a
    // predictable name, accepted by `create_dir_all`) for the next few hand-offs, to swap
    // the compiled code under the parent. Each holds a marker and must stay exactly so.
    let planted: Vec<PathBuf> = (0..64)
        .map(|n| {
            std::env::temp_dir().join(format!("wasm-infer-handoff-{}-{n}", std::process::id()))
        })
        .collect();
    for dir in &planted {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("planted"), b"attacker").unwrap();
    }
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: None,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let loaded = Model::load_with(
        &runtime,
        hostile_wasm(),
        &isolated(CompileLimits::default()),
    );
    let untouched = planted.iter().all(|dir| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .map(|e| e.unwrap().file_name())
                .eq([std::ffi::OsString::from("planted")])
        })
    });
    for dir in &planted {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(untouched, "a planted hand-off directory was used");
    let outcome = loaded
        .unwrap()
        .run(text("echo:private"), &Limits::default())
        .unwrap();
    assert_eq!(outcome.output, wasm_infer::Output::Text("private".into()));
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_tampered_cache_entry_is_refused_naming_the_cache_and_discarded_then_compiled_again() {
    let (runtime, dir) = fresh_runtime("tamper");
    let options = isolated(CompileLimits::default());
    Model::load_with(&runtime, hostile_wasm(), &options).unwrap();
    let entries = support::cache_entries(&dir);
    assert_eq!(entries.len(), 1);
    support::flip_middle_byte(&entries[0]);
    let error = Model::load_with(&runtime, hostile_wasm(), &options).unwrap_err();
    support::assert_cache_refusal(&error, &dir, &entries[0]);
    assert!(!entries[0].exists(), "the tampered entry was kept");
    let again = Model::load_with(&runtime, hostile_wasm(), &options).unwrap();
    assert_eq!(again.load_report().code, CodeSource::Compiled);
    let outcome = again
        .run(text("echo:recompiled"), &Limits::default())
        .unwrap();
    assert_eq!(
        outcome.output,
        wasm_infer::Output::Text("recompiled".into())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cache_files_are_private_and_the_key_lives_beside_the_cache() {
    let (runtime, dir) = fresh_runtime("modes");
    Model::load_with(
        &runtime,
        hostile_wasm(),
        &isolated(CompileLimits::default()),
    )
    .unwrap();
    assert_eq!(mode(&dir), 0o700);
    let entries = support::cache_entries(&dir);
    assert_eq!(entries.len(), 1);
    assert_eq!(mode(&entries[0]), 0o600);
    let key = wasm_infer::cache::key_path(&dir);
    assert_eq!(key.parent(), dir.parent());
    assert_eq!(
        key.file_name().unwrap().to_string_lossy(),
        format!("{}.key", dir.file_name().unwrap().to_string_lossy())
    );
    assert_eq!(mode(&key), 0o600);
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 32);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&key);
}

#[test]
fn a_cache_directory_open_to_other_users_is_refused() {
    let dir = support::target_dir().join(format!("isolate-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let refused = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(dir.clone()),
        ..RuntimeConfig::default()
    });
    let _ = std::fs::remove_dir_all(&dir);
    match refused {
        Err(Error::Config(message)) => {
            assert!(message.contains("mode 755"), "{message}");
            assert!(
                message.contains(&format!("chmod 700 {}", dir.display())),
                "{message}"
            );
        }
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("a cache open to other users was accepted"),
    }
}

/// `wasm-infer run` of `model` with a fresh cache and the escape drill armed at `drill`.
fn run_with_drill(name: &str, model: &Path, drill: &str) -> std::process::Output {
    let dir = support::target_dir().join(format!("isolate-drill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .args(["run", &model.to_string_lossy(), "echo:drilled"])
        .env("WASM_INFER_CACHE_DIR", &dir)
        .env(wasm_infer::worker::ESCAPE_VAR, drill)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(wasm_infer::cache::key_path(&dir));
    output
}

const KILLED: &str = "the compile worker ended without an answer (signal: 31 (SIGSYS))";

#[test]
fn the_compile_child_is_locked_down_before_it_compiles() {
    // `mmap_exec`: the compile child may not even map executable memory.
    for call in ["open", "socket", "execve", "fork", "dumpable", "mmap_exec"] {
        let output = run_with_drill(call, &hostile_wasm(), &format!("compile:{call}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{call}: {stderr}");
        assert!(stderr.contains(KILLED), "{call}: {stderr}");
    }
    // The control: locked down, making no forbidden call, the child compiles.
    let output = run_with_drill("none", &hostile_wasm(), "compile:none");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("drilled"), "{stdout}");
}

#[test]
fn the_preinit_child_is_locked_down_before_the_first_guest_instruction() {
    // MiniLM exports `wizer-initialize`: its initialisation is guest code, run in the child.
    // The drill stands for that code, escaped, trying to open a file where it would begin.
    // `mmap_exec`: the child's code is linked before its lock-down; no new executable memory.
    for call in ["open", "socket", "mmap_exec"] {
        let output = run_with_drill(call, &support::minilm_wasm(), &format!("preinit:{call}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{call}: {stderr}");
        assert!(stderr.contains(KILLED), "{call}: {stderr}");
    }
}
