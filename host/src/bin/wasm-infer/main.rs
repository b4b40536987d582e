//! `wasm-infer`: the command-line face of the `wasm_infer` library. Parses flags, reads the
//! input, prints JSON on success and a typed error otherwise; the library decides everything.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use wasm_infer::limits::{self, parse_duration, parse_fuel, parse_size};
use wasm_infer::{Error, Input, LimitExceeded, Limits, Model, Output, Runtime, RuntimeConfig};

const EXIT_STATUSES: &str = "\
Exit status:
  0   success
  1   internal error (a bug, or the OS refused a resource)
  2   usage error (bad flag or value)
  3   invalid model: missing, unreadable, not wasm, not a component, wrong world
  4   guest trapped (panic, unreachable, stack overflow, ...)
  5   the model refused the input (model error)
  6   the input could not be read or is not UTF-8
  10  fuel limit exceeded (--fuel)
  11  memory limit exceeded (--mem), or the fixed table-size limit
  12  wall-time limit exceeded (--timeout)
  13  input larger than --max-input
  14  output larger than --max-output
  15  device-memory budget exceeded (--vram) and the model did not fall back
On any failure nothing is written to stdout.

Examples:
  wasm-infer --fuel 2G --mem 512M minilm.wasm \"a sentence to embed\"
  wasm-infer minilm.wasm @sentences.txt --report json
  cat sentences.txt | wasm-infer --timeout 5s minilm.wasm -
  wasm-infer inspect minilm.wasm
  wasm-infer snapshot minilm.wasm -o minilm.snap.wasm";

/// Exit statuses, one per failure kind (see `EXIT_STATUSES`).
mod exit {
    pub const INTERNAL: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const INVALID_MODEL: u8 = 3;
    pub const TRAP: u8 = 4;
    pub const MODEL_ERROR: u8 = 5;
    pub const BAD_INPUT: u8 = 6;
    pub const FUEL: u8 = 10;
    pub const MEMORY: u8 = 11;
    pub const WALL_TIME: u8 = 12;
    pub const INPUT_SIZE: u8 = 13;
    pub const OUTPUT_SIZE: u8 = 14;
    pub const DEVICE_MEMORY: u8 = 15;
}

/// Run a model component in a WebAssembly sandbox with fuel, memory and time limits.
#[derive(Parser)]
#[command(
    name = "wasm-infer",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = EXIT_STATUSES
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model on an input (the default when no subcommand is given).
    Run(RunArgs),
    /// Print a model's info and the world it implements, without running it.
    Inspect(InspectArgs),
    /// Pre-initialise a model (it must export `wizer-initialize`) and write the snapshot: a
    /// component whose runs start with the model already built. `run` does this by itself
    /// (and caches the result); use this to ship or inspect the snapshot as a file.
    Snapshot(SnapshotArgs),
}

#[derive(Args)]
struct SnapshotArgs {
    /// The model component (.wasm) to pre-initialise.
    model: PathBuf,
    /// Where to write the snapshot component.
    #[arg(short, long)]
    output: PathBuf,
    /// Limits for the initialisation (as for a run).
    #[command(flatten)]
    limits: LimitArgs,
    /// Print what initialisation cost as JSON on stderr.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The model component (.wasm), built for wasm32-wasip2 against wit/model.wit.
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// The input: a literal text, `@path` to read a file, or `-` for stdin. Files and stdin hold
    /// one text per line and are run as a batch.
    #[arg(required = true, allow_hyphen_values = true)]
    input: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// How to report usage on stderr.
    #[arg(long, value_enum, default_value_t = Report::Text)]
    report: Report,
    /// Print no usage report (errors are still printed).
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Args)]
struct LimitArgs {
    /// Compute cap in fuel units (about one per wasm instruction); K/M/G/T = 10^3/6/9/12.
    /// Deterministic: the same model and input always consume the same fuel, so a cap proven in
    /// CI holds everywhere. Default: unlimited (but always measured and reported).
    #[arg(long, env = "WASM_INFER_FUEL", value_parser = parse_fuel)]
    fuel: Option<u64>,
    /// Ceiling on the guest's total linear memory (its embedded weights included); K/M/G =
    /// KiB/MiB/GiB, so `2G` is 2 GiB.
    #[arg(long, env = "WASM_INFER_MEM", value_parser = parse_size, default_value = "1GiB")]
    mem: u64,
    /// Wall-clock limit for the run (`5s`, `250ms`, `1m`). Enforced by epoch interruption, so
    /// a run ends within one 10 ms tick of it; unlike fuel it depends on the machine's speed.
    #[arg(long, env = "WASM_INFER_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Largest input payload accepted (UTF-8 bytes of all texts), checked before any guest
    /// work.
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
    max_input: u64,
    /// Largest output payload accepted (4 bytes per embedding value); a larger result is
    /// discarded, not printed.
    #[arg(long, value_parser = parse_size, default_value = "16MiB")]
    max_output: u64,
    /// Device-memory budget of the run on the accelerator path (VRAM, or host RAM on the CPU
    /// backend); an allocation past it is refused and the model falls back to in-sandbox
    /// compute (or fails with exit 15).
    #[arg(long, env = "WASM_INFER_VRAM", value_parser = parse_size, default_value = "512MiB")]
    vram: u64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            fuel: self.fuel,
            memory: self.mem,
            wall_time: self.timeout,
            max_input: self.max_input,
            max_output: self.max_output,
            device_memory: self.vram,
        }
    }
}

