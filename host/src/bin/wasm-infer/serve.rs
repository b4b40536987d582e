//! `wasm-infer serve`: parse the flags and the config file, then hand over to
//! `wasm_infer::serve` (which loads the models, serves, and drains on SIGTERM/SIGINT).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use wasm_infer::serve::{ServeConfig, ServeError};
use wasm_infer::LoadOptions;

use crate::args::{CompileArgs, LoadLimitArgs, RuntimeArgs};
use crate::exit;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Opts {
    #[command(subcommand)]
    command: Option<Command>,
    /// Model components to serve (each named by its model info's name), on top of the config's
    /// `[[models]]`.
    models: Vec<PathBuf>,
    /// The service's configuration (TOML: listen, limits, models, tenants, rate limits; see
    /// docs/serving.md). Without it: one anonymous tenant on loopback with the default
    /// limits.
    #[arg(long, env = "WASM_INFER_SERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the config's `listen`).
    #[arg(long, env = "WASM_INFER_LISTEN")]
    listen: Option<SocketAddr>,
    /// A separate listen address for `/metrics` (overrides the config's `metrics_listen`).
    #[arg(long, env = "WASM_INFER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log lines as text or as one JSON object each (level: `WASM_INFER_LOG`, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    load_limits: LoadLimitArgs,
    #[command(flatten)]
    compile: CompileArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print the SHA-256 of an API key (read from stdin, one line), as `key_sha256` wants it.
    HashKey,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

pub fn run(opts: &Opts) -> u8 {
    if let Some(Command::HashKey) = opts.command {
        return hash_key();
    }
    let mut config = match &opts.config {
        Some(path) => match ServeConfig::from_file(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("error: {e}");
                return exit::USAGE;
            }
        },
        None => ServeConfig::default(),
    };
    if let Some(listen) = opts.listen {
        config.listen = listen;
    }
    if let Some(metrics) = opts.metrics_listen {
        config.metrics_listen = Some(metrics);
    }
    let load = LoadOptions {
        preinit: !opts.runtime.no_preinit,
        limits: opts.load_limits.limits(),
        progress: None,
        isolate: opts.compile.isolation(),
        resident_memory: opts.load_limits.resident_vram,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return exit::INTERNAL;
        }
    };
    let result = runtime.block_on(async {
        let state =
            wasm_infer::serve::prepare(config, &opts.models, opts.runtime.config(), &load).await?;
        wasm_infer::serve::serve(state).await
    });
    match result {
        Ok(_cancelled) => exit::OK,
        Err(ServeError::Model { path, error }) => exit::report(Some(&path), &error),
        Err(ServeError::Config(e)) => {
            eprintln!("error: {e}");
            exit::USAGE
        }
        Err(e @ ServeError::Io(_)) => {
            eprintln!("error: {e}");
            exit::INTERNAL
        }
    }
}

/// Logs on stderr at `WASM_INFER_LOG`'s level (default info: a server's requests are worth a
/// line), as text or one JSON object per line.
pub fn init_logging(opts: &Opts) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASM_INFER_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match opts.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn hash_key() -> u8 {
    let mut key = String::new();
    if std::io::stdin().read_line(&mut key).is_err() {
        eprintln!("error: reading the key from stdin");
        return exit::USAGE;
    }
    let key = key.trim_end_matches(['\n', '\r']);
    if key.is_empty() {
        eprintln!("error: an empty key (pipe it in: `echo -n KEY | wasm-infer serve hash-key`)");
        return exit::USAGE;
    }
    println!("{}", wasm_infer::serve::hash_key(key));
    exit::OK
}
