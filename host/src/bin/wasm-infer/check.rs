//! `wasm-infer check`: runs a cases file's inputs and compares their exact fuel, peak memory
//! and output digest with the file (`wasm_infer::testing`), or re-blesses the moved figures.

use std::path::PathBuf;

use clap::Args;
use wasm_infer::testing::{check_cases, CheckError};

use crate::args::LimitArgs;
use crate::exit;
use crate::load::LoadArgs;

#[derive(Args)]
pub struct Opts {
    /// The model component (.wasm).
    model: PathBuf,
    /// The cases file (JSON): `{"cases": [{"input": "text"}, ...]}`, figures filled by --bless.
    cases: PathBuf,
    /// Rewrite the figures that moved (and the recorded component and engine) instead of
    /// failing; a case with only its input gets all its figures.
    #[arg(long)]
    bless: bool,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Print no progress.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(opts: &Opts) -> u8 {
    let model = match opts.load.model(&opts.model, opts.quiet) {
        Ok(model) => model,
        Err(status) => return status,
    };
    match check_cases(&model, &opts.cases, &opts.limits.limits(), opts.bless) {
        Ok(report) => {
            eprint!("{report}");
            if let Some(worst) = report.worst_cosine {
                eprintln!("worst cosine against the recorded vectors: {worst}");
            }
            if opts.bless {
                if report.written {
                    eprintln!(
                        "blessed {}: {} figure(s) rewritten",
                        opts.cases.display(),
                        report.moved.len()
                    );
                } else {
                    eprintln!("{}: nothing moved", opts.cases.display());
                }
                exit::OK
            } else if report.passed() {
                eprintln!(
                    "{}: {} case(s) as blessed",
                    opts.cases.display(),
                    report.cases
                );
                exit::OK
            } else {
                eprintln!(
                    "{}: {} figure(s) moved (wasm-infer check --bless to accept)",
                    opts.cases.display(),
                    report.moved.len()
                );
                exit::CHECK_FAILED
            }
        }
        Err(CheckError::File(e)) => {
            eprintln!("error: {e}");
            exit::USAGE
        }
        Err(CheckError::Run { case, error }) => {
            eprintln!("error: {}: {case}: {}", opts.cases.display(), error.error);
            exit::status(error.kind())
        }
    }
}
