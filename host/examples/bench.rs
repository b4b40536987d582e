//! `just bench`: in one run, native candle (1 thread and all cores) against the sandbox (NaN
//! canonicalisation off and on) and the accelerator path, on short, long and maximal (256
//! tokens) inputs; throughput with concurrent requests on a pooled runtime against native
//! callers on the same cores; the cost of compiling, loading precompiled code and
//! instantiating; with `--memory`, memory with N concurrent runs. Prints Markdown tables; the
//! ratios are the result (absolute times vary from machine to machine and run to run).
//!
//! Usage: `cargo run --release --example bench -- MINILM_WASM [--memory]` (`--memory` adds the
//! memory table, which takes several more minutes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasm_infer::{AccelMode, Input, Limits, LoadOptions, Model, Runtime, RuntimeConfig};

const SHORT: &str = "wasm-infer runs sentence embeddings inside a WebAssembly sandbox.";
const ITERATIONS: usize = 5;
/// Texts per batch when measuring the marginal in-sandbox cost of one embedding.
const BATCH: usize = 4;
/// Concurrent callers in the throughput rows.
const CONCURRENT: usize = 4;
/// Requests each caller makes in the throughput rows.
const REQUESTS_EACH: usize = 4;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time(mut f: impl FnMut()) -> Duration {
    f(); // warm-up
    median(
        (0..ITERATIONS)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

/// Medians of `cases`, timed in rounds (one sample of each case in turn, [`ITERATIONS`]
/// rounds after a warm-up round): on a shared machine the background load moves more than the
/// differences measured, and interleaving puts every case under the same load.
fn interleaved(cases: &mut [Box<dyn FnMut() + '_>]) -> Vec<Duration> {
    let mut samples = vec![Vec::new(); cases.len()];
    for round in 0..=ITERATIONS {
        for (case, samples) in cases.iter_mut().zip(&mut samples) {
            let t = Instant::now();
            case();
            if round > 0 {
                samples.push(t.elapsed());
            }
        }
    }
    samples.into_iter().map(median).collect()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn reference_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string()
}

fn model_dir() -> PathBuf {
    std::env::var_os("WASM_INFER_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/wasm-infer/model")
        })
}

/// (Rss, Pss) of this process in bytes, from /proc/self/smaps_rollup. Rss counts a shared page
/// once per mapping, so N instances mapping the same snapshot page count it N times; Pss
/// divides each page among its mappings, i.e. counts physical memory once.
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("Rss:"), field("Pss:"))
}

/// Child mode: load the model, run once, then `n` concurrent runs (each a batch, so all `n`
/// instances are alive at once) while sampling memory every 5 ms; prints
/// `after_one_run_pss peak_rss peak_pss` in bytes.
fn rss_child(n: u32, pool: bool, preinit: bool, text: &str, wasm: &Path, cache: &Path) {
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache.to_path_buf()),
        pool: pool.then_some(n),
        accel: AccelMode::Off,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let options = LoadOptions {
        preinit,
        ..LoadOptions::default()
    };
    let model = Model::load_with(&runtime, wasm, &options).unwrap();
    let batch = Input::Texts(vec![reference_text(text); 4]);
    model.run(batch.clone(), &Limits::default()).unwrap();
    let (_, baseline) = memory();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (peak_rss, peak_pss) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = (0, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let (rss, pss) = memory();
                peak = (peak.0.max(rss), peak.1.max(pss));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        let handles: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| model.run(batch.clone(), &Limits::default()).unwrap()))
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap()
    });
    println!("{baseline} {peak_rss} {peak_pss}");
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The same model code, natively (candle on the host CPU).
fn native_embedder() -> minilm::Embedder {
    minilm::Embedder::load_dir(&model_dir()).unwrap()
}

/// The benchmark inputs: (label with its token count, text).
fn inputs(native: &minilm::Embedder) -> Vec<(String, String)> {
    [
        ("short", SHORT.to_string()),
        ("long", reference_text("long_bench")),
        // Longer than the model's 256-token window: truncated to it.
        ("max", reference_text("long_truncated")),
    ]
    .into_iter()
    .map(|(name, text)| {
        let tokens = native.token_ids(&text).unwrap().len();
        (format!("{name} ({tokens} tokens)"), text)
    })
    .collect()
}

