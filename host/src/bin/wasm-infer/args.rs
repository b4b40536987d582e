//! Flag groups shared by the subcommands: the run's limits, the load-time limits, and the
//! runtime (device, cache, pre-initialisation). Every limit has an environment fallback.

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use clap::{Args, ValueEnum};
use wasm_infer::isolate::DEFAULT_COMPILE_LIMITS;
use wasm_infer::isolate::{CompileLimits, Isolation};
use wasm_infer::units::{parse_count, parse_duration, parse_fuel, parse_size};
use wasm_infer::{AccelMode, Error, Limits, Runtime, RuntimeConfig, DEFAULT_CACHE_MAX_BYTES};

/// A size as a flag takes it, exactly (`1GiB`, `512MiB`, `1000B`).
pub fn size_arg(bytes: u64) -> String {
    for (unit, scale) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

/// A duration as a flag takes it, exactly (`30s`, `2m`, `250ms`).
pub fn duration_arg(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Every default in `--help` is the library's own constant, written as the flag takes it
/// (`tests` below parse each back and compare).
macro_rules! default_arg {
    ($name:ident = $value:expr) => {
        static $name: LazyLock<String> = LazyLock::new(|| $value);
    };
}
default_arg!(MEM = size_arg(Limits::default().memory));
default_arg!(TIMEOUT = duration_arg(Limits::default().wall_time));
default_arg!(MAX_INPUT = size_arg(Limits::default().max_input));
default_arg!(MAX_BATCH = Limits::default().max_batch.to_string());
default_arg!(MAX_OUTPUT = size_arg(Limits::default().max_output));
default_arg!(VRAM = size_arg(Limits::default().device_memory));
default_arg!(RESIDENT_VRAM = size_arg(wasm_infer::accel::DEFAULT_RESIDENT_MEMORY));
default_arg!(COMPILE_CPU = duration_arg(DEFAULT_COMPILE_LIMITS.cpu));
default_arg!(COMPILE_MEM = size_arg(DEFAULT_COMPILE_LIMITS.memory));
default_arg!(COMPILE_TIMEOUT = duration_arg(DEFAULT_COMPILE_LIMITS.wall_time));
default_arg!(CACHE_MAX = size_arg(DEFAULT_CACHE_MAX_BYTES));

/// The limits of one run.
#[derive(Args)]
#[command(next_help_heading = "Limits of a run")]
pub struct LimitArgs {
    /// Compute cap in fuel units (about one per wasm instruction); K/M/G/T = 10^3/6/9/12.
    /// Deterministic: the same model and input always consume the same fuel, so a cap proven in
    /// CI holds everywhere. Default: unlimited (but always measured and reported).
    #[arg(long, env = "WASM_INFER_FUEL", value_parser = parse_fuel)]
    pub fuel: Option<u64>,
    /// Ceiling on the guest's total linear memory (its embedded weights included); K/M/G =
    /// KiB/MiB/GiB, so `2G` is 2 GiB.
    #[arg(long, env = "WASM_INFER_MEM", value_parser = parse_size, default_value = MEM.as_str())]
    pub mem: u64,
    /// Wall-clock limit for the run, with its unit (`5s`, `250ms`, `1m`). Enforced by epoch
    /// interruption, so a run ends within one 10 ms tick of it; unlike fuel it depends on the
    /// machine's speed.
    #[arg(long, env = "WASM_INFER_TIMEOUT", value_parser = parse_duration, default_value = TIMEOUT.as_str())]
    pub timeout: Duration,
    /// Largest input accepted: UTF-8 bytes of all texts plus 8 per batch item, checked before
    /// any guest work.
    #[arg(long, env = "WASM_INFER_MAX_INPUT", value_parser = parse_size, default_value = MAX_INPUT.as_str())]
    pub max_input: u64,
    /// Most items a batch input may have, checked before any guest work.
    #[arg(long, env = "WASM_INFER_MAX_BATCH", value_parser = parse_count, default_value = MAX_BATCH.as_str())]
    pub max_batch: u64,
    /// Largest output payload accepted (4 bytes per embedding value); a larger result is
    /// discarded, not printed.
    #[arg(long, env = "WASM_INFER_MAX_OUTPUT", value_parser = parse_size, default_value = MAX_OUTPUT.as_str())]
    pub max_output: u64,
    /// Device-memory budget of the run on the accelerator path (VRAM, or host RAM on the CPU
    /// backend); an allocation past it is refused and the model falls back to in-sandbox
    /// compute (or fails with exit 15).
    #[arg(long, env = "WASM_INFER_VRAM", value_parser = parse_size, default_value = VRAM.as_str())]
    pub vram: u64,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            fuel: self.fuel,
            memory: self.mem,
            wall_time: self.timeout,
            max_input: self.max_input,
            max_batch: self.max_batch,
            max_output: self.max_output,
            device_memory: self.vram,
            ..Limits::default()
        }
    }
}

