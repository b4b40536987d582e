//! A user's application embedding wasm-infer: loads a model, runs one text under limits and
//! prints the embedding and the usage as one JSON object.
//!
//! `cargo run --release -- MODEL.wasm "some text" [--repeat N] [--accel off]`; MODEL defaults
//! to `$WASM_INFER_MODEL`. With `--repeat N` the text runs N times and `best_run_ms` is the
//! fastest run's wall time (the figure docs/library.md compares with and without the patch).

use std::time::Duration;

use wasm_infer::{AccelMode, Input, Limits, Model, Runtime, RuntimeConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let mut repeat = 1u32;
    let mut accel = AccelMode::Auto;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--repeat" => repeat = args.next().ok_or("--repeat N")?.parse()?,
            "--accel" => {
                accel = match args.next().as_deref() {
                    Some("off") => AccelMode::Off,
                    Some("auto") => AccelMode::Auto,
                    _ => return Err("--accel off|auto".into()),
                }
            }
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    let model_path = positional
        .next()
        .or_else(|| std::env::var("WASM_INFER_MODEL").ok())
        .ok_or("usage: embed-outside MODEL.wasm TEXT (or set WASM_INFER_MODEL)")?;
    let text = positional.next().unwrap_or_else(|| "hello, sandbox".into());

    // One runtime per process; the compiled-code cache is `$WASM_INFER_CACHE_DIR` if set.
    let runtime = Runtime::with_config(RuntimeConfig {
        accel,
        ..RuntimeConfig::default()
    })?;
    let model = Model::load(&runtime, &model_path)?;
    let limits = Limits::default()
        .fuel(5_000_000_000)
        .memory(1 << 30)
        .wall_time(Duration::from_secs(60));

    let mut best: Option<Duration> = None;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let outcome = model
            .run(Input::Text(text.clone()), &limits)
            .map_err(|failure| format!("{} (usage: {})", failure.error, failure.usage))?;
        best = Some(best.map_or(outcome.usage.wall_time, |b| b.min(outcome.usage.wall_time)));
        last = Some(outcome);
    }
    let outcome = last.expect("at least one run");
    let embedding = outcome
        .output
        .embeddings()
        .and_then(|vectors| vectors.first())
        .ok_or("the model did not return an embedding")?;
    let report = serde_json::json!({
        "model": model.info().name,
        "codegen_patch": wasm_infer::cache::CODEGEN_PATCH,
        "embedding": embedding,
        "usage": outcome.usage,
        "best_run_ms": best.unwrap_or_default().as_secs_f64() * 1e3,
    });
    println!("{report}");
    Ok(())
}
