//! `wasm-infer calibrate`: runs a set of inputs, fits fuel and peak memory against input size
//! (`wasm_infer::profile`), prints the figures, the bounds and suggested limits, and writes
//! the profile that `--profile` admits requests by.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use wasm_infer::profile::{
    self, Bound, Profile, Sample, TokenProfile, TokenSample, DEFAULT_MARGIN_PERCENT,
};
use wasm_infer::units::{format_count, format_size};
use wasm_infer::{GenerateRequest, Limits, Model, RunError};

use crate::args::LimitArgs;
use crate::exit;
use crate::load::LoadArgs;

#[derive(Args)]
pub struct Opts {
    /// The model component (.wasm).
    model: PathBuf,
    /// The calibration inputs: `@path` to a file (or `-` for stdin) with one text per line;
    /// each line is run as one text input. Make them as varied in length as real requests.
    #[arg(allow_hyphen_values = true)]
    inputs: String,
    /// Write the profile (JSON) here, for `--profile` and the serve config's `profile`.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Margin of the suggested limits over the bound at the largest input, in percent.
    #[arg(long, default_value_t = DEFAULT_MARGIN_PERCENT)]
    margin: u32,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Print no progress (the report still goes to stdout).
    #[arg(long, short)]
    quiet: bool,
    /// For a generator (a model that exports `generate`): tokens each calibration generation
    /// asks for, greedy [default: 16]; the profile then also holds the fuel to the first token
    /// and per token after it. Refused (exit 2) for any other model.
    #[arg(long)]
    max_tokens: Option<u32>,
}

/// Tokens per calibration generation when `--max-tokens` is not given.
const DEFAULT_CALIBRATION_TOKENS: u32 = 16;

pub fn run(opts: &Opts) -> u8 {
    let bytes = if opts.inputs == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes).map(|_| bytes)
    } else if let Some(path) = opts.inputs.strip_prefix('@') {
        std::fs::read(path)
    } else {
        eprintln!("error: the inputs are a file: `@inputs.txt` (one text per line), or `-`");
        return exit::USAGE;
    };
    let texts: Vec<String> = match bytes.map(String::from_utf8) {
        Ok(Ok(text)) => text.lines().map(str::to_string).collect(),
        Ok(Err(e)) => {
            eprintln!("error: {}: not UTF-8 text ({e})", opts.inputs);
            return exit::status(wasm_infer::ErrorKind::InputRead);
        }
        Err(e) => {
            eprintln!("error: {}: {e}", opts.inputs);
            return exit::status(wasm_infer::ErrorKind::InputRead);
        }
    };
    if texts.is_empty() {
        eprintln!("error: {}: no inputs (one text per line)", opts.inputs);
        return exit::USAGE;
    }
    let model = match opts.load.model(&opts.model, opts.quiet) {
        Ok(model) => model,
        Err(status) => return status,
    };
    let limits = opts.limits.limits();
    let generator = model.generator_info().is_some();
    if opts.max_tokens.is_some() && !generator {
        eprintln!(
            "error: --max-tokens is for text generators; {} does not export `generate`",
            model.info().name
        );
        return exit::USAGE;
    }
    let bar = (!opts.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(texts.len() as u64);
        bar.set_message("calibrating");
        bar
    });
    let progress = |done: usize| {
        if let Some(bar) = &bar {
            bar.set_position(done as u64);
        }
    };
    let max_tokens = opts.max_tokens.unwrap_or(DEFAULT_CALIBRATION_TOKENS);
    let (measured, tokens) = if generator {
        match measure_generations(&model, &texts, &limits, max_tokens, progress) {
            Ok((samples, tokens)) => (Ok(samples), tokens),
            Err(failure) => (Err(failure), Vec::new()),
        }
    } else {
        (model.measure(&texts, &limits, progress), Vec::new())
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let samples = match measured {
        Ok(samples) => samples,
        Err((index, failure)) => {
            eprintln!(
                "error: input {} (line {}) failed: {}",
                index + 1,
                index + 1,
                failure.error
            );
            eprintln!("usage: {}", failure.usage);
            return exit::status(failure.kind());
        }
    };
    let mut report = Profile::fit(
        &model.load_report().component_sha256,
        model.runtime().fingerprint(),
        &model.info().name,
        &samples,
        opts.margin,
    );
    if generator {
        report.tokens = Some(TokenProfile::fit(max_tokens, &tokens));
    }
    print_report(&report, &samples);
    if let Some(profile) = &report.tokens {
        print_tokens(profile, &tokens);
    }
    if let Some(out) = &opts.out {
        if let Err(e) = report.write(out) {
            eprintln!("error: {e}");
            return exit::INTERNAL;
        }
        println!("profile written to {}", out.display());
    }
    exit::OK
}