/// The limits of the calls loading makes into the guest (pre-initialisation and `info`).
#[derive(Args)]
#[command(next_help_heading = "Limits of loading")]
pub struct LoadLimitArgs {
    /// Fuel cap for loading (pre-initialisation plus `info`). Default: unlimited.
    #[arg(long, env = "WASM_INFER_LOAD_FUEL", value_parser = parse_fuel)]
    pub load_fuel: Option<u64>,
    /// Memory ceiling for loading; raise it for a model whose initial memory is larger.
    #[arg(long, env = "WASM_INFER_LOAD_MEM", value_parser = parse_size, default_value = MEM.as_str())]
    pub load_mem: u64,
    /// Wall-clock limit for each load-time call, with its unit.
    #[arg(long, env = "WASM_INFER_LOAD_TIMEOUT", value_parser = parse_duration, default_value = TIMEOUT.as_str())]
    pub load_timeout: Duration,
    /// Device memory the model's resident weights may hold for as long as it is loaded (its
    /// own budget, apart from the one runs draw on); a bind past it is refused and the model
    /// falls back to in-sandbox compute.
    #[arg(long, env = "WASM_INFER_RESIDENT_VRAM", value_parser = parse_size, default_value = RESIDENT_VRAM.as_str())]
    pub resident_vram: u64,
}

impl LoadLimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            fuel: self.load_fuel,
            memory: self.load_mem,
            wall_time: self.load_timeout,
            ..Limits::default()
        }
    }
}

/// Where and under which OS limits an uncached model is compiled.
#[derive(Args)]
#[command(next_help_heading = "Compilation")]
pub struct CompileArgs {
    /// CPU time the compiling worker process may use (compile and pre-initialisation).
    #[arg(long, env = "WASM_INFER_COMPILE_CPU", value_parser = parse_duration, default_value = COMPILE_CPU.as_str())]
    pub compile_cpu: Duration,
    /// Memory the compiling worker process may allocate.
    #[arg(long, env = "WASM_INFER_COMPILE_MEM", value_parser = parse_size, default_value = COMPILE_MEM.as_str())]
    pub compile_mem: u64,
    /// Wall-clock time after which the compiling worker process is killed.
    #[arg(long, env = "WASM_INFER_COMPILE_TIMEOUT", value_parser = parse_duration, default_value = COMPILE_TIMEOUT.as_str())]
    pub compile_timeout: Duration,
    /// Compile in this process, without OS limits (faster; for models you trust).
    #[arg(long)]
    pub compile_in_process: bool,
}

impl CompileArgs {
    /// The worker setup: this binary, in its hidden worker mode, under the limits.
    pub fn isolation(&self) -> Option<Isolation> {
        if self.compile_in_process {
            return None;
        }
        let worker = std::env::current_exe().ok()?;
        Some(Isolation {
            worker,
            limits: CompileLimits {
                cpu: self.compile_cpu,
                memory: self.compile_mem,
                wall_time: self.compile_timeout,
            },
        })
    }
}

