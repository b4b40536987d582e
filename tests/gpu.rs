//! The GPU check (`just gpu-check`): the accelerator path on the device that
//! `WASM_INFER_TEST_ACCEL` names (`cuda` on a machine with a GPU and a `--features cuda` build;
//! `cpu` runs the same checks on the CPU backend, a dry run anywhere). One test, ignored unless
//! asked for, that runs every check in turn and prints one summary table:
//!
//! - the device the runtime opened, and a guest's view of it;
//! - the reference embeddings (tests/fixtures/reference.json) through the device: cosine
//!   >= 0.9999 against the reference and against the sandbox's own computation;
//! - a linear layer + GELU against an exact computation in the sandbox, and fuel that does not
//!   depend on the device (the golden figure);
//! - budgets on the real device: a run's budget refused exactly, a 4 GiB result refused before
//!   anything is allocated (the driver sees no such allocation), a guest that does not fall
//!   back failing with the device-budget error, every run ending returning its memory, and
//!   concurrent runs held to the host-wide budget;
//! - MiniLM falling back to the sandbox when its device budget is too small;
//! - (CUDA) the driver's free-memory check: with the GPU filled but for 256 MiB, allocations
//!   are refused with the driver's figures before candle asks for them;
//! - (CUDA) device-memory truth: a run's accounted device bytes against what the driver reports
//!   in use (`cuMemGetInfo`, sampled during the run, and after it);
//! - benchmark rows: MiniLM on the reference batch on the device, on the CPU backend and in the
//!   sandbox.
//!
//! The rows are printed whatever happens (a failing check is a FAIL row with its message), and
//! the test fails if any row did.

mod support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use support::{cosine, hostile_wasm, minilm_wasm};
use wasm_infer::{
    AccelMode, Input, LimitExceeded, Limits, Model, Outcome, Output, RunError, Runtime,
    RuntimeConfig,
};

const MIB: u64 = 1 << 20;

/// How far the driver's in-use figure may exceed a run's accounted bytes: the stream-ordered
/// allocator maps whole 2 MiB pages and grows its pool in chunks.
const ROUNDING: u64 = 64 * MIB;

/// The device under test, from `WASM_INFER_TEST_ACCEL`.
fn selected() -> AccelMode {
    match std::env::var("WASM_INFER_TEST_ACCEL").as_deref() {
        Ok("cuda") => AccelMode::Cuda,
        Ok("cpu") => AccelMode::Cpu,
        other => panic!(
            "set WASM_INFER_TEST_ACCEL=cuda (a GPU and a --features cuda build: `just gpu-check`) \
             or =cpu (a dry run on the CPU backend), not {other:?}"
        ),
    }
}

fn runtime(accel: AccelMode, host_budget: u64) -> Runtime {
    Runtime::with_config(RuntimeConfig {
        cache_dir: Some(support::cache_dir()),
        accel,
        device_memory: host_budget,
        ..RuntimeConfig::default()
    })
    .expect("creating the runtime")
}

fn text(outcome: &Outcome) -> &str {
    match &outcome.output {
        Output::Text(text) => text,
        other => panic!("expected text, got {other:?}"),
    }
}

fn run(model: &Model, command: &str, limits: &Limits) -> Result<Outcome, RunError> {
    model.run(Input::Text(command.into()), limits)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// One row of the summary table.
struct Row {
    check: &'static str,
    pass: bool,
    detail: String,
}

/// Runs one check, turning a panic into a FAIL row.
fn check(rows: &mut Vec<Row>, name: &'static str, f: impl FnOnce() -> Result<String, String>) {
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".to_string()))
    });
    let seconds = started.elapsed().as_secs_f64();
    let (pass, detail) = match result {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    eprintln!(
        "gpu-check: {} {name} ({seconds:.1} s)",
        if pass { "PASS" } else { "FAIL" }
    );
    rows.push(Row {
        check: name,
        pass,
        detail: format!("{detail} [{seconds:.1} s]"),
    });
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(message())
    }
}

/// The driver's figures for device 0 (CUDA builds only).
#[cfg(feature = "cuda")]
mod driver {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use candle_core::cuda::cudarc::driver::{result, CudaContext};

    /// What the driver said about one stretch of work: free bytes before it, the least seen
    /// during it, and after it (each settled: all work synchronised, the pool trimmed).
    pub struct Watch {
        pub before: u64,
        pub min_free: u64,
        pub after: u64,
    }

