//! `wasm-infer new model NAME`: scaffolds, in the current directory, a model crate on the guest
//! SDK that builds on its own (its own `[workspace]`, the SDK as a path dependency on this
//! checkout) into a component `wasm-infer` inspects and runs.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::exit;

/// This checkout's guest SDK, where a scaffold points by default (an absolute path fixed when
/// this binary was built; `--sdk` overrides it for a binary that moved).
const SDK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest/sdk");
/// The toolchain this checkout builds with (the SDK is tested on it; it lists the wasm target,
/// so rustup installs that too).
const TOOLCHAIN: &str = include_str!("../../../../rust-toolchain.toml");
/// The dependency versions this checkout is tested with; cargo drops what the model does not use.
const LOCKFILE: &str = include_str!("../../../../Cargo.lock");
/// Longest crate name accepted (crates.io's limit).
const MAX_NAME: usize = 64;

#[derive(Subcommand)]
pub enum Command {
    /// Scaffold a model crate NAME (a directory of that name, which must not exist) on the
    /// guest SDK: `cargo build --release --target wasm32-wasip2` in it gives
    /// target/wasm32-wasip2/release/NAME.wasm (dashes become underscores).
    Model(ModelOpts),
}

#[derive(Args)]
pub struct ModelOpts {
    /// The crate's name and directory: ASCII letters, digits, `-` and `_`, starting with a
    /// letter.
    name: String,
    /// The guest SDK crate (guest/sdk of a wasm-infer checkout) to depend on; default: the
    /// checkout this binary was built from.
    #[arg(long, value_name = "PATH")]
    sdk: Option<PathBuf>,
}

pub fn run(command: &Command) -> u8 {
    let Command::Model(opts) = command;
    match scaffold(opts) {
        Ok(dir) => {
            let artifact = opts.name.replace('-', "_");
            println!("created model crate `{}` in {}", opts.name, dir.display());
            println!(
                "build it:  cd {} && cargo build --release --target wasm32-wasip2",
                opts.name
            );
            println!(
                "run it:    wasm-infer --fuel 100M target/wasm32-wasip2/release/{artifact}.wasm \"Hello World 42!\""
            );
            exit::OK
        }
        Err((status, message)) => {
            eprintln!("error: {message}");
            status
        }
    }
}

fn scaffold(opts: &ModelOpts) -> Result<PathBuf, (u8, String)> {
    let usage = |message: String| (exit::USAGE, message);
    check_name(&opts.name).map_err(usage)?;
    let sdk = match &opts.sdk {
        Some(path) => path.clone(),
        None => PathBuf::from(SDK_DIR),
    };
    let sdk = sdk
        .canonicalize()
        .ok()
        .filter(|dir| dir.join("Cargo.toml").is_file())
        .ok_or_else(|| {
            usage(format!(
                "no guest SDK at {} (a wasm-infer checkout's guest/sdk; pass --sdk PATH)",
                sdk.display()
            ))
        })?;
    let sdk_text = sdk.to_str().ok_or_else(|| {
        usage(format!(
            "the SDK path {} is not UTF-8, which Cargo.toml cannot hold",
            sdk.display()
        ))
    })?;
    let dir = PathBuf::from(&opts.name);
    // `create_dir` (not `create_dir_all`) fails on an existing directory or file: nothing of
    // the user's is ever overwritten, and two concurrent scaffolds cannot both win.
    std::fs::create_dir(&dir).map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{} already exists; nothing was written", dir.display())
        } else {
            format!("creating {}: {e}", dir.display())
        };
        (exit::USAGE, message)
    })?;
    let manifest = MANIFEST
        .replace("__NAME__", &opts.name)
        .replace("__SDK__", &toml_string(sdk_text));
    let files: [(&str, String); 7] = [
        ("Cargo.toml", manifest),
        ("Cargo.lock", LOCKFILE.to_string()),
        ("rust-toolchain.toml", TOOLCHAIN.to_string()),
        (".cargo/config.toml", CARGO_CONFIG.to_string()),
        (".gitignore", "/target\n".to_string()),
        ("src/lib.rs", LIB.replace("__NAME__", &opts.name)),
        (
            "README.md",
            README
                .replace("__NAME__", &opts.name)
                .replace("__ARTIFACT__", &opts.name.replace('-', "_")),
        ),
    ];
    for (path, text) in files {
        write(&dir, path, &text).map_err(|e| (exit::INTERNAL, e))?;
    }
    Ok(std::env::current_dir()
        .map(|cwd| cwd.join(&dir))
        .unwrap_or(dir))
}

