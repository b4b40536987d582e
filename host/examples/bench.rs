//! `just bench`: native candle against the sandbox, on a short and a long input, plus the cost
//! of compiling, loading precompiled code and instantiating. Prints a Markdown table.
//!
//! Usage: `cargo run --release --example bench -- MINILM_WASM [LABEL=OTHER_WASM ...]`
//! (extra components, e.g. a build without simd128, are measured in the sandbox rows too).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasm_infer::{AccelMode, Input, Limits, LoadOptions, Model, Runtime, RuntimeConfig};

const SHORT: &str = "wasm-infer runs sentence embeddings inside a WebAssembly sandbox.";
const ITERATIONS: usize = 7;
/// Texts per batch when measuring the marginal in-sandbox cost of one embedding.
const BATCH: usize = 8;

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

/// Child mode for the accelerator rows: candle on the host uses every core here (no
/// RAYON_NUM_THREADS), both natively and as the accel path's CPU backend.
fn accel_child(wasm: &Path, cache: &Path) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let native = native_embedder();
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache.to_path_buf()),
        accel: AccelMode::Cpu,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let model = Model::load(&runtime, wasm).unwrap();
    let limits = Limits::default();
    for (label, text) in [
        ("short (22 tokens)", SHORT.to_string()),
        ("long (127 tokens)", reference_text("long_bench")),
    ] {
        let native_time = time(|| {
            native.embed(&text).unwrap();
        });
        println!(
            "| native candle, {threads} threads, per embedding | {label} | {} | 1.00x |",
            ms(native_time)
        );
        let one = time(|| {
            model.run(Input::Text(text.clone()), &limits).unwrap();
        });
        let batch = time(|| {
            model
                .run(Input::Texts(vec![text.clone(); BATCH]), &limits)
                .unwrap();
        });
        let marginal = batch.saturating_sub(one) / (BATCH as u32 - 1);
        println!(
            "| accel path (CPU backend, {threads} threads), per embedding (marginal in a batch of {BATCH}) | {label} | {} | {:.2}x |",
            ms(marginal),
            marginal.as_secs_f64() / native_time.as_secs_f64()
        );
        println!(
            "| accel path (CPU backend, {threads} threads), fresh sandbox per request, end to end | {label} | {} | {:.2}x |",
            ms(one),
            one.as_secs_f64() / native_time.as_secs_f64()
        );
    }
}

fn main() {
    let all: Vec<String> = std::env::args().collect();
    if all.get(1).map(String::as_str) == Some("--accel") {
        accel_child(Path::new(&all[2]), Path::new(&all[3]));
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
    let mut args = std::env::args().skip(1);
    let minilm = PathBuf::from(
        args.next()
            .expect("usage: bench MINILM_WASM [LABEL=WASM ...]"),
    );
    let mut components = vec![("simd128".to_string(), minilm.clone())];
    for extra in args {
        let (label, path) = extra.split_once('=').expect("LABEL=PATH");
        components.push((label.to_string(), PathBuf::from(path)));
    }
    let long = reference_text("long_bench");
    let inputs = [
        ("short (22 tokens)", SHORT.to_string()),
        ("long (127 tokens)", long),
    ];

    let native = native_embedder();

    println!("| measurement | input | time | vs native |");
    println!("|---|---|---|---|");
    let mut native_times = Vec::new();
    for (label, text) in &inputs {
        let t = time(|| {
            native.embed(text).unwrap();
        });
        native_times.push(t);
        println!(
            "| native candle, 1 thread, per embedding | {label} | {} | 1.00x |",
            ms(t)
        );
    }

    let cache = std::env::temp_dir().join(format!("wasm-infer-bench-{}", std::process::id()));
    let mut variants = vec![(true, "fuel + epochs", components[0].clone(), true)];
    variants.push((true, "fuel + epochs", components[0].clone(), false));
    for extra in &components[1..] {
        variants.push((true, "fuel + epochs", extra.clone(), true));
    }
    variants.push((false, "epochs only", components[0].clone(), true));
    for (meter_fuel, mode, (component, path), preinit) in variants {
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: Some(cache.clone()),
            meter_fuel,
            accel: AccelMode::Off,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let options = LoadOptions {
            preinit,
            ..LoadOptions::default()
        };
        let model = Model::load_with(&runtime, &path, &options).unwrap();
        let start = if preinit { "snapshot" } else { "no preinit" };
        let limits = Limits::default();
        for ((label, text), native_time) in inputs.iter().zip(&native_times) {
            let one = time(|| {
                model.run(Input::Text(text.clone()), &limits).unwrap();
            });
            let batch = time(|| {
                model
                    .run(Input::Texts(vec![text.clone(); BATCH]), &limits)
                    .unwrap();
            });
            let marginal = (batch.saturating_sub(one)) / (BATCH as u32 - 1);
            println!(
                "| sandbox ({mode}, {component}), per embedding (marginal in a batch of {BATCH}) | {label} | {} | {:.2}x |",
                ms(marginal),
                marginal.as_secs_f64() / native_time.as_secs_f64()
            );
            println!(
                "| sandbox ({mode}, {component}, {start}), fresh sandbox per request, end to end | {label} | {} | {:.2}x ({:.2}x marginal) |",
                ms(one),
                one.as_secs_f64() / native_time.as_secs_f64(),
                one.as_secs_f64() / marginal.as_secs_f64()
            );
        }
    }

    // The accelerator path against native candle on all cores, in a child process.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--accel")
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

    // Resident memory with N instances alive at once, each in a fresh child process.
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
