//! Shared test fixtures: the built guests, the model files, the reference embeddings and the
//! golden fuel figures. A missing prerequisite fails the test with the command that provides it.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use wasm_infer::{
    Error, Input, LimitExceeded, Model, Outcome, RunError, Runtime, RuntimeConfig, Trap,
};

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

/// Where the built guest components are: `WASM_INFER_GUEST_DIR` if set (a checkout that
/// builds its own test guests beside another's shared target), else the target directory's
/// `wasm32-wasip2/release`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("WASM_INFER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip2/release"))
}

/// The all-MiniLM-L6-v2 component, built by `just guest`.
pub fn minilm_wasm() -> PathBuf {
    let path = guest_dir().join("minilm.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `just guest` (or `just test`, which builds it first)",
        path.display()
    );
    path
}

/// The `hostile` test guest, built by `just test-guests` (which `just test` runs first).
pub fn hostile_wasm() -> PathBuf {
    let path = guest_dir().join("hostile.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `just test-guests` (or `just test`, which builds it first)",
        path.display()
    );
    path
}

/// The `toy` test guest (the smallest model on the guest SDK), built by `just test-guests`.
pub fn toy_wasm() -> PathBuf {
    let path = guest_dir().join("toy.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `just test-guests` (or `just test`, which builds it first)",
        path.display()
    );
    path
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

/// Runs the `wasm-infer` binary with `args` and the tests' compiled-model cache.
pub fn wasm_infer(args: &[&str]) -> std::process::Output {
    wasm_infer_in(Path::new("."), args)
}

/// [`wasm_infer`] in directory `dir` (for commands that write into, or read relative to, the
/// current directory).
pub fn wasm_infer_in(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .current_dir(dir)
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .args(args)
        .output()
        .expect("running wasm-infer")
}

/// A finished command's stderr, as text.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The variable names in an environ file (`/proc/PID/environ` or a copy of one: `NAME=value`
/// entries, each ended by a NUL), in the file's order.
pub fn environ_names(path: impl AsRef<Path>) -> Vec<String> {
    let path = path.as_ref();
    let environ = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    environ
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            String::from_utf8_lossy(v)
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A fresh, empty directory for one test's files under the target directory
/// (`test-scratch/TEST_FILE/NAME`), emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = target_dir()
        .join("test-scratch")
        .join(env!("CARGO_CRATE_NAME"))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An empty directory of a test's own outside the repository and its target directory, as a
/// user's would be: no `.cargo/config.toml` of this checkout (or above it) applies to it.
pub fn empty_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasm-infer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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

/// Removes a test's own cache directory and the key file a runtime made beside it
/// (`<dir>.key`), so that a test leaves neither behind in `target/`.
pub fn remove_cache(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(wasm_infer::cache::key_path(dir));
}

/// The tests' compiled-model cache, private to this user as a runtime requires (a directory
/// made by an older build may be 0755).
pub fn cache_dir() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = target_dir().join("test-cache");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
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
pub fn bits(outcome: &Outcome) -> Vec<Vec<u32>> {
    embedding_bits(outcome.output.embeddings().expect("an embeddings output"))
}

/// The bits of embeddings, for exact comparisons.
pub fn embedding_bits(vectors: &[Vec<f32>]) -> Vec<Vec<u32>> {
    vectors
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// One text as an input.
pub fn text(s: &str) -> Input {
    Input::Text(s.to_string())
}

/// The limit a run tripped (panics if it succeeded or failed otherwise).
pub fn limit(result: Result<Outcome, RunError>) -> LimitExceeded {
    match result {
        Err(failure) => match failure.error {
            Error::Limit(limit) => limit,
            other => panic!("expected a limit trip, got {other}"),
        },
        Ok(outcome) => panic!("expected a limit trip, it succeeded: {}", outcome.usage),
    }
}

/// The trap a run ended with: code, message, guest stderr tail.
pub fn trap(result: Result<Outcome, RunError>) -> (Option<Trap>, String, String) {
    match result {
        Err(RunError {
            error:
                Error::Trap {
                    code,
                    message,
                    guest_stderr,
                },
            ..
        }) => (code, message, guest_stderr),
        Err(other) => panic!("expected a trap, got {}", other.error),
        Ok(outcome) => panic!("expected a trap, it succeeded: {}", outcome.usage),
    }
}

/// The text a hostile command answered under default limits.
pub fn reply(command: &str) -> String {
    match hostile().run(text(command), &wasm_infer::Limits::default()) {
        Ok(outcome) => match outcome.output {
            wasm_infer::Output::Text(text) => text,
            other => panic!("{command}: expected text, got {other:?}"),
        },
        Err(e) => panic!("{command}: {e}"),
    }
}

/// The invalid-model reason of a failed load.
pub fn invalid(result: wasm_infer::Result<Model>) -> wasm_infer::InvalidModel {
    match result {
        Err(Error::InvalidModel(reason)) => reason,
        Err(other) => panic!("expected an invalid-model error, got {other}"),
        Ok(_) => panic!("expected an invalid-model error, the model loaded"),
    }
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
    WatModel {
        infer: infer_body,
        extra,
        ..WatModel::default()
    }
    .build()
}

/// A hand-written model component: the core module's `info` and `infer` bodies, extra module
/// fields, and extra WIT (packages and interfaces) whose `imports` the world adds, so a test
/// can import a WASI function by hand.
#[derive(Default)]
pub struct WatModel<'a> {
    /// Instructions run by `info` before it returns its (all-zero) record.
    pub info: &'a str,
    /// Instructions run by `infer` before it returns `Ok(embeddings([]))`.
    pub infer: &'a str,
    /// Extra module fields (tables, memories, functions).
    pub extra: &'a str,
    /// Core imports (WAT wants them before every definition).
    pub core_imports: &'a str,
    /// Pages of the exported memory (0 means 1).
    pub memory_pages: u32,
    /// Extra WIT packages (nested `package a:b@1.0.0 { ... }` blocks).
    pub wit_packages: &'a str,
    /// Interfaces the world imports (`wasi:io/poll@0.2.0`).
    pub imports: &'a [&'a str],
}

impl WatModel<'_> {
    pub fn build(&self) -> Vec<u8> {
        let core = format!(
            r#"(module
                {core_imports}
                (memory (export "memory") {pages})
                (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) i32.const 4096)
                (func (export "info") (result i32) {info} i32.const 1024)
                (func (export "infer") (param i32 i32 i32 i32 i32) (result i32)
                    {infer}
                    i32.const 1024)
                {extra}
            )"#,
            core_imports = self.core_imports,
            pages = self.memory_pages.max(1),
            extra = self.extra,
            info = self.info,
            infer = self.infer,
        );
        let mut module = wat::parse_str(&core).expect("core module WAT");
        let mut resolve = wit_parser::Resolve::default();
        let model = resolve
            .push_file(workspace_root().join("wit/model.wit"))
            .expect("parsing wit/model.wit");
        let world = if self.imports.is_empty() {
            resolve
                .select_world(&[model], Some("model"))
                .expect("the model world")
        } else {
            let imports: String = self
                .imports
                .iter()
                .map(|i| format!("import {i};\n"))
                .collect();
            let wit = format!(
                "package test:wat;\nworld test {{\n include wasm-infer:model/model@0.1.0;\n \
                 {imports}}}\n{}",
                self.wit_packages
            );
            let test = resolve
                .push_str("test.wit", &wit)
                .expect("parsing the test WIT");
            resolve
                .select_world(&[test], Some("test"))
                .expect("the test world")
        };
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