#[derive(Args)]
struct CacheArgs {
    /// Directory for compiled models (default: $WASM_INFER_CACHE_DIR, else
    /// ~/.cache/wasm-infer/precompiled).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Compile the model afresh and do not touch the cache.
    #[arg(long)]
    no_cache: bool,
    /// Do not pre-initialise: every run builds the model itself (slower; for comparison).
    #[arg(long)]
    no_preinit: bool,
    /// The device offered to the model's accelerator imports: `auto` (CUDA if built with it
    /// and present, else the CPU), `cpu`, `cuda`, or `off` (no device; models compute in the
    /// sandbox).
    #[arg(long, env = "WASM_INFER_ACCEL", value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AccelArg {
    Auto,
    Cpu,
    Cuda,
    Off,
}

impl From<AccelArg> for wasm_infer::AccelMode {
    fn from(arg: AccelArg) -> Self {
        match arg {
            AccelArg::Auto => Self::Auto,
            AccelArg::Cpu => Self::Cpu,
            AccelArg::Cuda => Self::Cuda,
            AccelArg::Off => Self::Off,
        }
    }
}

impl CacheArgs {
    fn runtime(&self) -> Result<Runtime, Error> {
        let mut config = RuntimeConfig {
            accel: self.accel.into(),
            ..RuntimeConfig::default()
        };
        if self.no_cache {
            config.cache_dir = None;
        } else if let Some(dir) = &self.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        Runtime::with_config(config)
    }
}

#[derive(Args)]
struct InspectArgs {
    /// The model component (.wasm).
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Report {
    /// One human-readable line.
    Text,
    /// One JSON object.
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WASM_INFER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Some(Command::Inspect(args)) => inspect(&args),
        Some(Command::Run(args)) => run(&args),
        Some(Command::Snapshot(args)) => snapshot(&args),
        None => run(&cli.run),
    };
    ExitCode::from(code)
}

fn exit_code(error: &Error) -> u8 {
    match error {
        Error::Limit(limit) => match limit {
            LimitExceeded::Fuel { .. } => exit::FUEL,
            LimitExceeded::Memory { .. } | LimitExceeded::Table { .. } => exit::MEMORY,
            LimitExceeded::WallTime { .. } => exit::WALL_TIME,
            LimitExceeded::Input { .. } => exit::INPUT_SIZE,
            LimitExceeded::Output { .. } => exit::OUTPUT_SIZE,
            LimitExceeded::DeviceMemory { .. } => exit::DEVICE_MEMORY,
        },
        Error::InvalidModel(_) | Error::Io { .. } => exit::INVALID_MODEL,
        Error::Trap { .. } => exit::TRAP,
        Error::Model { .. } => exit::MODEL_ERROR,
        Error::Internal(_) => exit::INTERNAL,
        Error::Init(inner) => exit_code(inner),
    }
}

