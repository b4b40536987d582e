//! `wasm-infer snapshot`: pre-initialise a model and write the snapshot component to a file.

use std::path::PathBuf;

use clap::Args;
use wasm_infer::units::{format_count, format_duration, format_size};
use wasm_infer::Error;

use crate::args::{LimitArgs, RuntimeArgs};
use crate::exit;

#[derive(Args)]
pub struct Opts {
    /// The model component (.wasm) to pre-initialise.
    model: PathBuf,
    /// Where to write the snapshot component.
    #[arg(short, long)]
    output: PathBuf,
    /// Limits for the initialisation (as for a run).
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Print what initialisation cost as JSON on stderr.
    #[arg(long)]
    json: bool,
}

pub fn run(opts: &Opts) -> u8 {
    let runtime = match opts.runtime.runtime() {
        Ok(runtime) => runtime,
        Err(e) => return exit::report(None, &e),
    };
    let wasm = match std::fs::read(&opts.model) {
        Ok(wasm) => wasm,
        Err(error) => {
            let error = Error::Io {
                path: opts.model.clone(),
                error,
            };
            return exit::report(None, &error);
        }
    };
    let snap = match wasm_infer::snapshot::snapshot(&runtime, &wasm, &opts.limits.limits()) {
        Ok(snap) => snap,
        Err(e) => return exit::report(Some(&opts.model), &e),
    };
    if let Err(e) = std::fs::write(&opts.output, &snap.wasm) {
        eprintln!("error: {}: {e}", opts.output.display());
        return exit::INTERNAL;
    }
    let init = &snap.info.init;
    if opts.json {
        eprintln!("{}", serde_json::json!(snap.info));
    } else {
        eprintln!(
            "snapshot: {} -> {} ({}); initialisation: {} fuel, {} memory, {}",
            opts.model.display(),
            opts.output.display(),
            format_size(init.snapshot_bytes),
            format_count(init.fuel),
            format_size(init.memory_bytes),
            format_duration(init.time),
        );
    }
    exit::OK
}