    impl Watch {
        /// Bytes in use at the peak, over the figure before.
        pub fn peak(&self) -> u64 {
            self.before.saturating_sub(self.min_free)
        }
        /// Bytes still in use after, over the figure before (negative: fewer).
        pub fn left(&self) -> i64 {
            self.before as i64 - self.after as i64
        }
    }

    pub struct Gpu {
        context: Arc<CudaContext>,
    }

    impl Gpu {
        /// Device 0's primary context: the one candle uses.
        pub fn open() -> Self {
            Self {
                context: CudaContext::new(0).expect("opening CUDA device 0"),
            }
        }

        /// Free bytes once all work is done and the stream-ordered pool has given back what
        /// it holds beyond its release threshold (it does so on synchronisation).
        pub fn free(&self) -> u64 {
            self.context.synchronize().expect("cuCtxSynchronize");
            self.context.mem_get_info().expect("cuMemGetInfo").0 as u64
        }

        /// Runs `f`, sampling the driver's free memory every 100 µs on another thread.
        pub fn watch<T>(&self, f: impl FnOnce() -> T) -> (T, Watch) {
            let before = self.free();
            let min_free = AtomicU64::new(before);
            let stop = AtomicBool::new(false);
            let out = std::thread::scope(|scope| {
                scope.spawn(|| {
                    self.context.bind_to_thread().expect("binding the context");
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok((free, _)) = result::mem_get_info() {
                            min_free.fetch_min(free as u64, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                });
                let out = f();
                stop.store(true, Ordering::SeqCst);
                out
            });
            let after = self.free();
            let min_free = min_free.load(Ordering::SeqCst).min(after);
            (
                out,
                Watch {
                    before,
                    min_free,
                    after,
                },
            )
        }

        /// Takes all but `leave` bytes of the device's free memory (plain cuMemAlloc) until
        /// the guard is dropped.
        pub fn fill(&self, leave: u64) -> Filler {
            let free = self.free();
            let bytes = free.saturating_sub(leave) as usize;
            self.context.bind_to_thread().expect("binding the context");
            let ptr = unsafe { result::malloc_sync(bytes) }.expect("filling the device");
            Filler {
                context: self.context.clone(),
                ptr,
                bytes: bytes as u64,
            }
        }
    }

    pub struct Filler {
        context: Arc<CudaContext>,
        ptr: candle_core::cuda::cudarc::driver::sys::CUdeviceptr,
        pub bytes: u64,
    }

    impl Drop for Filler {
        fn drop(&mut self) {
            let _ = self.context.bind_to_thread();
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

#[test]
#[ignore = "needs WASM_INFER_TEST_ACCEL=cuda and a GPU (`just gpu-check`), or =cpu for a dry run"]
fn gpu_check() {
    let mode = selected();
    let started = Instant::now();
    let device = runtime(mode, wasm_infer::DEFAULT_HOST_DEVICE_MEMORY);
    let (kind, name) = device.device();
    let (kind, name) = (kind.to_string(), name.to_string());
    let hostile = Model::load(&device, hostile_wasm()).expect("loading hostile.wasm");
    let minilm = Model::load(&device, minilm_wasm()).expect("loading minilm.wasm");
    let sandbox = support::minilm_in_sandbox();
    #[cfg(feature = "cuda")]
    let gpu = (mode == AccelMode::Cuda).then(driver::Gpu::open);
    let mut rows = Vec::new();

    check(&mut rows, "device", || {
        let expected = match mode {
            AccelMode::Cuda => "cuda",
            _ => "cpu",
        };
        ensure(kind == expected, || format!("opened {kind} ({name})"))?;
        let outcome = run(
            &hostile,
            "accel-info",
            &Limits::default().device_memory(3 * MIB),
        )
        .map_err(|e| e.to_string())?;
        let reply = text(&outcome);
        ensure(
            reply.ends_with("budget=3145728 used=0") && reply.to_lowercase().contains(expected),
            || format!("the guest sees {reply:?}"),
        )?;
        Ok(format!("{kind}: {name}"))
    });

    let reference = support::reference();
    let texts: Vec<String> = reference.cases.iter().map(|c| c.text.clone()).collect();
    let batch = Input::Texts(texts.clone());

    check(&mut rows, "reference embeddings", || {
        let on_device = minilm
            .run(batch.clone(), &Limits::default())
            .map_err(|e| e.to_string())?;
        let in_sandbox = sandbox
            .run(batch.clone(), &Limits::default())
            .map_err(|e| e.to_string())?;
        let (a, b) = (
            on_device.output.embeddings().unwrap(),
            in_sandbox.output.embeddings().unwrap(),
        );
        let (mut vs_reference, mut vs_sandbox) = (1f64, 1f64);
        for ((case, x), y) in reference.cases.iter().zip(a).zip(b) {
            vs_reference = vs_reference.min(cosine(x, &case.embedding));
            vs_sandbox = vs_sandbox.min(cosine(x, y));
        }
        ensure(vs_reference >= 0.9999 && vs_sandbox >= 0.9999, || {
            format!("min cosine {vs_reference:.6} vs reference, {vs_sandbox:.6} vs sandbox")
        })?;
        ensure(
            on_device.usage.accel_refusals == 0 && on_device.usage.device_uploaded_bytes > 40 * MIB,
            || format!("not offloaded: {}", on_device.usage),
        )?;
        Ok(format!(
            "{} cases: min cosine {vs_reference:.7} vs reference, {vs_sandbox:.7} vs sandbox; \
             {} uploaded, {} ops",
            reference.cases.len(),
            mib(on_device.usage.device_uploaded_bytes),
            on_device.usage.accel_ops
        ))
    });

    check(&mut rows, "linear + GELU vs exact", || {
        let mut fuel = 0;
        for command in ["accel-linear:17,384,33", "accel-linear:128,384,1536"] {
            let outcome = run(&hostile, command, &Limits::default()).map_err(|e| e.to_string())?;
            ensure(text(&outcome) == "max_diff_ok=true", || {
                format!("{command}: {}", text(&outcome))
            })?;
            if fuel == 0 {
                fuel = outcome.usage.fuel_consumed;
            }
        }
        // The cost model does not depend on the device: the CPU's golden figure.
        support::assert_golden("hostile_accel_linear_17_384_33", fuel);
        Ok(format!(
            "max |diff| < 1e-4 at 17x384x33 and 128x384x1536; fuel {fuel} = golden"
        ))
    });

    check(&mut rows, "per-run budget refused", || {
        let rt = runtime(mode, wasm_infer::DEFAULT_HOST_DEVICE_MEMORY);
        let model = Model::load(&rt, hostile_wasm()).map_err(|e| e.to_string())?;
        let outcome = run(
            &model,
            "accel-loop:1",
            &Limits::default().device_memory(8 * MIB),
        )
        .map_err(|e| e.to_string())?;
        ensure(text(&outcome) == "8 1048576 8388608 8388608", || {
            format!("reply {:?}", text(&outcome))
        })?;
        ensure(
            outcome.usage.device_peak_bytes == 8 * MIB
                && outcome.usage.accel_refusals == 1
                && rt.device_usage().used == 0,
            || format!("{} / {:?}", outcome.usage, rt.device_usage()),
        )?;
        let failure = run(
            &model,
            "accel-unwrap",
            &Limits::default().device_memory(64 * MIB),
        )
        .expect_err("accel-unwrap must fail");
        ensure(
            failure.error.limit()
                == Some(&LimitExceeded::DeviceMemory {
                    requested: 4 << 30,
                    used: 262_144,
                    budget: 64 * MIB,
                }),
            || format!("accel-unwrap: {}", failure.error),
        )?;
        Ok(
            "8 x 1 MiB granted, the 9th refused (8 MiB budget); no fallback = device-budget error"
                .to_string(),
        )
    });

    check(&mut rows, "4 GiB refused before allocating", || {
        let rt = runtime(mode, wasm_infer::DEFAULT_HOST_DEVICE_MEMORY);
        let model = Model::load(&rt, hostile_wasm()).map_err(|e| e.to_string())?;
        let limits = Limits::default().device_memory(64 * MIB);
        let huge = || run(&model, "accel-huge", &limits);
        #[cfg(feature = "cuda")]
        let (outcome, driver) = match &gpu {
            Some(gpu) => {
                let (outcome, watch) = gpu.watch(huge);
                (outcome, Some(watch.peak()))
            }
            None => (huge(), None),
        };
        #[cfg(not(feature = "cuda"))]
        let (outcome, driver): (_, Option<u64>) = (huge(), None);
        let outcome = outcome.map_err(|e| e.to_string())?;
        ensure(text(&outcome) == "4294967296 262144 67108864", || {
            format!("reply {:?}", text(&outcome))
        })?;
        ensure(rt.device_usage().peak == 262_144, || {
            format!("{:?}", rt.device_usage())
        })?;
        if let Some(peak) = driver {
            ensure(peak < ROUNDING, || {
                format!("the driver saw {} in use during the run", mib(peak))
            })?;
        }
        Ok(match driver {
            Some(peak) => format!("accounted peak 256 KiB; driver peak {}", mib(peak)),
            None => "accounted peak 256 KiB (no driver figures on the CPU)".to_string(),
        })
    });

    check(&mut rows, "every run ending frees", || {
        let rt = runtime(mode, wasm_infer::DEFAULT_HOST_DEVICE_MEMORY);
        let model = Model::load(&rt, hostile_wasm()).map_err(|e| e.to_string())?;
        #[cfg(feature = "cuda")]
        let before = gpu.as_ref().map(|gpu| gpu.free());
        support::every_run_ending_frees_the_device(&model, || rt.device_usage().used)?;
        #[cfg(feature = "cuda")]
        if let (Some(gpu), Some(before)) = (&gpu, before) {
            let left = before as i64 - gpu.free() as i64;
            ensure(left < ROUNDING as i64, || {
                format!("the driver shows {} more in use after the five runs", left)
            })?;
            return Ok(format!(
                "success, fuel, timeout (wasm, host call), trap: 0 accounted after each; \
                 driver in use after all five: {:+.1} MiB",
                left as f64 / MIB as f64
            ));
        }
        Ok("success, fuel, timeout (wasm, host call), trap: 0 accounted after each".to_string())
    });

    check(&mut rows, "host-wide budget", || {
        let rt = runtime(mode, 10 * MIB);
        let model = Model::load(&rt, hostile_wasm()).map_err(|e| e.to_string())?;
        let limits = Limits::default().device_memory(8 * MIB);
        let replies: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| run(&model, "accel-loop:1", &limits)))
                .collect();
            handles
                .into_iter()
                .map(|h| match h.join().unwrap() {
                    Ok(outcome) => text(&outcome).to_string(),
                    Err(e) => format!("failed: {e}"),
                })
                .collect()
        });
        let usage = rt.device_usage();
        ensure(usage.peak <= 10 * MIB && usage.used == 0, || {
            format!("{usage:?}")
        })?;
        for reply in &replies {
            let fields: Vec<u64> = reply.split(' ').filter_map(|f| f.parse().ok()).collect();
            ensure(
                fields.len() == 4
                    && fields[0] <= 8
                    && fields[1] == MIB
                    && (fields[3] == 8 * MIB || fields[3] == 10 * MIB),
                || format!("reply {reply:?}"),
            )?;
        }
        Ok(format!(
            "8 concurrent runs (8 MiB each) under a 10 MiB host budget: peak {}",
            mib(usage.peak)
        ))
    });

