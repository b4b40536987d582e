//! Which device the binary opens at start, driven as a user would: `--accel cuda` and
//! `--accel auto` in a build without CUDA, and in a `--features cuda` build on a host without a
//! usable GPU (the tests here: a configuration error naming what is missing, exit 2, nothing on
//! stdout; `auto` on the CPU with one log line) or with one (`WASM_INFER_TEST_ACCEL=cuda`, set
//! by `just gpu-check`: both open the GPU).
//!
//! A CUDA build links the driver library (libcuda.so.1) at load time, so on a host with no
//! NVIDIA driver it starts only with the CUDA toolkit's stub on the library path, which
//! scripts/cuda-env.sh adds there: the driver then answers CUDA_ERROR_STUB_LIBRARY, reported
//! as "no CUDA driver".

mod support;

use std::process::{Command, Output, Stdio};

use support::{cache_dir, hostile_wasm};

fn wasm_infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .env_remove("WASM_INFER_ACCEL")
        .env_remove("WASM_INFER_LOG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running wasm-infer")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `hostile accel-info` with `--accel MODE`.
fn accel_info(mode: &str) -> Output {
    let hostile = hostile_wasm().display().to_string();
    wasm_infer(&["-q", "--accel", mode, &hostile, "accel-info"])
}

/// A configuration error at start: exit 2, nothing on stdout, `needle` on stderr, no panic.
fn assert_config_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(code(out), 2, "stderr: {err}");
    assert!(
        out.stdout.is_empty(),
        "stdout must stay empty: {}",
        stdout(out)
    );
    assert!(
        needles.iter().any(|n| err.contains(n)),
        "stderr names none of {needles:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn without_the_cuda_feature_accel_cuda_is_a_configuration_error() {
    let out = accel_info("cuda");
    assert_config_error(&out, &["this build has no CUDA support"]);
    assert!(stderr(&out).contains("--features cuda"), "{}", stderr(&out));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn without_the_cuda_feature_accel_auto_is_the_cpu_without_a_word() {
    let out = accel_info("auto");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("kind=DeviceKind::Cpu"),
        "{}",
        stdout(&out)
    );
    assert!(!stderr(&out).contains("CUDA"), "{}", stderr(&out));
}

/// Whether this run is on a machine with a GPU (`just gpu-check` sets it).
#[cfg(feature = "cuda")]
fn gpu_expected() -> bool {
    std::env::var("WASM_INFER_TEST_ACCEL").as_deref() == Ok("cuda")
}

/// The log line `--accel auto` writes when it falls back.
#[cfg(feature = "cuda")]
const FALLBACK: &str = "CUDA unavailable";

#[cfg(feature = "cuda")]
#[test]
fn accel_cuda_opens_the_gpu_or_names_what_is_missing() {
    let out = accel_info("cuda");
    if gpu_expected() {
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stdout(&out).contains("kind=DeviceKind::Cuda"),
            "{}",
            stdout(&out)
        );
        return;
    }
    assert_config_error(
        &out,
        &[
            "no CUDA driver",
            "no CUDA device",
            "cannot run this build's CUDA version",
        ],
    );
    // The CLI's own wording around the library's configuration error.
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}

#[cfg(feature = "cuda")]
#[test]
fn accel_auto_without_a_gpu_runs_on_the_cpu_after_one_log_line() {
    let out = accel_info("auto");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let fallbacks = stderr(&out)
        .lines()
        .filter(|line| line.contains(FALLBACK))
        .count();
    if gpu_expected() {
        assert!(
            stdout(&out).contains("kind=DeviceKind::Cuda"),
            "{}",
            stdout(&out)
        );
        assert_eq!(fallbacks, 0, "{}", stderr(&out));
        return;
    }
    assert!(
        stdout(&out).contains("kind=DeviceKind::Cpu"),
        "{}",
        stdout(&out)
    );
    assert_eq!(fallbacks, 1, "exactly one fallback line: {}", stderr(&out));
    assert!(
        stderr(&out).contains("using the CPU backend"),
        "{}",
        stderr(&out)
    );
    // `inspect` opens the device the same way and says which it got.
    let hostile = hostile_wasm().display().to_string();
    let inspect = wasm_infer(&["inspect", "--accel", "auto", &hostile]);
    assert_eq!(code(&inspect), 0, "{}", stderr(&inspect));
    assert!(
        stdout(&inspect).contains("accel:       cpu (host CPU"),
        "{}",
        stdout(&inspect)
    );
}

#[cfg(feature = "cuda")]
#[test]
fn accel_cpu_and_off_never_touch_the_driver() {
    for (mode, kind) in [("cpu", "Cpu"), ("off", "None")] {
        let out = accel_info(mode);
        assert_eq!(code(&out), 0, "{mode}: {}", stderr(&out));
        assert!(
            stdout(&out).contains(&format!("kind=DeviceKind::{kind}")),
            "{}",
            stdout(&out)
        );
        assert!(!stderr(&out).contains("CUDA"), "{mode}: {}", stderr(&out));
    }
}
