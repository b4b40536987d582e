//! `just bench-generate`: SmolLM2-135M-Instruct (Q4_1 GGUF) generating in the sandbox against
//! the same guest crate built natively (candle's quantized llama on the host, 1 thread), on the
//! same prompts and the same greedy request: prompt tokens per second (the prompt's tokens over
//! the time to the first generated token) and generated tokens per second (the tokens after the
//! first over the time between the first and the last). Both sides time the moments tokens are
//! handed over (the sandbox's `emit`, the native build's sink). Prints a Markdown table; the
//! ratios are the result.
//!
//! Usage: `cargo run --release --example bench_generate -- SMOLLM2_WASM [SMOLLM2_DIR]`
//! (the directory with the GGUF; default `$WASM_INFER_SMOLLM2_DIR` or
//! `~/.cache/wasm-infer/smollm2`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smollm2::SmolLm;
use wasm_infer::{GenerateRequest, Limits, Model, Runtime};

/// Runs of each prompt on each side; the median is reported.
const ITERATIONS: usize = 3;
/// Tokens generated per run (greedy, so every run generates the same ones).
const MAX_TOKENS: u32 = 32;
const PROMPTS: [(&str, &str); 2] = [
    ("short", "Write a haiku about sandboxes"),
    (
        "long",
        "A WebAssembly sandbox runs a model on untrusted input with a cap on its compute, a \
         ceiling on its memory and a deadline on its wall time. Explain to a new engineer, in \
         plain words and with one example, why each of the three limits is needed, what happens \
         to a request that reaches one of them, and how a service should report it to the \
         client that sent the request.",
    ),
];

/// When tokens were handed over, from the start of the run.
#[derive(Default)]
struct Stamps {
    first: Option<Duration>,
    last: Option<Duration>,
    after_first: u32,
}

impl Stamps {
    fn record(&mut self, at: Duration, tokens: usize) {
        if tokens == 0 {
            return;
        }
        match self.first {
            None => {
                self.first = Some(at);
                self.after_first += tokens as u32 - 1;
            }
            Some(_) => self.after_first += tokens as u32,
        }
        self.last = Some(at);
    }

    /// (prompt tokens per second, generated tokens per second)
    fn rates(&self, prompt_tokens: u32) -> (f64, f64) {
        let first = self.first.expect("a first token");
        let last = self.last.expect("a last token");
        (
            f64::from(prompt_tokens) / first.as_secs_f64(),
            f64::from(self.after_first) / (last - first).as_secs_f64(),
        )
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    // The native baseline on one thread: candle sizes its thread pool from this variable.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let mut args = std::env::args().skip(1);
    let wasm = PathBuf::from(
        args.next()
            .expect("usage: bench_generate SMOLLM2_WASM [DIR]"),
    );
    let dir = args
        .next()
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("WASM_INFER_SMOLLM2_DIR").map(PathBuf::from))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/wasm-infer/smollm2")
        });
    let native = SmolLm::load_dir(&dir).expect("loading the GGUF natively");
    let runtime = Runtime::new().expect("runtime");
    let model = Model::load(&runtime, &wasm).expect("loading smollm2.wasm");
    let limits = Limits {
        wall_time: Duration::from_secs(600),
        ..Limits::default()
    };

    println!(
        "SmolLM2-135M-Instruct Q4_1, greedy, {MAX_TOKENS} tokens, median of {ITERATIONS} runs, \
         1 thread; {}\n",
        cpu_name()
    );
    println!("| prompt | prompt tokens | | native candle | sandbox | sandbox / native |");
    println!("|---|---|---|---|---|---|");
    for (label, prompt) in PROMPTS {
        let mut native_rates = Vec::new();
        let mut sandbox_rates = Vec::new();
        let mut prompt_tokens = 0;
        for _ in 0..ITERATIONS {
            let request = smollm2::request(prompt, MAX_TOKENS, 0.0, 1.0, 0);
            let mut stamps = Stamps::default();
            let started = Instant::now();
            let mut sink = |tokens: &[u32], _: &str| stamps.record(started.elapsed(), tokens.len());
            let generation = native
                .generate(&request, &mut sink)
                .expect("native generation");
            prompt_tokens = generation.prompt_tokens;
            native_rates.push(stamps.rates(generation.prompt_tokens));

            let stamps = Arc::new(Mutex::new(Stamps::default()));
            let sink = stamps.clone();
            let started = Instant::now();
            let generation = model
                .generate_streaming(
                    GenerateRequest::new(prompt, MAX_TOKENS),
                    &limits,
                    Some(Box::new(move |tokens, _| {
                        sink.lock().unwrap().record(started.elapsed(), tokens.len())
                    })),
                )
                .expect("sandbox generation");
            assert_eq!(generation.prompt_tokens, prompt_tokens);
            sandbox_rates.push(stamps.lock().unwrap().rates(generation.prompt_tokens));
        }
        for (row, pick) in [("prompt tokens/s", 0usize), ("generated tokens/s", 1usize)] {
            let rate = |rates: &[(f64, f64)]| {
                median(
                    rates
                        .iter()
                        .map(|r| if pick == 0 { r.0 } else { r.1 })
                        .collect(),
                )
            };
            let (n, s) = (rate(&native_rates), rate(&sandbox_rates));
            println!(
                "| {label} | {prompt_tokens} | {row} | {n:.1} | {s:.1} | {:.2}x |",
                s / n
            );
        }
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