    check(&mut rows, "fallback to the sandbox", || {
        let short = Input::Text(support::case("short_bench").text);
        let sandboxed = sandbox
            .run(short.clone(), &Limits::default())
            .map_err(|e| e.to_string())?;
        let fell_back = minilm
            .run(short, &Limits::default().device_memory(20 * MIB))
            .map_err(|e| e.to_string())?;
        ensure(
            support::bits(&fell_back) == support::bits(&sandboxed),
            || "the fallback's embedding differs from the sandbox's".to_string(),
        )?;
        ensure(
            fell_back.usage.accel_refusals == 1 && fell_back.usage.device_peak_bytes <= 20 * MIB,
            || format!("{}", fell_back.usage),
        )?;
        Ok(format!(
            "20 MiB budget: refused at {}, then bit-identical to the sandbox",
            mib(fell_back.usage.device_peak_bytes)
        ))
    });

    #[cfg(feature = "cuda")]
    if let Some(gpu) = &gpu {
        check(&mut rows, "driver free-memory check", || {
            let rt = runtime(mode, u64::MAX / 2);
            let model = Model::load(&rt, hostile_wasm()).map_err(|e| e.to_string())?;
            let filler = gpu.fill(256 * MIB);
            let (filled, free) = (filler.bytes, gpu.free());
            let outcome = run(
                &model,
                "accel-loop:64",
                &Limits::default().device_memory(u64::MAX / 2),
            );
            drop(filler);
            let outcome = outcome.map_err(|e| e.to_string())?;
            let reply = text(&outcome);
            ensure(
                reply.contains("DeviceFailure") && reply.contains("bytes free"),
                || format!("reply {reply:?} with {} free", mib(free)),
            )?;
            ensure(rt.device_usage().used == 0, || {
                format!("{:?}", rt.device_usage())
            })?;
            Ok(format!(
                "{} taken, {} left free: {} x 64 MiB granted, then refused on the driver's \
                 figure before allocating",
                mib(filled),
                mib(free),
                reply.split(' ').next().unwrap_or("?")
            ))
        });

        check(&mut rows, "device-memory truth", || {
            let rt = runtime(mode, wasm_infer::DEFAULT_HOST_DEVICE_MEMORY);
            let model = Model::load(&rt, hostile_wasm()).map_err(|e| e.to_string())?;
            let limits = Limits::default().device_memory(1 << 30);
            // A first run loads what the device keeps for good (kernels, cuBLAS workspace).
            run(&model, "accel-loop:64", &limits).map_err(|e| e.to_string())?;
            let (outcome, watch) = gpu.watch(|| run(&model, "accel-loop:64", &limits));
            let outcome = outcome.map_err(|e| e.to_string())?;
            let accounted = outcome.usage.device_peak_bytes;
            ensure(accounted == 1 << 30, || format!("{}", outcome.usage))?;
            let (peak, left) = (watch.peak(), watch.left());
            let mut detail = format!(
                "16 x 64 MiB: accounted {}, driver in use at peak {} (before {} free, min {} \
                 free), after {:+.1} MiB",
                mib(accounted),
                mib(peak),
                mib(watch.before),
                mib(watch.min_free),
                left as f64 / MIB as f64
            );
            ensure(
                peak + 2 * MIB >= accounted && peak <= accounted + ROUNDING,
                || format!("{detail}: not within {} rounding", mib(ROUNDING)),
            )?;
            ensure(left < ROUNDING as i64, || format!("{detail}: not returned"))?;

            // MiniLM: the real model's peak, sampled (a short peak can be missed: only the
            // upper bound is checked).
            let (outcome, watch) = gpu.watch(|| minilm.run(batch.clone(), &Limits::default()));
            let outcome = outcome.map_err(|e| e.to_string())?;
            let accounted = outcome.usage.device_peak_bytes;
            detail.push_str(&format!(
                "; MiniLM batch: accounted {}, driver peak {}",
                mib(accounted),
                mib(watch.peak())
            ));
            ensure(watch.peak() <= accounted + ROUNDING, || {
                format!("{detail}: the driver saw more than the account")
            })?;
            Ok(detail)
        });
    }