/// Where the model runs and how its compiled code is kept.
#[derive(Args)]
#[command(next_help_heading = "Runtime")]
pub struct RuntimeArgs {
    /// Directory for compiled models (default: ~/.cache/wasm-infer/precompiled).
    #[arg(long, env = "WASM_INFER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile the model afresh and do not touch the cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Most bytes the cache may hold; least recently used entries are removed past it.
    #[arg(long, env = "WASM_INFER_CACHE_MAX", value_parser = parse_size, default_value = CACHE_MAX.as_str())]
    pub cache_max: u64,
    /// Do not pre-initialise: every run builds the model itself (slower; for comparison).
    #[arg(long)]
    pub no_preinit: bool,
    /// The device offered to the model's accelerator imports: `auto` (CUDA if built with it
    /// and present, else the CPU), `cpu`, `cuda`, or `off` (no device; models compute in the
    /// sandbox).
    #[arg(long, env = "WASM_INFER_ACCEL", value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Canonicalise every NaN the model computes (`on`) or leave NaN bits to the CPU (`off`).
    /// Off keeps fuel and every float output bit-identical across runs, processes and x86-64
    /// machines for models that treat a NaN as a number; on extends that to the bits of a NaN
    /// a model reads as an integer, at about twice the in-sandbox time (docs/determinism.md).
    #[arg(long, env = "WASM_INFER_NAN_CANONICALIZATION", value_enum, value_name = "on|off",
          default_value_t = OnOff::from(wasm_infer::DEFAULT_NAN_CANONICALIZATION))]
    pub nan_canonicalization: OnOff,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl From<bool> for OnOff {
    fn from(on: bool) -> Self {
        if on {
            Self::On
        } else {
            Self::Off
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    Auto,
    Cpu,
    Cuda,
    Off,
}

impl From<AccelArg> for AccelMode {
    fn from(arg: AccelArg) -> Self {
        match arg {
            AccelArg::Auto => Self::Auto,
            AccelArg::Cpu => Self::Cpu,
            AccelArg::Cuda => Self::Cuda,
            AccelArg::Off => Self::Off,
        }
    }
}

impl RuntimeArgs {
    pub fn config(&self) -> RuntimeConfig {
        let mut config = RuntimeConfig {
            accel: self.accel.into(),
            cache_max_bytes: Some(self.cache_max),
            nan_canonicalization: self.nan_canonicalization == OnOff::On,
            ..RuntimeConfig::default()
        };
        if self.no_cache {
            config.cache_dir = None;
        } else if let Some(dir) = &self.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        config
    }

    pub fn runtime(&self) -> Result<Runtime, Error> {
        Runtime::with_config(self.config())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct All {
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        load: LoadLimitArgs,
        #[command(flatten)]
        compile: CompileArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    }

    #[test]
    fn every_default_is_the_librarys_constant() {
        // Parsed with no flags and none of their environment fallbacks (removed in this test
        // process only).
        for var in [
            "WASM_INFER_FUEL",
            "WASM_INFER_MEM",
            "WASM_INFER_TIMEOUT",
            "WASM_INFER_MAX_INPUT",
            "WASM_INFER_MAX_BATCH",
            "WASM_INFER_MAX_OUTPUT",
            "WASM_INFER_VRAM",
            "WASM_INFER_LOAD_FUEL",
            "WASM_INFER_LOAD_MEM",
            "WASM_INFER_LOAD_TIMEOUT",
            "WASM_INFER_RESIDENT_VRAM",
            "WASM_INFER_COMPILE_CPU",
            "WASM_INFER_COMPILE_MEM",
            "WASM_INFER_COMPILE_TIMEOUT",
            "WASM_INFER_CACHE_DIR",
            "WASM_INFER_CACHE_MAX",
            "WASM_INFER_ACCEL",
            "WASM_INFER_NAN_CANONICALIZATION",
        ] {
            std::env::remove_var(var);
        }
        let all = All::parse_from(["wasm-infer"]);
        assert_eq!(all.limits.limits(), Limits::default());
        assert_eq!(all.load.limits(), wasm_infer::LoadOptions::default().limits);
        assert_eq!(
            all.load.resident_vram,
            wasm_infer::LoadOptions::default().resident_memory
        );
        let isolation = all.compile.isolation().expect("isolated by default");
        assert_eq!(isolation.limits, DEFAULT_COMPILE_LIMITS);
        let config = all.runtime.config();
        let library = RuntimeConfig::default();
        assert_eq!(config.cache_max_bytes, library.cache_max_bytes);
        assert_eq!(config.cache_dir, library.cache_dir);
        assert_eq!(config.accel, library.accel);
        assert_eq!(config.nan_canonicalization, library.nan_canonicalization);
    }

    /// clap's own consistency checks of the whole command line (flag names, groups, defaults
    /// against their parsers), which otherwise run only when a flag is used.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        crate::Cli::command().debug_assert();
    }

    #[test]
    fn sizes_and_durations_print_as_the_flags_read_them() {
        for bytes in [1, 1000, 1024, 1536, 1 << 20, 16 << 20, 1 << 30, 3 << 40] {
            assert_eq!(
                parse_size(&size_arg(bytes)).unwrap(),
                bytes,
                "{}",
                size_arg(bytes)
            );
        }
        assert_eq!(size_arg(1 << 30), "1GiB");
        assert_eq!(size_arg(1536), "1536B");
        for duration in [
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(120),
        ] {
            assert_eq!(parse_duration(&duration_arg(duration)).unwrap(), duration);
        }
    }
}
