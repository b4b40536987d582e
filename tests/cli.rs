//! The `wasm-infer` binary, driven as a user would: exit statuses, JSON on stdout only on
//! success, usage on stderr, the same fuel figure as the library.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::{assert_golden, cache_dir, case, cosine, hostile_wasm, minilm_wasm, reference};

fn wasm_infer(args: &[&str]) -> Output {
    wasm_infer_with_stdin(args, None)
}

fn wasm_infer_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running wasm-infer");
    if let Some(bytes) = stdin {
        // A refused input may close the pipe early; that is the point of some tests.
        let _ = child.stdin.take().unwrap().write_all(bytes);
    }
    child.wait_with_output().unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts a failure: the exit status, nothing at all on stdout, and `needle` on stderr.
fn assert_fails(output: &Output, status: i32, needle: &str) {
    assert_eq!(code(output), status, "stderr: {}", stderr(output));
    assert!(
        output.stdout.is_empty(),
        "stdout must stay empty on failure"
    );
    assert!(
        stderr(output).contains(needle),
        "stderr lacks {needle:?}: {}",
        stderr(output)
    );
}

fn minilm() -> String {
    minilm_wasm().display().to_string()
}

fn hostile() -> String {
    hostile_wasm().display().to_string()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON")
}

#[test]
fn the_documented_command_prints_a_384_dimension_embedding() {
    let text = case("plain").text;
    let out = wasm_infer(&["--fuel", "10G", "--mem", "2G", &minilm(), &text]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let value = json(&out.stdout);
    assert_eq!(value["model"], "all-MiniLM-L6-v2");
    assert_eq!(value["dimension"], 384);
    let vector: Vec<f32> = serde_json::from_value(value["embeddings"][0].clone()).unwrap();
    assert!(cosine(&vector, &case("plain").embedding) >= 0.9999);
    assert!(stderr(&out).starts_with("usage: fuel "), "{}", stderr(&out));
}

#[test]
fn fuel_from_the_cli_equals_the_library_golden_figure_in_fresh_processes() {
    let text = case("short_bench").text;
    for _ in 0..2 {
        let out = wasm_infer(&["--report", "json", &minilm(), &text]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let report = json(&out.stderr);
        assert_eq!(report["status"], "ok");
        assert_golden(
            "minilm_short_bench",
            report["usage"]["fuel_consumed"].as_u64().unwrap(),
        );
    }
}

#[test]
fn stdin_and_files_are_one_text_per_line() {
    let texts = ["plain", "emoji", "cyrillic"].map(|n| case(n).text);
    let input = texts.join("\n") + "\n";
    let from_stdin = wasm_infer_with_stdin(&["-q", &minilm(), "-"], Some(input.as_bytes()));
    assert_eq!(code(&from_stdin), 0, "{}", stderr(&from_stdin));
    assert!(from_stdin.stderr.is_empty(), "--quiet prints no usage");
    let path = support::target_dir().join("cli-input.txt");
    std::fs::write(&path, &input).unwrap();
    let from_file = wasm_infer(&["-q", &minilm(), &format!("@{}", path.display())]);
    assert_eq!(from_stdin.stdout, from_file.stdout);
    let value = json(&from_stdin.stdout);
    for (i, name) in ["plain", "emoji", "cyrillic"].iter().enumerate() {
        let vector: Vec<f32> = serde_json::from_value(value["embeddings"][i].clone()).unwrap();
        assert!(cosine(&vector, &case(name).embedding) >= 0.9999, "{name}");
    }
}

#[test]
fn fuel_trip_exits_10_with_nothing_on_stdout() {
    let out = wasm_infer(&["--fuel", "1M", &minilm(), "hello"]);
    assert_fails(&out, 10, "fuel limit of 1,000,000 exhausted");
}

#[test]
fn memory_trip_exits_11() {
    let out = wasm_infer(&["--mem", "64M", &minilm(), "hello"]);
    assert_fails(&out, 11, "memory limit of 64.00 MiB exceeded");
}

#[test]
fn wall_time_trip_exits_12() {
    let out = wasm_infer(&["--timeout", "200ms", &hostile(), "spin"]);
    assert_fails(&out, 12, "wall-time limit of 200ms exceeded");
}

#[test]
fn input_and_output_size_trips_exit_13_and_14() {
    let out = wasm_infer(&["--max-input", "4", &minilm(), "hello"]);
    assert_fails(&out, 13, "input of 5 B exceeds the input limit of 4 B");
    let big = vec![b'a'; 1 << 20];
    let out = wasm_infer_with_stdin(&["--max-input", "1K", &minilm(), "-"], Some(&big));
    assert_fails(&out, 13, "exceeds the input limit of 1.00 KiB");
    let out = wasm_infer(&["--max-output", "100", &hostile(), "bytes:101"]);
    assert_fails(
        &out,
        14,
        "output of 101 B exceeds the output limit of 100 B",
    );
}

#[test]
fn guest_trap_exits_4_and_model_error_exits_5() {
    let out = wasm_infer(&[&hostile(), "panic"]);
    assert_fails(&out, 4, "hostile guest panicked on purpose");
    let out = wasm_infer(&[&hostile(), "recurse"]);
    assert_fails(&out, 4, "call stack exhausted");
    let out = wasm_infer(&[&hostile(), "nonsense"]);
    assert_fails(&out, 5, "model error (invalid input)");
}

#[test]
fn json_report_names_the_limit_on_failure() {
    let out = wasm_infer(&["--report", "json", "--fuel", "1000", &hostile(), "spin"]);
    assert_eq!(code(&out), 10);
    assert!(out.stdout.is_empty());
    let report = json(&out.stderr);
    assert_eq!(report["status"], "error");
    assert_eq!(report["error"]["kind"], "fuel");
    assert_eq!(report["error"]["exit_code"], 10);
    assert_eq!(report["limits"]["fuel"], 1000);
}

#[test]
fn invalid_models_exit_3() {
    let dir = support::target_dir().join("cli-bad-models");
    std::fs::create_dir_all(&dir).unwrap();
    let not_wasm = dir.join("not.wasm");
    std::fs::write(&not_wasm, b"this is not wasm").unwrap();
    let core = dir.join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let truncated = dir.join("truncated.wasm");
    let hostile_bytes = std::fs::read(hostile_wasm()).unwrap();
    std::fs::write(&truncated, &hostile_bytes[..hostile_bytes.len() / 2]).unwrap();
    let wrong_world = dir.join("wrong-world.wasm");
    std::fs::write(&wrong_world, wat::parse_str("(component)").unwrap()).unwrap();
    let foreign_import = dir.join("foreign-import.wasm");
    std::fs::write(
        &foreign_import,
        wat::parse_str(r#"(component (import "evil:host/escape" (func)))"#).unwrap(),
    )
    .unwrap();
    for (path, needle) in [
        (not_wasm, "not a WebAssembly file"),
        (core, "a core WebAssembly module, not a component"),
        (truncated, "malformed component"),
        (
            wrong_world,
            "does not implement the wasm-infer:model/model world",
        ),
        (
            foreign_import,
            "imports something wasm-infer does not provide",
        ),
        (dir.join("missing.wasm"), "No such file"),
        (dir.clone(), "Is a directory"),
    ] {
        let out = wasm_infer(&[path.to_str().unwrap(), "hi"]);
        assert_fails(&out, 3, needle);
    }
}

#[test]
fn malformed_flags_exit_2() {
    for args in [
        ["--mem", "2X"],
        ["--fuel", "-1"],
        ["--timeout", "abc"],
        ["--report", "xml"],
        ["--max-input", "lots"],
        ["--fuel", "1.5.3"],
        ["--mem", ""],
    ] {
        let mut all = args.to_vec();
        let model = minilm();
        all.extend([model.as_str(), "hi"]);
        let out = wasm_infer(&all);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    let out = wasm_infer(&[&minilm()]);
    assert_eq!(code(&out), 2);
}

#[test]
fn non_utf8_binary_or_missing_input_exits_6() {
    let out = wasm_infer_with_stdin(&[&minilm(), "-"], Some(&[0xff, 0xfe, 0x00]));
    assert_fails(&out, 6, "not UTF-8");
    let binary = support::target_dir().join("cli-binary-input.bin");
    std::fs::write(&binary, (0..=255u8).cycle().take(4096).collect::<Vec<u8>>()).unwrap();
    let out = wasm_infer(&[&minilm(), &format!("@{}", binary.display())]);
    assert_fails(&out, 6, "not UTF-8");
    let out = wasm_infer(&[&minilm(), "@/nonexistent/input.txt"]);
    assert_fails(&out, 6, "No such file");
}

#[test]
fn an_empty_input_file_is_an_empty_batch() {
    let empty = support::target_dir().join("cli-empty-input.txt");
    std::fs::write(&empty, b"").unwrap();
    let out = wasm_infer(&["-q", &minilm(), &format!("@{}", empty.display())]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out.stdout)["embeddings"], serde_json::json!([]));
}

#[test]
fn a_table_bomb_exits_11_and_a_giant_output_exits_14() {
    let bomb = support::target_dir().join("cli-table-bomb.wasm");
    std::fs::write(&bomb, support::table_bomb_wasm()).unwrap();
    let out = wasm_infer(&[bomb.to_str().unwrap(), "x"]);
    assert_fails(&out, 11, "table limit of 100,000 elements exceeded");
    let out = wasm_infer(&[&hostile(), "bytes:200000000"]);
    assert_fails(&out, 14, "exceeds the output limit of 16.00 MiB");
}

#[test]
fn inspect_prints_info_and_world() {
    let out = wasm_infer(&["inspect", "--json", &minilm()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let value = json(&out.stdout);
    assert_eq!(value["world"], "wasm-infer:model/model@0.1.0");
    assert_eq!(value["info"]["name"], "all-MiniLM-L6-v2");
    assert_eq!(value["info"]["output_dimension"], 384);
    assert_eq!(value["info"]["max_input_tokens"], 256);
    let text = wasm_infer(&["inspect", &minilm()]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("world:       wasm-infer:model/model@0.1.0")
    );
    assert_eq!(reference().dimension, 384);
}

#[test]
fn guest_stdout_never_reaches_the_cli_stdout() {
    let out = wasm_infer(&["-q", &hostile(), "print:1000"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"model\":\"hostile\",\"output\":{\"text\":\"printed\"}}\n"
    );
}

#[test]
fn snapshot_writes_a_file_that_runs_like_the_transparent_snapshot() {
    let dir = support::target_dir().join("cli-snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("minilm.snap.wasm");
    let out_str = out.display().to_string();
    let made = wasm_infer(&["snapshot", &minilm(), "-o", &out_str, "--json"]);
    assert_eq!(code(&made), 0, "{}", stderr(&made));
    assert!(made.stdout.is_empty());
    let info = json(&made.stderr);
    assert_golden("minilm_init_fuel", info["init"]["fuel"].as_u64().unwrap());
    assert_eq!(
        info["init"]["snapshot_bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );

    let text = case("short_bench").text;
    let from_file = wasm_infer(&["--report", "json", &out_str, &text]);
    let transparent = wasm_infer(&["--report", "json", &minilm(), &text]);
    assert_eq!(code(&from_file), 0, "{}", stderr(&from_file));
    assert_eq!(from_file.stdout, transparent.stdout);
    let report = json(&from_file.stderr);
    assert_golden(
        "minilm_short_bench",
        report["usage"]["fuel_consumed"].as_u64().unwrap(),
    );
    assert_eq!(report["load"]["preinit"]["source"], "file");
    assert_eq!(
        json(&transparent.stderr)["load"]["preinit"]["init"]["fuel"],
        info["init"]["fuel"]
    );

    // Without the snapshot the same request pays for initialisation.
    let plain = wasm_infer(&["--no-preinit", "--report", "json", &minilm(), &text]);
    assert_eq!(plain.stdout, transparent.stdout);
    assert_golden(
        "minilm_no_preinit_short_bench",
        json(&plain.stderr)["usage"]["fuel_consumed"]
            .as_u64()
            .unwrap(),
    );
    assert!(json(&plain.stderr)["load"]["preinit"].is_null());

    let inspect = wasm_infer(&["inspect", &out_str]);
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("given as the file"));

    // A component without `wizer-initialize` cannot be snapshotted: exit 3, no file.
    let refused_path = dir.join("hostile.snap.wasm");
    let refused = wasm_infer(&[
        "snapshot",
        &hostile(),
        "-o",
        &refused_path.display().to_string(),
    ]);
    assert_fails(&refused, 3, "wizer-initialize");
    assert!(!refused_path.exists());
}

#[test]
fn device_budget_trip_exits_15_and_accel_off_offers_no_device() {
    let out = wasm_infer(&["--vram", "64M", &hostile(), "accel-unwrap"]);
    assert_fails(
        &out,
        15,
        "device-memory budget exceeded: 4.00 GiB requested",
    );
    let report = wasm_infer(&[
        "--vram",
        "8M",
        "--report",
        "json",
        &hostile(),
        "accel-loop:1",
    ]);
    assert_eq!(code(&report), 0, "{}", stderr(&report));
    let usage = &json(&report.stderr)["usage"];
    assert_eq!(usage["device_peak_bytes"], 8 << 20);
    assert_eq!(usage["accel_refusals"], 1);
    let off = wasm_infer(&["-q", "--accel", "off", &hostile(), "accel-info"]);
    assert!(String::from_utf8_lossy(&off.stdout).contains("kind=DeviceKind::None"));
    let inspect = wasm_infer(&["inspect", "--accel", "cpu", &hostile()]);
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("accel:       cpu (host CPU"));
}

#[test]
fn a_bare_number_is_not_a_timeout() {
    let out = wasm_infer(&["--timeout", "7", &hostile(), "echo:x"]);
    assert_fails(&out, 2, "a duration needs a unit");
    let out = wasm_infer(&["--timeout", "7s", &hostile(), "echo:x"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn a_batch_over_max_batch_exits_13_before_loading_runs() {
    let out = wasm_infer_with_stdin(&["--max-batch", "2", &minilm(), "-"], Some(b"a\nb\nc\n"));
    assert_fails(&out, 13, "batch of 3 items exceeds the batch limit of 2");
    let out = wasm_infer_with_stdin(
        &["--report", "json", "--max-batch", "2", &minilm(), "-"],
        Some(b"a\nb\nc\n"),
    );
    let report = json(&out.stderr);
    assert_eq!(report["error"]["kind"], "input");
    assert_eq!(report["usage"]["fuel_consumed"], 0);
}

#[test]
fn the_guest_sees_no_environment_even_when_the_host_has_secrets() {
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .env("WASM_INFER_TEST_SECRET", "hunter2")
        .args([&hostile(), "env"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let reply = json(&out.stdout);
    assert_eq!(reply["output"]["text"], "vars=0 args=0 cwd=Some(\"/\")");
}

#[test]
fn cache_list_shows_entries_and_clear_empties_it() {
    let dir = support::target_dir().join(format!("cli-cache-{}", std::process::id()));
    support::remove_cache(&dir);
    let dir_arg = dir.to_str().unwrap();
    let out = wasm_infer(&["--cache-dir", dir_arg, &hostile(), "echo:x"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = wasm_infer(&["cache", "list", "--json", "--cache-dir", dir_arg]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed = json(&out.stdout);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["snapshot"], false);
    let bytes = listed[0]["bytes"].as_u64().unwrap();
    assert_eq!(
        bytes,
        std::fs::metadata(listed[0]["path"].as_str().unwrap())
            .unwrap()
            .len()
    );
    let out = wasm_infer(&["cache", "clear", "--cache-dir", dir_arg]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("removed 1 entries"));
    let out = wasm_infer(&["cache", "list", "--json", "--cache-dir", dir_arg]);
    assert_eq!(json(&out.stdout), serde_json::json!([]));
    support::remove_cache(&dir);
}

#[test]
fn host_backtraces_never_reach_the_guest() {
    // With backtraces on in the host's environment, an accelerator refusal the guest reports
    // is still the short, fixed-form message.
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .env("RUST_BACKTRACE", "1")
        .args([&hostile(), "accel-k0"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let reply = json(&out.stdout)["output"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reply.len() < 200, "{reply}");
    assert!(!reply.contains(".rs"), "{reply}");
}

#[test]
fn nan_canonicalization_is_a_flag_with_an_environment_fallback() {
    // The first line of the hostile guest's `nans` report: 0/0 as the run computed it.
    let zero_by_zero = |output: Output| {
        assert_eq!(code(&output), 0, "stderr: {}", stderr(&output));
        let text = json(&output.stdout)["output"]["text"]
            .as_str()
            .unwrap()
            .to_string();
        text.lines().next().unwrap().to_string()
    };
    let nans = ["--accel", "off", &hostile(), "nans"];
    assert_eq!(zero_by_zero(wasm_infer(&nans)), "0/0=ffc00000");
    let on = [&["--nan-canonicalization", "on"][..], &nans[..]].concat();
    assert_eq!(zero_by_zero(wasm_infer(&on)), "0/0=7fc00000");
    let from_env = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .env("WASM_INFER_NAN_CANONICALIZATION", "on")
        .args(nans)
        .output()
        .unwrap();
    assert_eq!(zero_by_zero(from_env), "0/0=7fc00000");
}

#[test]
fn running_out_of_file_descriptors_is_an_internal_error_not_the_guests_trap() {
    // The host's own resources failing (here: the process may open only N files) is the
    // host's error, exit 1 `internal`, whatever step it hits: not the guest trapping (exit 4)
    // nor a usage error (exit 2, which a compile worker that could not start for want of file
    // descriptors was). Each run compiles afresh (an empty cache), in a compile worker.
    let hostile = hostile_wasm();
    let hostile = hostile.to_str().unwrap();
    let mut internal = 0;
    for files in 4..=16u64 {
        let cache =
            support::target_dir().join(format!("tmp-nofile-{}-{files}", std::process::id()));
        support::remove_cache(&cache);
        let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-infer"));
        command
            .env("WASM_INFER_CACHE_DIR", &cache)
            .args([hostile, "echo:x"])
            .stdin(Stdio::null());
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: files,
                    rlim_max: files,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = command.output().unwrap();
        support::remove_cache(&cache);
        match code(&out) {
            0 => {}
            1 => {
                assert!(
                    stderr(&out).contains("the host ran out of a resource"),
                    "{}",
                    stderr(&out)
                );
                internal += 1
            }
            other => panic!(
                "{files} files: exit {other}, not 0 or 1 (internal): {}",
                stderr(&out)
            ),
        }
    }
    // Some limits in the range are too low to run at all: those runs end as internal errors.
    assert!(internal > 0);
}