fn ratio(time: Duration, base: Duration) -> String {
    format!("{:.2}x", time.as_secs_f64() / base.as_secs_f64())
}

/// Two cases for [`interleaved`]: a fresh request of `text` alone, and a batch of [`BATCH`].
fn one_and_batch<'a>(model: &'a Model, text: &'a str) -> [Box<dyn FnMut() + 'a>; 2] {
    [
        Box::new(move || {
            model
                .run(Input::Text(text.to_string()), &Limits::default())
                .unwrap();
        }),
        Box::new(move || {
            model
                .run(
                    Input::Texts(vec![text.to_string(); BATCH]),
                    &Limits::default(),
                )
                .unwrap();
        }),
    ]
}

/// The marginal cost of one more embedding in a batch: (batch - one) / (BATCH - 1).
fn marginal(one: Duration, batch: Duration) -> Duration {
    batch.saturating_sub(one) / (BATCH as u32 - 1)
}

/// Embeddings per second with [`CONCURRENT`] callers, each making [`REQUESTS_EACH`] requests.
fn throughput(call: impl Fn() + Sync) -> f64 {
    call(); // warm-up
    let t = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CONCURRENT {
            scope.spawn(|| {
                for _ in 0..REQUESTS_EACH {
                    call();
                }
            });
        }
    });
    (CONCURRENT * REQUESTS_EACH) as f64 / t.elapsed().as_secs_f64()
}

/// Child mode for every row that uses all cores: candle on the host sizes its thread pool to
/// the machine here (no RAYON_NUM_THREADS), natively and as the accel path's CPU backend.
fn all_cores_child(wasm: &Path, cache: &Path) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let native = native_embedder();
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache.to_path_buf()),
        accel: AccelMode::Cpu,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let model = Model::load(&runtime, wasm).unwrap();
    for (label, text) in inputs(&native) {
        let [one, batch] = one_and_batch(&model, &text);
        let native_case: Box<dyn FnMut()> = Box::new(|| {
            native.embed(&text).unwrap();
        });
        let t = interleaved(&mut [native_case, one, batch]);
        let (native_time, one, marginal) = (t[0], t[1], marginal(t[1], t[2]));
        println!(
            "| native candle, {threads} threads, per embedding | {label} | {} | 1.00x |",
            ms(native_time)
        );
        println!(
            "| accel path (CPU backend, {threads} threads), per embedding (marginal in a batch of {BATCH}) | {label} | {} | {} |",
            ms(marginal),
            ratio(marginal, native_time)
        );
        println!(
            "| accel path (CPU backend, {threads} threads), fresh request, end to end | {label} | {} | {} |",
            ms(one),
            ratio(one, native_time)
        );
    }

    // Throughput: CONCURRENT callers on a pooled runtime vs the same callers sharing one
    // native model, on the same cores.
    let text = reference_text("long_bench");
    let label = "long";
    let native_rate = throughput(|| {
        native.embed(&text).unwrap();
    });
    println!(
        "| throughput, {CONCURRENT} concurrent callers, native candle ({threads} threads) | {label} | {native_rate:.1} emb/s | 1.00x |"
    );
    for (accel, nan_canonicalization, path) in [
        (AccelMode::Cpu, false, "accel path"),
        (AccelMode::Off, false, "in-sandbox, NaN canon. off"),
        (AccelMode::Off, true, "in-sandbox, NaN canon. on"),
    ] {
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: Some(cache.to_path_buf()),
            pool: Some(CONCURRENT as u32),
            accel,
            nan_canonicalization,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let model = Model::load(&runtime, wasm).unwrap();
        let rate = throughput(|| {
            model
                .run(Input::Text(text.clone()), &Limits::default())
                .unwrap();
        });
        println!(
            "| throughput, {CONCURRENT} concurrent requests, pooled runtime ({CONCURRENT} slots), {path} | {label} | {rate:.1} emb/s | {:.2}x |",
            rate / native_rate
        );
    }
}