    // Benchmark rows: the reference batch, median of 3 after a warm-up.
    let time = |model: &Model| -> Result<Duration, String> {
        model
            .run(batch.clone(), &Limits::default())
            .map_err(|e| e.to_string())?;
        let mut times: Vec<Duration> = (0..3)
            .map(|_| {
                let t = Instant::now();
                model
                    .run(batch.clone(), &Limits::default())
                    .map(|_| t.elapsed())
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        times.sort();
        Ok(times[1])
    };
    let cases = reference.cases.len();
    check(&mut rows, "bench: MiniLM on the device", || {
        Ok(format!(
            "{} ms per batch of {cases} ({kind})",
            time(&minilm)?.as_millis()
        ))
    });
    if mode != AccelMode::Cpu {
        check(&mut rows, "bench: MiniLM on the CPU backend", || {
            let rt = runtime(AccelMode::Cpu, wasm_infer::DEFAULT_HOST_DEVICE_MEMORY);
            let model = Model::load(&rt, minilm_wasm()).map_err(|e| e.to_string())?;
            Ok(format!(
                "{} ms per batch of {cases}",
                time(&model)?.as_millis()
            ))
        });
    }
    check(&mut rows, "bench: MiniLM in the sandbox", || {
        Ok(format!(
            "{} ms per batch of {cases} (no accelerator)",
            time(sandbox)?.as_millis()
        ))
    });

    let failed = rows.iter().filter(|r| !r.pass).count();
    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
    println!();
    println!("GPU check: --accel {kind}: {name}");
    println!("{:<width$}  result  detail", "check");
    println!("{:-<width$}  ------  ------", "");
    for row in &rows {
        let result = if row.pass { "PASS" } else { "FAIL" };
        println!("{:<width$}  {result:<6}  {}", row.check, row.detail);
    }
    println!(
        "{} passed, {failed} failed, in {:.0} s",
        rows.len() - failed,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failed, 0, "{failed} GPU check(s) failed: see the table");
}
