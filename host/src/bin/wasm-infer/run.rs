//! `wasm-infer run` (the default): one input through a model, JSON on stdout on success, the
//! usage report on stderr, nothing on stdout on failure.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use wasm_infer::{Error, Input, Limits, Model, Output, Usage};

use crate::args::LimitArgs;
use crate::exit;
use crate::load::LoadArgs;

#[derive(Args)]
pub struct Opts {
    /// The model component (.wasm), built for wasm32-wasip2 against wit/model.wit.
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// The input: a literal text, `@path` to read a file, or `-` for stdin. Files and stdin hold
    /// one text per line and are run as a batch.
    #[arg(required = true, allow_hyphen_values = true)]
    input: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// A calibration profile (`wasm-infer calibrate --out`): an input whose predicted fuel or
    /// memory is over --fuel or --mem is refused before it runs (exit 10 or 11, fuel 0). The
    /// caps still stop a run the profile under-predicted.
    #[arg(long, env = "WASM_INFER_PROFILE")]
    profile: Option<PathBuf>,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    generation: crate::generate::GenerationArgs,
    /// How to report usage on stderr.
    #[arg(long, value_enum, default_value_t = Report::Text)]
    report: Report,
    /// Print no usage report and no progress (errors are still printed).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Report {
    /// One human-readable line.
    Text,
    /// One JSON object.
    Json,
}

pub fn run(opts: &Opts) -> u8 {
    let (Some(model_path), Some(input_arg)) = (&opts.model, &opts.input) else {
        eprintln!("error: a model and an input are required (see --help)");
        return exit::USAGE;
    };
    let limits = opts.limits.limits();
    let input = match read_input(input_arg, limits.max_input) {
        Ok(input) => input,
        Err(e) => return exit::report(None, &e),
    };
    let profile = match &opts.profile {
        Some(path) => match wasm_infer::Profile::read(path) {
            Ok(profile) => Some((path, profile)),
            Err(e) => {
                eprintln!("error: {e}");
                return exit::USAGE;
            }
        },
        None => None,
    };
    let mut model = match opts.load.model(model_path, opts.quiet) {
        Ok(model) => model,
        Err(status) => return status,
    };
    if let Some((path, profile)) = profile {
        model = match model.with_profile(profile) {
            Ok(model) => model,
            Err(e) => return exit::report(Some(path), &e),
        };
    }
    if model.generator_info().is_some() {
        let Input::Text(prompt) = input else {
            eprintln!("error: a text generator takes one prompt: a literal text, or `@file` / `-` holding one line");
            return exit::USAGE;
        };
        let report = (!opts.quiet).then_some(opts.report);
        return crate::generate::run(&opts.generation, &model, prompt, &limits, report);
    }
    if let Some(flag) = opts.generation.given() {
        eprintln!(
            "error: {flag} applies to text generators; {} is not one",
            model.info().name
        );
        return exit::USAGE;
    }
    match model.run(input, &limits) {
        Ok(outcome) => {
            let json = render_output(&model, &outcome.output);
            let mut stdout = std::io::stdout().lock();
            if writeln!(stdout, "{json}")
                .and_then(|_| stdout.flush())
                .is_err()
            {
                return exit::INTERNAL;
            }
            if !opts.quiet {
                print_report(opts.report, &model, &outcome.usage, &limits, None);
            }
            exit::OK
        }
        Err(failure) => {
            if opts.report == Report::Json && !opts.quiet {
                let error = Some(&failure.error);
                print_report(opts.report, &model, &failure.usage, &limits, error);
            } else {
                eprintln!("error: {}", failure.error);
                if !opts.quiet {
                    print_report(opts.report, &model, &failure.usage, &limits, None);
                }
            }
            exit::status(failure.kind())
        }
    }
}

/// The input argument: a literal, `@file` or `-` (stdin), files and stdin read only up to
/// the input limit.
fn read_input(arg: &str, max_input: u64) -> Result<Input, Error> {
    if arg == "-" {
        Input::read_lines(std::io::stdin().lock(), max_input)
    } else if let Some(path) = arg.strip_prefix('@') {
        let file =
            std::fs::File::open(path).map_err(|e| Error::InputRead(format!("{path}: {e}")))?;
        Input::read_lines(file, max_input)
    } else {
        let input = Input::Text(arg.to_string());
        Limits::default().max_input(max_input).check_input(&input)?;
        Ok(input)
    }
}

fn render_output(model: &Model, output: &Output) -> String {
    let info = model.info();
    let value = match output {
        Output::Embeddings(vectors) => serde_json::json!({
            "model": info.name,
            "dimension": vectors.first().map_or(info.output_dimension as usize, Vec::len),
            "embeddings": vectors,
        }),
        other => serde_json::json!({ "model": info.name, "output": other }),
    };
    value.to_string()
}

pub(crate) fn print_report(
    report: Report,
    model: &Model,
    usage: &Usage,
    limits: &Limits,
    error: Option<&Error>,
) {
    match report {
        Report::Text => eprintln!("usage: {usage}"),
        Report::Json => eprintln!("{}", report_json(model, usage, limits, error, None)),
    }
}

/// The `--report json` object: `status`, `usage`, `limits`, `error` ([`error_json`], null
/// on success), a generator's figures as `generation` when given, and `load`.
pub(crate) fn report_json(
    model: &Model,
    usage: &Usage,
    limits: &Limits,
    error: Option<&Error>,
    generation: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut value = serde_json::json!({
        "status": if error.is_some() { "error" } else { "ok" },
        "usage": usage,
        "limits": limits,
        "error": error.map(error_json),
    });
    if let Some(generation) = generation {
        value["generation"] = generation;
    }
    value["load"] = serde_json::json!(model.load_report());
    value
}

/// An error as the JSON reports give it: its kind, exit status and message.
pub(crate) fn error_json(error: &Error) -> serde_json::Value {
    serde_json::json!({
        "kind": error.kind(),
        "exit_code": exit::status(error.kind()),
        "message": error.to_string(),
    })
}