/// The error's kind as a stable word for `--report json`.
fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::Limit(LimitExceeded::Fuel { .. }) => "fuel",
        Error::Limit(LimitExceeded::Memory { .. }) => "memory",
        Error::Limit(LimitExceeded::Table { .. }) => "table",
        Error::Limit(LimitExceeded::WallTime { .. }) => "wall-time",
        Error::Limit(LimitExceeded::Input { .. }) => "input-size",
        Error::Limit(LimitExceeded::Output { .. }) => "output-size",
        Error::Limit(LimitExceeded::DeviceMemory { .. }) => "device-memory",
        Error::InvalidModel(_) | Error::Io { .. } => "invalid-model",
        Error::Trap { .. } => "trap",
        Error::Model { .. } => "model-error",
        Error::Internal(_) => "internal",
        Error::Init(inner) => error_kind(inner),
    }
}

fn load(path: &Path, cache: &CacheArgs) -> Result<Model, u8> {
    let runtime = cache
        .runtime()
        .map_err(|e| report_error(&e, exit_code(&e)))?;
    let options = wasm_infer::LoadOptions {
        preinit: !cache.no_preinit,
        ..Default::default()
    };
    Model::load_with(&runtime, path, &options).map_err(|e| {
        eprintln!("error: {}: {e}", path.display());
        exit_code(&e)
    })
}

fn report_error(error: &Error, code: u8) -> u8 {
    eprintln!("error: {error}");
    code
}

fn run(args: &RunArgs) -> u8 {
    let (Some(model_path), Some(input_arg)) = (&args.model, &args.input) else {
        eprintln!("error: a model and an input are required (see --help)");
        return exit::USAGE;
    };
    let limits = args.limits.limits();
    let input = match read_input(input_arg, limits.max_input) {
        Ok(input) => input,
        Err(InputError::TooLarge(size)) => {
            let error = Error::Limit(LimitExceeded::Input {
                limit: limits.max_input,
                size,
            });
            return report_error(&error, exit::INPUT_SIZE);
        }
        Err(InputError::Unreadable(message)) => {
            eprintln!("error: input {input_arg}: {message}");
            return exit::BAD_INPUT;
        }
    };
    let model = match load(model_path, &args.cache) {
        Ok(model) => model,
        Err(code) => return code,
    };
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
            if !args.quiet {
                print_report(args.report, &model, &outcome.usage, &limits, None);
            }
            0
        }
        Err(failure) => {
            let code = exit_code(&failure.error);
            if args.report == Report::Json && !args.quiet {
                print_report(
                    args.report,
                    &model,
                    &failure.usage,
                    &limits,
                    Some(&failure.error),
                );
            } else {
                eprintln!("error: {}", failure.error);
                if !args.quiet {
                    print_report(args.report, &model, &failure.usage, &limits, None);
                }
            }
            code
        }
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

fn print_report(
    report: Report,
    model: &Model,
    usage: &wasm_infer::Usage,
    limits: &Limits,
    error: Option<&Error>,
) {
    match report {
        Report::Text => eprintln!("usage: {usage}"),
        Report::Json => {
            let error = error.map(|e| {
                serde_json::json!({
                    "kind": error_kind(e),
                    "exit_code": exit_code(e),
                    "message": e.to_string(),
                })
            });
            let value = serde_json::json!({
                "status": if error.is_some() { "error" } else { "ok" },
                "usage": usage,
                "limits": limits,
                "error": error,
                "load": model.load_report(),
            });
            eprintln!("{value}");
        }
    }
}

enum InputError {
    TooLarge(u64),
    Unreadable(String),
}

/// Reads the input argument, never more than `max_input + 1` bytes of a file or stdin, so a
/// huge input is refused without being read.
fn read_input(arg: &str, max_input: u64) -> Result<Input, InputError> {
    let bytes = if arg == "-" {
        read_capped(std::io::stdin().lock(), max_input)?
    } else if let Some(path) = arg.strip_prefix('@') {
        let file = std::fs::File::open(path).map_err(|e| InputError::Unreadable(e.to_string()))?;
        read_capped(file, max_input)?
    } else {
        if arg.len() as u64 > max_input {
            return Err(InputError::TooLarge(arg.len() as u64));
        }
        return Ok(Input::Text(arg.to_string()));
    };
    Input::from_lines(bytes).map_err(|e| InputError::Unreadable(format!("not UTF-8 text ({e})")))
}

