//! `wasm-infer calibrate`: runs a set of inputs, fits fuel and peak memory against input size
//! (`wasm_infer::profile`), prints the figures, the bounds and suggested limits, and writes
//! the profile that `--profile` admits requests by.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use wasm_infer::profile::{self, Bound, Profile, Sample, DEFAULT_MARGIN_PERCENT};
use wasm_infer::units::{format_count, format_size};

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
}

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
    let bar = (!opts.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(texts.len() as u64);
        bar.set_message("calibrating");
        bar
    });
    let measured = model.measure(&texts, &limits, |done| {
        if let Some(bar) = &bar {
            bar.set_position(done as u64);
        }
    });
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
    let report = Profile::fit(
        &model.load_report().component_sha256,
        model.runtime().fingerprint(),
        &model.info().name,
        &samples,
        opts.margin,
    );
    print_report(&report, &samples);
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
