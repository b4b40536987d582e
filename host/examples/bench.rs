//! `just bench`: native candle against the sandbox, on a short and a long input, plus the cost
//! of compiling, loading precompiled code and instantiating. Prints a Markdown table.
//!
//! Usage: `cargo run --release --example bench -- MINILM_WASM [LABEL=OTHER_WASM ...]`
//! (extra components, e.g. a build without simd128, are measured in the sandbox rows too).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasm_infer::{Input, Limits, Model, Runtime, RuntimeConfig};

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

fn main() {
    // Single-threaded native baseline: candle sizes its thread pool from this variable.
    std::env::set_var("RAYON_NUM_THREADS", "1");
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

    let dir = model_dir();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let native = minilm::Embedder::load(
        &read("model.safetensors"),
        &read("config.json"),
        &read("tokenizer.json"),
    )
    .unwrap();

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
    for (meter_fuel, mode) in [(true, "fuel + epochs"), (false, "epochs only")] {
        for (component, path) in &components {
            let runtime = Runtime::with_config(RuntimeConfig {
                cache_dir: Some(cache.clone()),
                meter_fuel,
                ..RuntimeConfig::default()
            })
            .unwrap();
            let model = Model::load(&runtime, path).unwrap();
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
                    "| sandbox ({mode}, {component}), fresh sandbox per request, end to end | {label} | {} | {:.2}x |",
                    ms(one),
                    one.as_secs_f64() / native_time.as_secs_f64()
                );
            }
        }
    }

    // Compile, precompiled load, instantiate.
    let wasm = std::fs::read(&minilm).unwrap();
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: None,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let t = Instant::now();
    Model::from_bytes(&runtime, &wasm).unwrap();
    println!(
        "| compile the component (no cache) | - | {} | |",
        ms(t.elapsed())
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
    let model = Model::from_bytes(&cached, &wasm).unwrap();
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
    println!(
        "| instantiate a fresh sandbox | - | {} | |",
        ms(instantiate)
    );
    let _ = std::fs::remove_dir_all(&cache);
}
