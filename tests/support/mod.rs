//! Shared test fixtures: the built guests, the model files, the reference embeddings and the
//! golden fuel figures. A missing prerequisite fails the test with the command that provides it.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use wasm_infer::{Model, Runtime, RuntimeConfig};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The all-MiniLM-L6-v2 component, built by `just guest`.
pub fn minilm_wasm() -> PathBuf {
    let path = target_dir().join("wasm32-wasip2/release/minilm.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `just guest` (or `just test`, which builds it first)",
        path.display()
    );
    path
}

/// The `hostile` test guest, built on first use into its own target directory (the outer
/// `cargo test` holds the lock on the shared one).
pub fn hostile_wasm() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = target_dir().join("test-guests");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(workspace_root())
                .args([
                    "build",
                    "--release",
                    "--target",
                    "wasm32-wasip2",
                    "-p",
                    "hostile",
                ])
                .arg("--target-dir")
                .arg(&target)
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("RUSTFLAGS")
                .status()
                .expect("running cargo to build the hostile test guest");
            assert!(
                status.success(),
                "building guest/test-guests/hostile failed: is the wasm32-wasip2 target \
                 installed? (`rustup target add wasm32-wasip2`, or `just setup`)"
            );
            target.join("wasm32-wasip2/release/hostile.wasm")
        })
        .clone()
}

/// The unpacked all-MiniLM-L6-v2 files, fetched by `just model`.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("WASM_INFER_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/wasm-infer/model")
        });
    assert!(
        dir.join("model.safetensors").is_file(),
        "model files missing in {}: run `just model`",
        dir.display()
    );
    dir
}

/// One runtime per test binary, caching compiled guests under target/ (not the user's cache).
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Runtime::with_config(RuntimeConfig {
            cache_dir: Some(cache_dir()),
            ..RuntimeConfig::default()
        })
        .expect("creating the runtime")
    })
}

pub fn cache_dir() -> PathBuf {
    target_dir().join("test-cache")
}

pub fn minilm() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(runtime(), minilm_wasm()).expect("loading minilm.wasm"))
}

/// MiniLM on a runtime that offers no accelerator: everything computed in the sandbox.
pub fn minilm_in_sandbox() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: Some(cache_dir()),
            accel: wasm_infer::AccelMode::Off,
            ..RuntimeConfig::default()
        })
        .expect("creating the runtime");
        Model::load(&runtime, minilm_wasm()).expect("loading minilm.wasm")
    })
}

/// MiniLM without pre-initialisation: every run builds the model itself.
pub fn minilm_no_preinit() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let options = wasm_infer::LoadOptions {
            preinit: false,
            ..Default::default()
        };
        Model::load_with(runtime(), minilm_wasm(), &options).expect("loading minilm.wasm")
    })
}

pub fn hostile() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(runtime(), hostile_wasm()).expect("loading hostile.wasm"))
}

/// A MiniLM run on the reference case `name` under default limits.
pub fn embed_case(name: &str) -> wasm_infer::Outcome {
    minilm()
        .run(
            wasm_infer::Input::Text(case(name).text),
            &wasm_infer::Limits::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The committed reference embeddings (tests/fixtures/make_reference.py).
#[derive(Deserialize)]
pub struct Reference {
    pub model: String,
    pub generator: String,
    pub dimension: usize,
    pub cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
pub struct Case {
    pub name: String,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

pub fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = workspace_root().join("tests/fixtures/reference.json");
        serde_json::from_slice(&std::fs::read(&path).expect("reading reference.json"))
            .expect("parsing reference.json")
    })
}

pub fn case(name: &str) -> Case {
    reference()
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no reference case {name}"))
        .clone()
}

/// The bits of every embedding in an outcome, for exact comparisons.
pub fn bits(outcome: &wasm_infer::Outcome) -> Vec<Vec<u32>> {
    outcome
        .output
        .embeddings()
        .unwrap()
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

const GOLDEN: &str = "tests/golden/fuel.json";

/// Asserts that `figure` is the golden value `name` in tests/golden/fuel.json. With `BLESS=1`
/// the file is rewritten instead (`just bless`), for a new toolchain or wasmtime version.
pub fn assert_golden(name: &str, figure: u64) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = workspace_root().join(GOLDEN);
    let mut golden: BTreeMap<String, u64> = std::fs::read(&path)
        .ok()
        .map(|bytes| serde_json::from_slice(&bytes).expect("parsing the golden file"))
        .unwrap_or_default();
    if std::env::var_os("BLESS").is_some() {
        golden.insert(name.to_string(), figure);
        let text = serde_json::to_string_pretty(&golden).unwrap();
        std::fs::write(&path, text + "\n").expect("writing the golden file");
        return;
    }
    let expected = golden.get(name).unwrap_or_else(|| {
        panic!("no golden figure `{name}` in {GOLDEN}: run `just bless` to record it")
    });
    assert_eq!(
        figure, *expected,
        "golden figure `{name}` changed (toolchain, wasmtime or guest change? `just bless` \
         rewrites {GOLDEN} after review)"
    );
}

/// A component of the `model` world built from a hand-written core module: `info` returns an
/// all-zero record (empty strings and lists), `infer` runs `infer_body` (WAT instructions with
/// the five flattened `input` parameters as locals 0-4) and then returns `Ok(embeddings([]))`.
/// `extra` adds module fields (tables, memories, functions) for the body to use.
pub fn wat_model(infer_body: &str, extra: &str) -> Vec<u8> {
    let core = format!(
        r#"(module
            (memory (export "memory") 1)
            (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) i32.const 4096)
            (func (export "info") (result i32) i32.const 1024)
            (func (export "infer") (param i32 i32 i32 i32 i32) (result i32)
                {infer_body}
                i32.const 1024)
            {extra}
        )"#
    );
    let mut module = wat::parse_str(&core).expect("core module WAT");
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve
        .push_file(workspace_root().join("wit/model.wit"))
        .expect("parsing wit/model.wit");
    let world = resolve
        .select_world(&[package], Some("model"))
        .expect("the model world");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("embedding the world");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("componentising the module")
        .validate(true)
        .encode()
        .expect("encoding the component")
}

/// A model whose `infer` grows a table by 1,000 elements until refused, then aborts with
/// `unreachable` as an allocator would.
pub fn table_bomb_wasm() -> Vec<u8> {
    wat_model(
        r#"(block $refused
            (loop $grow
                (br_if $refused (i32.eq (table.grow $t (ref.null func) (i32.const 1000))
                                        (i32.const -1)))
                (br $grow)))
            unreachable"#,
        "(table $t 0 funcref)",
    )
}

/// A model whose `infer` divides by its input's discriminant (0 for a text): a wasm trap.
pub fn div_zero_wasm() -> Vec<u8> {
    wat_model("(drop (i32.div_s (i32.const 1) (local.get 0)))", "")
}