/// A `wasm-infer serve` process started by a test: its address once it listens, and its log
/// lines (stderr), collected by a thread for as long as it runs.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`, from its "listening on" line.
    pub base: String,
    pub log: std::sync::Arc<Mutex<Vec<String>>>,
}

/// Starts `wasm-infer serve --config CONFIG MODELS...` (the config should listen on port 0) and
/// waits up to `timeout` for it to listen; a server that exits or stays silent fails the test
/// with its log.
pub fn spawn_serve(
    config: &Path,
    models: &[PathBuf],
    timeout: std::time::Duration,
) -> ServeProcess {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(models)
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .env("WASM_INFER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wasm-infer serve");
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    match rx.recv_timeout(timeout) {
        Ok(base) => ServeProcess { child, base, log },
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server did not start:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
    }
}

/// Inverts one byte in the middle of `path`, in place (the same inode, as an attacker who can
/// write the file would), and returns the byte's offset.
pub fn flip_middle_byte(path: &std::path::Path) -> u64 {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = file.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&[!byte[0]]).unwrap();
    at
}

/// The compiled-code files (`*.cwasm`) in a cache directory.
pub fn cache_entries(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|read| {
            read.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    entries
}

/// Asserts that `error` is the refusal of cache entry `entry` in cache `dir`.
pub fn assert_cache_refusal(error: &Error, dir: &std::path::Path, entry: &std::path::Path) {
    let expected = format!(
        "the compiled-model cache {}: entry {} failed authentication (altered, or not written \
         under this host's cache key); it was discarded and will be compiled again",
        dir.display(),
        entry.file_name().unwrap().to_string_lossy()
    );
    match error {
        Error::Internal(message) => assert_eq!(message, &expected),
        other => panic!("expected the cache refusal, got {other}"),
    }
}

/// Every way a run holding 4 MiB on the device can end (hostile's `accel-hold:`), for the
/// "every run ending frees the device" checks of tests/accel.rs and tests/gpu.rs: each run's
/// peak is the 4 MiB it held, it ends as its name says (success, fuel, a wall-time trip in
/// wasm or in a host call, a trap), and `used()` (the runtime's device memory in use) is 0
/// after it. The first ending that is not so is the error.
pub fn every_run_ending_frees_the_device(
    model: &Model,
    used: impl Fn() -> u64,
) -> Result<(), String> {
    use std::time::Duration;
    use wasm_infer::Limits;
    let quick = Limits::default().wall_time(Duration::from_millis(100));
    let endings: [(&str, Limits, &str); 5] = [
        ("accel-hold:echo:done", Limits::default(), "success"),
        (
            "accel-hold:spin",
            Limits::default().fuel(20_000_000),
            "fuel",
        ),
        ("accel-hold:spin", quick.clone(), "timeout in wasm"),
        ("accel-hold:sleep", quick, "timeout in a host call"),
        ("accel-hold:panic", Limits::default(), "trap"),
    ];
    for (command, limits, ending) in endings {
        let result = model.run(Input::Text(command.into()), &limits);
        let usage = match &result {
            Ok(outcome) => &outcome.usage,
            Err(failure) => &failure.usage,
        };
        if usage.device_peak_bytes != 4 << 20 {
            return Err(format!("{ending}: peak {}", usage.device_peak_bytes));
        }
        let ended_right = match (ending, &result) {
            ("success", Ok(_)) => true,
            ("fuel", Err(e)) => matches!(e.error.limit(), Some(LimitExceeded::Fuel { .. })),
            ("trap", Err(e)) => matches!(e.error, Error::Trap { .. }),
            (_, Err(e)) => matches!(e.error.limit(), Some(LimitExceeded::WallTime { .. })),
            (_, Ok(_)) => false,
        };
        if !ended_right {
            return Err(format!("{ending}: ended as {result:?}"));
        }
        if used() != 0 {
            return Err(format!("{ending}: {} bytes still accounted", used()));
        }
    }
    Ok(())
}

/// An HTTP answer from a test's `wasm-infer serve` (any status), its header names lowercased.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub text: String,
}