fn write(dir: &Path, path: &str, text: &str) -> Result<(), String> {
    let path = dir.join(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A crate name cargo accepts and that is safe as a directory name.
fn check_name(name: &str) -> Result<(), String> {
    let valid = name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a model crate name: use up to {MAX_NAME} ASCII letters, digits, \
             `-` and `_`, starting with a letter"
        ))
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut quoted = String::from('"');
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

const MANIFEST: &str = r#"[package]
name = "__NAME__"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the wasm32-wasip2 component wasm-infer runs. rlib: the same code natively, for tests.
crate-type = ["cdylib", "rlib"]

[dependencies]
# The wasm-infer guest SDK: the WIT bindings, the Model trait and export_model!, conversions,
# embedded weights and the accelerator bridge. It re-exports candle (candle_core, candle_nn).
wasm-infer-guest = { path = __SDK__ }

# A workspace of its own: the crate builds wherever it is, inside another workspace or not.
[workspace]

[profile.release]
# Debug info would be a large part of the component; wasm-infer does not need it.
strip = "debuginfo"
"#;

const CARGO_CONFIG: &str = r#"# The guest uses wasm SIMD (candle's simd128 kernels and the SDK's own); wasm-infer's engine
# supports it.
[target.wasm32-wasip2]
rustflags = ["-C", "target-feature=+simd128"]
"#;

const LIB: &str = r#"//! __NAME__: a model component for wasm-infer, on the guest SDK (`wasm-infer-guest`).
//!
//! This starter embeds each text as its count of characters and its letters minus digits,
//! from four counts (letters, digits, spaces, other characters) mixed by one linear layer.
//! Replace `load` and `infer` with your candle model: embed its weights with
//! `include_bytes!` and read them with `wasm_infer_guest::weights::safetensors` (or
//! `weights::Gguf`), and run its heavy layers through `accel.forward` so that they use the
//! host's accelerator when it offers one and the sandbox when it does not.

use wasm_infer_guest::candle_core::{Device, Tensor};
use wasm_infer_guest::{export_model, Accel, Ids, Input, Linear, Linears, Model};
use wasm_infer_guest::{ModelError, ModelInfo, Output};

const NAME: &str = "__NAME__";

pub struct Starter {
    mix: Linear,
}

impl Model for Starter {
    /// Runs once, before the snapshot every run starts from: build everything here.
    fn load() -> Result<Self, ModelError> {
        // [out = 2, in = 4]: all characters; letters minus digits.
        let weight = Tensor::new(&[[1f32, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0]], &Device::Cpu)?;
        let bias = Tensor::new(&[0f32, 0.0], &Device::Cpu)?;
        let mix = Linear::new(weight, bias, &mut Ids::default())?;
        Ok(Self { mix })
    }

    fn info() -> ModelInfo {
        ModelInfo::embeddings(NAME, "characters, and letters minus digits, of each text", 2)
    }

    fn infer(&self, input: Input, accel: &mut Accel) -> Result<Output, ModelError> {
        let texts = input.texts(NAME)?;
        let counts = |text: &String| {
            let (mut letters, mut digits, mut spaces, mut other) = (0, 0, 0, 0);
            for c in text.chars() {
                match c {
                    c if c.is_alphabetic() => letters += 1,
                    c if c.is_numeric() => digits += 1,
                    c if c.is_whitespace() => spaces += 1,
                    _ => other += 1,
                }
            }
            [letters, digits, spaces, other].map(|n: u32| n as f32)
        };
        let x: Vec<f32> = texts.iter().flat_map(counts).collect();
        let x = Tensor::from_vec(x, (texts.len(), 4), &Device::Cpu)?;
        let y = accel.forward(|d| d.linear(&self.mix, &x), |s| s.linear(&self.mix, &x))?;
        Ok(Output::embeddings(&y)?)
    }
}

export_model!(Starter);
"#;

const README: &str = r#"# __NAME__

A model component for wasm-infer, written on its guest SDK (`wasm-infer-guest`). `src/lib.rs` is a starter model to replace with your own.

Build (the toolchain and the `wasm32-wasip2` target come from `rust-toolchain.toml`):

    cargo build --release --target wasm32-wasip2

The component is `target/wasm32-wasip2/release/__ARTIFACT__.wasm`. Run it under limits:

    wasm-infer --fuel 100M --mem 256M target/wasm32-wasip2/release/__ARTIFACT__.wasm "Hello World 42!"
    wasm-infer inspect target/wasm32-wasip2/release/__ARTIFACT__.wasm
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_crate_names_and_nothing_else() {
        for good in ["toy", "my-model", "m_2", "A"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "2fast",
            "-x",
            "a/b",
            "..",
            "a b",
            "naïve",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn toml_strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(toml_string(r#"/a "b"\c"#), r#""/a \"b\"\\c""#);
        assert_eq!(toml_string("a\nb"), r#""a\u000Ab""#);
    }
}