fn print_report(profile: &Profile, samples: &[Sample]) {
    println!(
        "calibrated {} on {} inputs (component sha256 {}, wasmtime {})",
        profile.model,
        samples.len(),
        profile.component_sha256,
        profile.engine.wasmtime
    );
    println!(
        "{:>5} {:>7} {:>15} {:>15} {:>12} {:>12}",
        "input", "bytes", "fuel", "fuel bound", "peak memory", "memory bound"
    );
    for (i, s) in samples.iter().enumerate() {
        println!(
            "{:>5} {:>7} {:>15} {:>15} {:>12} {:>12}",
            i + 1,
            s.input_bytes,
            s.fuel,
            profile.fuel.predict(s.input_bytes),
            s.peak_memory_bytes,
            profile.peak_memory.predict(s.input_bytes)
        );
    }
    let fuel: Vec<u64> = samples.iter().map(|s| s.fuel).collect();
    let memory: Vec<u64> = samples.iter().map(|s| s.peak_memory_bytes).collect();
    let quantiles = |values: &[u64], format: fn(u64) -> String| {
        [50, 90, 99, 100]
            .map(|p| format!("p{p} {}", format(profile::percentile(values, p))))
            .join(", ")
    };
    println!("fuel:        {}", quantiles(&fuel, format_count));
    println!("peak memory: {}", quantiles(&memory, format_size));
    let fit = |name: &str, bound: &Bound, figure: fn(&Sample) -> u64| {
        let (mut under, mut over) = (0f64, 0f64);
        for s in samples {
            let (actual, predicted) = (figure(s) as f64, bound.predict(s.input_bytes) as f64);
            under = under.max((actual - predicted) / actual.max(1.0));
            over = over.max((predicted - actual) / actual.max(1.0));
        }
        println!(
            "{name} bound: {bound}; worst under-prediction on the set {:.3}%, most over {:.1}%",
            under * 100.0,
            over * 100.0
        );
    };
    fit("fuel", &profile.fuel, |s| s.fuel);
    fit("peak-memory", &profile.peak_memory, |s| s.peak_memory_bytes);
    println!("suggested limits: {}", profile.suggested);
}

/// Generates for each text (greedy, `max_tokens`): each run's whole figures, as for any model,
/// and its token figures. Fails with the first run that fails (its index and error).
fn measure_generations(
    model: &Model,
    texts: &[String],
    limits: &Limits,
    max_tokens: u32,
    progress: impl Fn(usize),
) -> Result<(Vec<Sample>, Vec<TokenSample>), (usize, RunError)> {
    let mut samples = Vec::with_capacity(texts.len());
    let mut tokens = Vec::with_capacity(texts.len());
    for (index, text) in texts.iter().enumerate() {
        let request = GenerateRequest::new(text.clone(), max_tokens);
        let prompt_bytes = request.payload_bytes();
        let generation = model
            .generate(request, limits)
            .map_err(|failure| (index, failure.error))?;
        samples.push(Sample {
            input_bytes: prompt_bytes,
            fuel: generation.usage.fuel_consumed,
            peak_memory_bytes: generation.usage.peak_memory_bytes,
        });
        tokens.push(TokenSample {
            prompt_bytes,
            prompt_tokens: generation.prompt_tokens,
            to_first_token: generation.token_fuel.to_first_token.unwrap_or(0),
            per_token: generation.token_fuel.per_token,
        });
        progress(index + 1);
    }
    Ok((samples, tokens))
}

fn print_tokens(profile: &TokenProfile, samples: &[TokenSample]) {
    println!(
        "tokens: {} per calibration generation (greedy)",
        profile.max_tokens
    );
    println!(
        "{:>5} {:>7} {:>7} {:>15} {:>15} {:>15}",
        "input", "bytes", "tokens", "to 1st token", "bound", "per token"
    );
    for (i, s) in samples.iter().enumerate() {
        println!(
            "{:>5} {:>7} {:>7} {:>15} {:>15} {:>15}",
            i + 1,
            s.prompt_bytes,
            s.prompt_tokens,
            s.to_first_token,
            profile.to_first_token.predict(s.prompt_bytes),
            s.per_token.map_or("-".to_string(), |f| f.to_string())
        );
    }
    println!(
        "first-token bound: {}; per token after it: {} (the most on the set); a generation of N \
         tokens is planned at the bound plus N - 1 times that",
        profile.to_first_token,
        format_count(profile.per_token)
    );
}