impl Reply {
    pub fn from(result: Result<ureq::Response, ureq::Error>) -> Self {
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(e) => panic!("HTTP transport error: {e}"),
        };
        let status = response.status();
        let headers = response
            .headers_names()
            .into_iter()
            .filter_map(|name| {
                let value = response.header(&name)?.to_string();
                Some((name.to_ascii_lowercase(), value))
            })
            .collect();
        let text = response.into_string().unwrap_or_default();
        Self {
            status,
            headers,
            text,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Asserts an OpenAI-shaped error with `status` and `code`; returns the `error` object.
    pub fn assert_error(&self, status: u16, code: &str) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.text);
        let body = self.json();
        let error = body["error"].clone();
        for field in ["message", "type", "param", "code"] {
            assert!(error.get(field).is_some(), "no {field} in {body}");
        }
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(error["code"], code, "{body}");
        error
    }
}

/// The sum of the samples of `name` in a `/metrics` text whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// smollm2.wasm, built by `just guest`.
pub fn smollm2_wasm() -> PathBuf {
    let path = guest_dir().join("smollm2.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `just guest`",
        path.display()
    );
    path
}

/// A directory removed (with everything in it) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty directory in the system's temporary directory, unique to this process.
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wasm-infer-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Python of the venv with the official `openai` client (scripts/openai-venv.sh), or `None`
/// (said on stdout) where it cannot be made, e.g. without network.
pub fn openai_python() -> Option<String> {
    let setup = std::process::Command::new("bash")
        .arg(workspace_root().join("scripts/openai-venv.sh"))
        .output()
        .expect("running scripts/openai-venv.sh");
    if !setup.status.success() {
        println!(
            "skipped: the openai venv could not be created: {}",
            String::from_utf8_lossy(&setup.stderr)
        );
        return None;
    }
    Some(String::from_utf8(setup.stdout).unwrap().trim().to_string())
}

/// Runs `python -c script args...` and parses what it prints as JSON; a failure fails the test
/// with its stderr and `context()` (a server's log).
pub fn python_json(
    python: &str,
    script: &str,
    args: &[&str],
    context: impl Fn() -> String,
) -> serde_json::Value {
    let output = std::process::Command::new(python)
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        context()
    );
    serde_json::from_slice(&output.stdout).unwrap()
}
