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
    support::remove_cache(&dir);
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
    support::remove_cache(&dir);
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
    support::remove_cache(&dir);
}

/// Loads the slow component in a worker under `limits` and returns the compile limit it hit.
fn slow_compile_hits(name: &str, limits: CompileLimits) -> CompileLimit {
    let (runtime, dir) = fresh_runtime(name);
    let reason = invalid(Model::from_bytes_with(
        &runtime,
        &slow_to_compile(300_000),
        &isolated(limits.clone()),
    ));
    support::remove_cache(&dir);
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
        support::remove_cache(dir);
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
    support::remove_cache(&dir);
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
    support::remove_cache(&dir);
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
    support::remove_cache(&dir);
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
    support::remove_cache(&dir);
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .args(["run", &model.to_string_lossy(), "echo:drilled"])
        .env("WASM_INFER_CACHE_DIR", &dir)
        .env(wasm_infer::worker::ESCAPE_VAR, drill)
        .output()
        .unwrap();
    support::remove_cache(&dir);
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

/// `wasm-infer run --report json` of MiniLM (pre-initialised in a child) with a fresh cache,
/// a 512 MiB load memory limit and the escape drill armed at `drill`: the exit status, the
/// report (a load that fails has none: its error is the last line of stderr) and the files
/// the cache holds afterwards.
fn run_preinit_drill(name: &str, drill: &str) -> (Option<i32>, String, Vec<String>) {
    let dir = support::target_dir().join(format!("isolate-poison-{name}-{}", std::process::id()));
    support::remove_cache(&dir);
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .args(["run", "--report", "json", "--load-mem", "512M"])
        .arg(support::minilm_wasm())
        .arg("a poisoned snapshot")
        .env("WASM_INFER_CACHE_DIR", &dir)
        .env(wasm_infer::worker::ESCAPE_VAR, drill)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut cached: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    cached.sort();
    support::remove_cache(&dir);
    (output.status.code(), stderr, cached)
}

#[test]
fn a_poisoned_snapshot_is_refused_and_nothing_is_cached() {
    // The control: the honest snapshot passes the parent's checks and is cached (its code and
    // its description), and the report names the component and the snapshot's memory.
    let (status, stderr, cached) = run_preinit_drill("none", "preinit:none");
    assert_eq!(status, Some(0), "{stderr}");
    let report = stderr
        .lines()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no report in {stderr}"));
    let report: serde_json::Value = serde_json::from_str(report).unwrap();
    assert_eq!(cached.len(), 2, "{cached:?}");
    assert!(
        cached[0].ends_with(".cwasm") && cached[1].ends_with(".json"),
        "{cached:?}"
    );
    let sha256 = report["load"]["component_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let memory = report["load"]["preinit"]["init"]["memory_bytes"]
        .as_u64()
        .unwrap();
    // The drill pushes a segment's offset to i32::MAX; the memory grows to 8,193 pages, one
    // past the 512 MiB load limit (8,193 × 65,536 = 536,936,448).
    let poisons = [
        (
            "segment",
            format!(", past the {memory} bytes of its memory"),
        ),
        (
            "memory",
            "its memories hold 536936448 bytes, more than the 536870912 bytes of the load's \
             memory limit"
                .to_string(),
        ),
        (
            "global",
            "its globals are not of the component's types".to_string(),
        ),
        (
            "code",
            "(section id 10) differs from the component's".to_string(),
        ),
        (
            "digest",
            // SHA-256 of "another component" (`printf 'another component' | sha256sum`),
            // the digest the drill writes.
            format!(
                "its description names component \
                 a77052d6b3b1d061fe2f3e102167bcf7e3e7ca94b9c574cfe11a5ee08e250cca, \
                 not this one ({sha256})"
            ),
        ),
    ];
    for (kind, expected) in poisons {
        let (status, stderr, cached) = run_preinit_drill(kind, &format!("preinit:poison-{kind}"));
        // Exit 3: an invalid model (README, "Exit statuses"; `ErrorKind::InvalidModel`).
        assert_eq!(status, Some(3), "{kind}: {stderr}");
        let prefix = format!(
            "error: {}: invalid model: the pre-initialisation worker handed back a poisoned \
             snapshot: ",
            support::minilm_wasm().display()
        );
        let message = stderr
            .lines()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{kind}: {stderr}"));
        assert!(message.contains(&expected), "{kind}: {message}");
        if kind == "segment" {
            // Where the moved segment ends: at least the offset the drill wrote.
            let end: u64 = message
                .split(" ends at byte ")
                .nth(1)
                .and_then(|rest| rest.split(',').next())
                .and_then(|end| end.parse().ok())
                .unwrap_or_else(|| panic!("{message}"));
            assert!(end > i32::MAX as u64, "{message}");
        }
        assert_eq!(cached, Vec::<String>::new(), "{kind}: something was cached");
    }
}

#[test]
fn the_load_children_are_in_a_cgroup_from_their_first_instruction() {
    // The probe (`CGROUP_PROBE_VAR`) makes each load child, as its first act, copy its
    // `/proc/self/cgroup` and its groups' limit files into the directory; the children's
    // groups are gone by the time the run ends, so the files are all that is left of them.
    let dir = support::target_dir().join(format!("isolate-cgroup-{}", std::process::id()));
    let cache = dir.join("cache");
    let probes = dir.join("probes");
    support::remove_cache(&dir);
    std::fs::create_dir_all(&probes).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .arg("run")
        .arg(support::minilm_wasm())
        .arg("grouped")
        .env("WASM_INFER_CACHE_DIR", &cache)
        .env(wasm_infer::worker::CGROUP_PROBE_VAR, &probes)
        // The pids cap is candle's CPU threads + 16: 2 + 16.
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The groups are named for the process that made them.
    let prefix = format!("wasm-infer-workers-{}-", output.id());
    let output = output.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // Each child's environment: only the variables its parent names (this test's own, the
    // cache directory included, stay behind).
    let mut environs = 0;
    for entry in std::fs::read_dir(&probes).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "environ") {
            let mut names = support::environ_names(&path);
            names.retain(|name| !(cfg!(feature = "cuda") && name == "LD_LIBRARY_PATH"));
            names.sort();
            assert_eq!(
                names,
                ["RAYON_NUM_THREADS", wasm_infer::worker::CGROUP_PROBE_VAR],
                "{}",
                path.display()
            );
            environs += 1;
        }
    }
    assert_eq!(environs, 2, "a pre-initialisation and a compile child");
    let root = unsafe { libc::geteuid() } == 0;
    if !(root && Path::new("/sys/fs/cgroup").is_dir()) {
        eprintln!("no cgroup here: {stderr}");
        support::remove_cache(&dir);
        let _ = std::fs::remove_file(wasm_infer::cache::key_path(&cache));
        return;
    }
    // Two children: MiniLM's pre-initialisation, then its compilation.
    let mut pids: Vec<String> = std::fs::read_dir(&probes)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("load-") && !name.contains('.'))
        .collect();
    pids.sort();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let mut memory_figures = Vec::new();
    for pid in &pids {
        let groups = std::fs::read_to_string(probes.join(pid)).unwrap();
        let limits = std::fs::read_to_string(probes.join(format!("{pid}.limits"))).unwrap();
        let value = |file: &str| {
            limits
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{file} ")))
                .unwrap_or_else(|| panic!("no {file} in {limits}"))
                .to_string()
        };
        // The child's own group, named for the `wasm-infer run` process, in each hierarchy.
        let group = |hierarchy: &str| {
            groups
                .lines()
                .find_map(|line| {
                    let mut parts = line.splitn(3, ':');
                    let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                    (controllers == hierarchy).then(|| path.to_string())
                })
                .unwrap_or_else(|| panic!("no {hierarchy:?} line in {groups}"))
        };
        let v2 = limits.starts_with("unified/");
        let (memory, swap, pids_max) = if v2 {
            let path = group("");
            let name = path.rsplit('/').next().unwrap();
            assert!(name.starts_with(&prefix), "{path}");
            (
                value("unified/memory.max"),
                value("unified/memory.swap.max"),
                value("unified/pids.max"),
            )
        } else {
            for hierarchy in ["memory", "pids"] {
                let path = group(hierarchy);
                let name = path.rsplit('/').next().unwrap();
                assert!(name.starts_with(&prefix), "{hierarchy}: {path}");
                // Removed once the child was reaped.
                let dir = Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join(path.trim_start_matches('/'));
                assert!(!dir.exists(), "{} stays", dir.display());
            }
            let memory = value("memory/memory.limit_in_bytes");
            // Swap included: RAM and swap together may not exceed the same figure.
            let memsw = value("memory/memory.memsw.limit_in_bytes");
            (
                memory.clone(),
                (memsw == memory).to_string(),
                value("pids/pids.max"),
            )
        };
        assert_eq!(swap, if v2 { "0" } else { "true" }, "{limits}");
        assert_eq!(pids_max, "18", "{limits}");
        memory_figures.push(memory.parse::<u64>().unwrap());
    }
    memory_figures.sort();
    // The compile child: `--compile-mem` (2 GiB) + 512 MiB; the pre-initialisation child
    // also its guest's memory, up to `--load-mem` (1 GiB).
    let compile = CompileLimits::default().memory + wasm_infer::isolate::LOAD_MEMORY_MARGIN;
    assert_eq!(compile, (2 << 30) + (512 << 20));
    assert_eq!(
        memory_figures,
        vec![compile, compile + Limits::default().memory]
    );
    support::remove_cache(&dir);
    let _ = std::fs::remove_file(wasm_infer::cache::key_path(&cache));
}