/// The CPU the benchmark ran on, from /proc/cpuinfo: model name, family/model/stepping, the
/// vector features that decide which instructions the sandbox's and native candle's kernels
/// use, and the core count.
fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map_or("?", |(_, v)| v.trim())
    };
    let flags: Vec<&str> = field("flags").split_whitespace().collect();
    let features: Vec<&str> = ["sse4_1", "avx", "avx2", "fma", "avx512f", "avx512vl"]
        .into_iter()
        .filter(|f| flags.contains(f))
        .collect();
    format!(
        "CPU: {} (family {}, model {}, stepping {}), {} logical cores, features: {}",
        field("model name"),
        field("cpu family"),
        field("model"),
        field("stepping"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        features.join(" ")
    )
}

fn main() {
    let all: Vec<String> = std::env::args().collect();
    if all.get(1).map(String::as_str) == Some("--all-cores") {
        all_cores_child(Path::new(&all[2]), Path::new(&all[3]));
        return;
    }
    // Single-threaded native baseline: candle sizes its thread pool from this variable.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    if all.get(1).map(String::as_str) == Some("--rss") {
        let n = all[2].parse().unwrap();
        rss_child(
            n,
            all[3] == "pool",
            all[4] == "preinit",
            &all[5],
            Path::new(&all[6]),
            Path::new(&all[7]),
        );
        return;
    }
    let minilm = PathBuf::from(all.get(1).expect("usage: bench MINILM_WASM"));
    let native = native_embedder();
    let inputs = inputs(&native);

    let cache = std::env::temp_dir().join(format!("wasm-infer-bench-{}", std::process::id()));
    // The sandbox alone (no accelerator), from the pre-initialised snapshot, with fuel and
    // epochs, under each determinism setting; timed interleaved with native candle.
    let sandbox = |nan_canonicalization| {
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: Some(cache.clone()),
            nan_canonicalization,
            accel: AccelMode::Off,
            ..RuntimeConfig::default()
        })
        .unwrap();
        Model::load(&runtime, &minilm).unwrap()
    };
    let (off, on) = (sandbox(false), sandbox(true));
    // Ratios to native depend on the CPU (docs/benchmarks.md): say which one ran them.
    println!("{}\n", cpu_line());
    println!("| measurement | input | time | vs native |");
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    let mut native_times = Vec::new();
    for (label, text) in &inputs {
        let native_case: Box<dyn FnMut()> = Box::new(|| {
            native.embed(text).unwrap();
        });
        let [off_one, off_batch] = one_and_batch(&off, text);
        let [on_one, on_batch] = one_and_batch(&on, text);
        let t = interleaved(&mut [native_case, off_one, off_batch, on_one, on_batch]);
        native_times.push(t[0]);
        println!(
            "| native candle, 1 thread, per embedding | {label} | {} | 1.00x |",
            ms(t[0])
        );
        for (canon, one, batch) in [("off", t[1], t[2]), ("on", t[3], t[4])] {
            let mode = format!("fuel + epochs, NaN canon. {canon}");
            let marginal = marginal(one, batch);
            rows.push(format!(
                "| in-sandbox ({mode}), per embedding (marginal in a batch of {BATCH}) | {label} | {} | {} |",
                ms(marginal),
                ratio(marginal, t[0])
            ));
            rows.push(format!(
                "| in-sandbox ({mode}), fresh request, end to end | {label} | {} | {} |",
                ms(one),
                ratio(one, t[0])
            ));
        }
    }
    for row in rows {
        println!("{row}");
    }

    // What the snapshot saves a fresh request: the same request without it.
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache.clone()),
        accel: AccelMode::Off,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let plain = LoadOptions {
        preinit: false,
        ..LoadOptions::default()
    };
    let model = Model::load_with(&runtime, &minilm, &plain).unwrap();
    let (label, text) = &inputs[0];
    let one = time(|| {
        model
            .run(Input::Text(text.clone()), &Limits::default())
            .unwrap();
    });
    println!(
        "| in-sandbox (fuel + epochs, NaN canon. off, no preinit), fresh request, end to end | {label} | {} | {} |",
        ms(one),
        ratio(one, native_times[0])
    );

    // Native candle on all cores, the accelerator path and throughput, in a child process.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--all-cores")
        .arg(&minilm)
        .arg(&cache)
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));

    // Compile, precompiled load, instantiate.
    let wasm = std::fs::read(&minilm).unwrap();
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: None,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let t = Instant::now();
    let plain = LoadOptions {
        preinit: false,
        ..LoadOptions::default()
    };
    Model::from_bytes_with(&runtime, &wasm, &plain).unwrap();
    println!(
        "| compile the component (no cache, no preinit) | - | {} | |",
        ms(t.elapsed())
    );
    let t = Instant::now();
    let model = Model::from_bytes(&runtime, &wasm).unwrap();
    let elapsed = t.elapsed();
    let init = &model.load_report().preinit.as_ref().unwrap().init;
    println!(
        "| instrument + compile + initialise + snapshot + compile the snapshot (no cache) | - | {} | |",
        ms(elapsed)
    );
    println!(
        "| of which the one-time initialisation ({} fuel, {} memory) | - | {} | |",
        init.fuel,
        mib(init.memory_bytes),
        ms(init.time)
    );
    let cached = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache.clone()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    Model::from_bytes(&cached, &wasm).unwrap();
    let load = median(
        (0..ITERATIONS)
            .map(|_| {
                Model::from_bytes(&cached, &wasm)
                    .unwrap()
                    .load_report()
                    .code_time
            })
            .collect(),
    );
    println!(
        "| load precompiled code from the cache | - | {} | |",
        ms(load)
    );
    for (pool, label) in [(None, "on demand"), (Some(4), "pooled")] {
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: Some(cache.clone()),
            pool,
            accel: AccelMode::Off,
            ..RuntimeConfig::default()
        })
        .unwrap();
        for preinit in [true, false] {
            let options = LoadOptions {
                preinit,
                ..LoadOptions::default()
            };
            let model = Model::from_bytes_with(&runtime, &wasm, &options).unwrap();
            // `bytes` input is refused by the model right after instantiation: the run's
            // instantiate_time is the time from the request to a ready instance.
            let instantiate = median(
                (0..ITERATIONS)
                    .map(|_| {
                        model
                            .run(Input::Bytes(vec![]), &Limits::default())
                            .unwrap_err()
                            .usage
                            .instantiate_time
                    })
                    .collect(),
            );
            let start = if preinit { "snapshot" } else { "no preinit" };
            println!(
                "| request to a ready instance ({label}, {start}) | - | {} | |",
                ms(instantiate)
            );
        }
    }

    // Resident memory with N instances alive at once, each in a fresh child process (minutes
    // on 2 cores: only with `--memory`, `just bench-memory`).
    if !all.iter().any(|a| a == "--memory") {
        let _ = std::fs::remove_dir_all(&cache);
        return;
    }
    println!();
    println!("| memory with N concurrent runs (each a batch of 4 texts) | input | N=1 | N=4 | N=16 | N=16 / N=1 |");
    println!("|---|---|---|---|---|---|");
    let exe = std::env::current_exe().unwrap();
    for (pool, preinit, label) in [
        (true, true, "snapshot, pooled"),
        (false, true, "snapshot, on demand"),
        (false, false, "no preinit, on demand"),
    ] {
        for (text, input) in [("short_bench", "short"), ("long_bench", "long")] {
            let peaks: Vec<[u64; 3]> = [1u32, 4, 16]
                .iter()
                .map(|n| {
                    let out = std::process::Command::new(&exe)
                        .args(["--rss", &n.to_string()])
                        .arg(if pool { "pool" } else { "on-demand" })
                        .arg(if preinit { "preinit" } else { "plain" })
                        .arg(text)
                        .arg(&minilm)
                        .arg(&cache)
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let text = String::from_utf8(out.stdout).unwrap();
                    let mut f = text.split_whitespace().map(|f| f.parse::<u64>().unwrap());
                    [f.next().unwrap(), f.next().unwrap(), f.next().unwrap()]
                })
                .collect();
            for (index, metric) in [(2, "peak PSS"), (1, "peak RSS")] {
                println!(
                    "| {metric} ({label}) | {input} | {} | {} | {} | {:.2}x |",
                    mib(peaks[0][index]),
                    mib(peaks[1][index]),
                    mib(peaks[2][index]),
                    peaks[2][index] as f64 / peaks[0][index] as f64
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
}
