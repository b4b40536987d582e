//! `wasm-infer`: the command-line face of the `wasm_infer` library. This file only parses the
//! command line and dispatches; each subcommand lives in its own file, and the library decides
//! everything about a run.

mod args;
mod cache;
mod calibrate;
mod check;
mod exit;
mod generate;
mod inspect;
mod load;
mod new;
mod run;
mod selftest;
#[cfg(feature = "serve")]
mod serve;
mod snapshot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run a model component in a WebAssembly sandbox with fuel, memory and time limits.
#[derive(Parser)]
#[command(
    name = "wasm-infer",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = exit::after_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: run::Opts,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model on an input (the default when no subcommand is given).
    Run(run::Opts),
    /// Print a model's info and the world it implements, without running it.
    Inspect(inspect::Opts),
    /// Pre-initialise a model (it must export `wizer-initialize`) and write the snapshot: a
    /// component whose runs start with the model already built. `run` does this by itself
    /// (and caches the result); use this to ship or inspect the snapshot as a file.
    Snapshot(snapshot::Opts),
    /// Serve models over HTTP: OpenAI-compatible /v1/embeddings, /v1/infer, tenants, rate
    /// limits, metrics, graceful drain (see docs/serving.md).
    #[cfg(feature = "serve")]
    Serve(serve::Opts),
    /// Fit fuel and memory to input size over `@inputs.txt`, write a profile (docs/calibrate.md).
    Calibrate(calibrate::Opts),
    /// Check (or `--bless`) a cases file of exact fuel, memory and output digests (exit 20).
    Check(check::Opts),
    /// List or clear the compiled-model cache.
    #[command(subcommand)]
    Cache(cache::Command),
    /// Scaffold a project: `new model NAME` writes a model crate on the guest SDK.
    #[command(subcommand)]
    New(new::Command),
    /// The compile worker (internal): compiles a model read from stdin into a cache directory,
    /// under the OS limits its parent set.
    #[command(name = "__load-worker", hide = true)]
    LoadWorker,
    /// A run worker (internal): serves runs over stdin/stdout for a worker pool.
    #[command(name = "__run-worker", hide = true)]
    RunWorker,
    /// Lock-down self-test (internal): locks down, then makes the forbidden call named.
    #[command(name = "__lockdown-selftest", hide = true)]
    LockdownSelftest { call: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let status = match cli.command {
        Some(Command::Run(opts)) => run::run(&opts),
        Some(Command::Inspect(opts)) => inspect::run(&opts),
        Some(Command::Snapshot(opts)) => snapshot::run(&opts),
        Some(Command::Calibrate(opts)) => calibrate::run(&opts),
        Some(Command::Check(opts)) => check::run(&opts),
        Some(Command::Cache(command)) => cache::run(&command),
        Some(Command::New(command)) => new::run(&command),
        #[cfg(feature = "serve")]
        Some(Command::Serve(opts)) => serve::run(&opts),
        Some(Command::LoadWorker) => {
            wasm_infer::worker::load_worker_main(std::io::stdin().lock(), std::io::stdout())
        }
        Some(Command::RunWorker) => {
            wasm_infer::worker::worker_main(std::io::stdin().lock(), std::io::stdout())
        }
        Some(Command::LockdownSelftest { call }) => selftest::run(&call),
        None => run::run(&cli.run),
    };
    ExitCode::from(status)
}

/// Logs on stderr at `WASM_INFER_LOG`'s level (default warn; a server sets up its own).
fn init_logging(cli: &Cli) {
    #[cfg(feature = "serve")]
    if let Some(Command::Serve(opts)) = &cli.command {
        return serve::init_logging(opts);
    }
    let _ = cli;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WASM_INFER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
}
