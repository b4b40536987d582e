//! Loading a model for a subcommand, with a spinner naming the phase while a first load
//! compiles and pre-initialises (seconds), when stderr is a terminal and not `--quiet`.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wasm_infer::{LoadOptions, Model, Progress};

use clap::Args;

use crate::args::{CompileArgs, LoadLimitArgs, RuntimeArgs};
use crate::exit;

/// Everything that decides how a subcommand loads its model.
#[derive(Args)]
pub struct LoadArgs {
    #[command(flatten)]
    limits: LoadLimitArgs,
    #[command(flatten)]
    compile: CompileArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

impl LoadArgs {
    /// Loads `path`, or prints why not and returns the exit status.
    pub fn model(&self, path: &Path, quiet: bool) -> Result<Model, u8> {
        model(path, &self.runtime, &self.limits, &self.compile, quiet)
    }
}

fn model(
    path: &Path,
    runtime_args: &RuntimeArgs,
    limits: &LoadLimitArgs,
    compile: &CompileArgs,
    quiet: bool,
) -> Result<Model, u8> {
    let runtime = runtime_args.runtime().map_err(|e| exit::report(None, &e))?;
    let spinner = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let progress = spinner.clone().map(|bar| {
        let name = path.display().to_string();
        Progress(Arc::new(move |phase| {
            bar.set_message(format!("{name}: {phase}"))
        }))
    });
    let options = LoadOptions {
        preinit: !runtime_args.no_preinit,
        limits: limits.limits(),
        progress,
        isolate: compile.isolation(),
        resident_memory: limits.resident_vram,
    };
    let loaded = Model::load_with(&runtime, path, &options);
    if let Some(bar) = spinner {
        bar.finish_and_clear();
    }
    loaded.map_err(|e| exit::report(Some(path), &e))
}
