//! A run of a text generator (a model that exports `generate`): what goes where
//! (docs/generation.md#cli).
//!
//! - Success: stdout gets one JSON object (`model`, `text`, `tokens`, `prompt_tokens`,
//!   `completion_tokens`, `finish_reason` = `stop` or `length`); with `--stream`, the text
//!   itself as it is generated, then a newline, and no JSON. stderr gets the usage report.
//! - A limit (fuel, memory, wall time, output) ends it: stdout gets what was generated before
//!   the limit, the same JSON with `finish_reason` naming the limit (`fuel`, `memory`,
//!   `wall_time`, `output`) and an `error` object; with `--stream` the text was already
//!   printed, and a newline ends it. stderr gets `error: ...` and the usage report; the exit
//!   status is the limit's (10 fuel, 11 memory, 12 wall time, 14 output).
//! - Any other failure (the model refused the request, a trap): nothing on stdout beyond what
//!   `--stream` printed, the error on stderr, the kind's exit status.

use std::io::Write;

use clap::Args;
use wasm_infer::units::format_count;
use wasm_infer::{Error, GenerateRequest, Generated, Limits, Model, Prompt, TokenFuel, Usage};

use crate::exit;
use crate::run::{error_json, print_report, report_json, Report};

use wasm_infer::generate::DEFAULT_MAX_TOKENS;

#[derive(Args)]
#[command(next_help_heading = "Text generation (models that export `generate`)")]
pub struct GenerationArgs {
    /// Most tokens to generate [default: 64].
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature in [0, 2]; 0 (the default) is greedy.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1] [default: 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of the model's own random generator [default: 0]: the same seed gives the same
    /// tokens.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable, at most 4).
    #[arg(long)]
    stop: Vec<String>,
    /// Print the text on stdout as it is generated instead of one JSON object at the end.
    #[arg(long)]
    stream: bool,
}

impl GenerationArgs {
    /// The first generation flag given, for a model that is not a generator.
    pub fn given(&self) -> Option<&'static str> {
        [
            (self.max_tokens.is_some(), "--max-tokens"),
            (self.temperature.is_some(), "--temperature"),
            (self.top_p.is_some(), "--top-p"),
            (self.seed.is_some(), "--seed"),
            (!self.stop.is_empty(), "--stop"),
            (self.stream, "--stream"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    fn request(&self, prompt: String) -> GenerateRequest {
        GenerateRequest {
            prompt: Prompt::Text(prompt),
            max_tokens: self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: self.temperature.unwrap_or(0.0),
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed.unwrap_or(0),
            stop: self.stop.clone(),
        }
    }
}

/// Runs one generation; returns the exit status.
pub fn run(
    args: &GenerationArgs,
    model: &Model,
    prompt: String,
    limits: &Limits,
    report: Option<Report>,
) -> u8 {
    let request = args.request(prompt);
    let on_emit: Option<wasm_infer::generate::OnEmit> = args.stream.then(|| {
        Box::new(|_tokens: &[u32], text: &str| {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(text.as_bytes())
                .and_then(|_| stdout.flush());
        }) as wasm_infer::generate::OnEmit
    });
    let result = model.generate_streaming(request, limits, on_emit);
    let mut stdout = std::io::stdout().lock();
    let name = &model.info().name;
    match result {
        Ok(generation) => {
            let written = if args.stream {
                writeln!(stdout)
            } else {
                let value = serde_json::json!({
                    "model": name,
                    "text": generation.generated.text,
                    "tokens": generation.generated.tokens,
                    "prompt_tokens": generation.prompt_tokens,
                    "completion_tokens": generation.completion_tokens,
                    "finish_reason": generation.finish_reason,
                });
                writeln!(stdout, "{value}")
            };
            if written.and_then(|_| stdout.flush()).is_err() {
                return exit::INTERNAL;
            }
            drop(stdout);
            if let Some(report) = report {
                let extra = serde_json::json!({
                    "prompt_tokens": generation.prompt_tokens,
                    "completion_tokens": generation.completion_tokens,
                    "finish_reason": generation.finish_reason,
                });
                let fuel = &generation.token_fuel;
                print(report, model, &generation.usage, limits, None, fuel, extra);
            }
            exit::OK
        }
        Err(failure) => {
            let error = &failure.error.error;
            let limit = limit_name(error);
            if args.stream {
                if !failure.partial.text.is_empty() || limit.is_some() {
                    let _ = writeln!(stdout).and_then(|_| stdout.flush());
                }
            } else if let Some(limit) = limit {
                let value = partial_json(name, &failure.partial, limit, error);
                if writeln!(stdout, "{value}")
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    return exit::INTERNAL;
                }
            }
            drop(stdout);
            if report != Some(Report::Json) {
                eprintln!("error: {error}");
            }
            if let Some(report) = report {
                let extra = serde_json::json!({
                    "completion_tokens": failure.partial.tokens.len(),
                    "finish_reason": limit,
                });
                print(
                    report,
                    model,
                    &failure.error.usage,
                    limits,
                    Some(error),
                    &failure.token_fuel,
                    extra,
                );
            }
            exit::status(failure.error.kind())
        }
    }
}

/// The `finish_reason` of a generation a limit ended, `None` for other errors.
fn limit_name(error: &Error) -> Option<&'static str> {
    match error {
        Error::Limit(limit) => Some(match limit.kind() {
            wasm_infer::ErrorKind::Fuel => "fuel",
            wasm_infer::ErrorKind::Memory => "memory",
            wasm_infer::ErrorKind::WallTime => "wall_time",
            wasm_infer::ErrorKind::Output => "output",
            _ => return None,
        }),
        _ => None,
    }
}

fn partial_json(name: &str, partial: &Generated, limit: &str, error: &Error) -> serde_json::Value {
    serde_json::json!({
        "model": name,
        "text": partial.text,
        "tokens": partial.tokens,
        "completion_tokens": partial.tokens.len(),
        "finish_reason": limit,
        "error": error_json(error),
    })
}

/// The usage report: in the text form, a line of the token fuel figures after the usage; in
/// the JSON form, the generation's figures (`generation` with `token_fuel` added) in the object.
fn print(
    report: Report,
    model: &Model,
    usage: &Usage,
    limits: &Limits,
    error: Option<&Error>,
    token_fuel: &TokenFuel,
    mut generation: serde_json::Value,
) {
    match report {
        Report::Text => {
            print_report(report, model, usage, limits, None);
            if let Some(first) = token_fuel.to_first_token {
                let then = token_fuel
                    .per_token
                    .map(|n| format!(", then {} per token", format_count(n)))
                    .unwrap_or_default();
                eprintln!("tokens: fuel {} to the first{then}", format_count(first));
            }
        }
        Report::Json => {
            generation["token_fuel"] = serde_json::json!(token_fuel);
            eprintln!(
                "{}",
                report_json(model, usage, limits, error, Some(generation))
            );
        }
    }
}