fn read_capped(reader: impl Read, max_input: u64) -> Result<Vec<u8>, InputError> {
    let mut bytes = Vec::new();
    reader
        .take(max_input.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| InputError::Unreadable(e.to_string()))?;
    if bytes.len() as u64 > max_input {
        // The true size is unknown (we stopped reading); report what we know.
        return Err(InputError::TooLarge(bytes.len() as u64));
    }
    Ok(bytes)
}

fn inspect(args: &InspectArgs) -> u8 {
    let model = match load(&args.model, &args.cache) {
        Ok(model) => model,
        Err(code) => return code,
    };
    let info = model.info();
    let load = model.load_report();
    if args.json {
        let value = serde_json::json!({
            "world": WORLD,
            "info": info,
            "component": load,
            "accel": { "kind": model.runtime().device().0, "name": model.runtime().device().1 },
        });
        println!("{value}");
    } else {
        println!("world:       {WORLD}");
        println!("name:        {}", info.name);
        println!("version:     {}", info.version);
        println!("description: {}", info.description);
        println!("inputs:      {:?}", info.inputs);
        println!(
            "output:      {:?} (dimension {})",
            info.output, info.output_dimension
        );
        println!("max tokens:  {}", info.max_input_tokens);
        println!(
            "component:   {} ({}, sha256 {})",
            limits::format_size(load.component_bytes),
            match load.code {
                wasm_infer::CodeSource::Cached => "compiled code from cache",
                wasm_infer::CodeSource::Compiled => "compiled now",
            },
            load.component_sha256
        );
        let (kind, name) = model.runtime().device();
        println!("accel:       {kind} ({name})");
        match &load.preinit {
            Some(preinit) => println!(
                "preinit:     snapshot {} ({}); initialisation cost {} fuel, {} memory, {} \
                 once; runs start from it",
                match preinit.source {
                    wasm_infer::PreinitSource::Made => "made now",
                    wasm_infer::PreinitSource::Cached => "from cache",
                    wasm_infer::PreinitSource::File => "given as the file",
                },
                limits::format_size(preinit.init.snapshot_bytes),
                limits::format_count(preinit.init.fuel),
                limits::format_size(preinit.init.memory_bytes),
                humantime::format_duration(Duration::from_millis(
                    preinit.init.time.as_millis() as u64
                )),
            ),
            None => println!("preinit:     none (every run initialises the model)"),
        }
    }
    0
}

fn snapshot(args: &SnapshotArgs) -> u8 {
    let runtime = match Runtime::with_config(RuntimeConfig {
        cache_dir: None,
        ..RuntimeConfig::default()
    }) {
        Ok(runtime) => runtime,
        Err(e) => return report_error(&e, exit_code(&e)),
    };
    let wasm = match std::fs::read(&args.model) {
        Ok(wasm) => wasm,
        Err(e) => {
            eprintln!("error: {}: {e}", args.model.display());
            return exit::INVALID_MODEL;
        }
    };
    let snap = match wasm_infer::snapshot::snapshot(&runtime, &wasm, &args.limits.limits()) {
        Ok(snap) => snap,
        Err(e) => {
            eprintln!("error: {}: {e}", args.model.display());
            return exit_code(&e);
        }
    };
    if let Err(e) = std::fs::write(&args.output, &snap.wasm) {
        eprintln!("error: {}: {e}", args.output.display());
        return exit::INTERNAL;
    }
    let init = &snap.info.init;
    if args.json {
        eprintln!("{}", serde_json::json!(snap.info));
    } else {
        eprintln!(
            "snapshot: {} -> {} ({}); initialisation: {} fuel, {} memory, {}",
            args.model.display(),
            args.output.display(),
            limits::format_size(init.snapshot_bytes),
            limits::format_count(init.fuel),
            limits::format_size(init.memory_bytes),
            humantime::format_duration(Duration::from_millis(init.time.as_millis() as u64)),
        );
    }
    0
}

/// The world every model implements.
const WORLD: &str = "wasm-infer:model/model@0.1.0";
