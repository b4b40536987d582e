//! `wasm-infer new model NAME`, tried as a new user would: scaffold into an empty directory,
//! build the crate for wasm32-wasip2 with cargo (outside this workspace), inspect and run the
//! component, and check its output against the starter model's arithmetic done here.
//!
//! The build shares one target directory (`$CARGO_TARGET_DIR/scaffold`) between runs, so only
//! the first run compiles candle for wasm32; it runs `--offline` on the scaffold's lockfile
//! (this checkout's), so it needs no network.

mod support;

use std::process::Command;

use support::{empty_dir, stderr, target_dir, wasm_infer_in};

const NAME: &str = "my-model";

/// The starter's answer, computed here: [characters, letters − digits].
fn starter(text: &str) -> [f32; 2] {
    let letters = text.chars().filter(|c| c.is_alphabetic()).count() as f32;
    let digits = text.chars().filter(|c| c.is_numeric()).count() as f32;
    [text.chars().count() as f32, letters - digits]
}

#[test]
fn a_scaffolded_model_builds_outside_the_workspace_inspects_and_runs() {
    let work = empty_dir("scaffold");
    let created = wasm_infer_in(&work, &["new", "model", NAME]);
    assert!(created.status.success(), "{}", stderr(&created));
    let crate_dir = work.join(NAME);
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "rust-toolchain.toml",
        ".cargo/config.toml",
        ".gitignore",
        "src/lib.rs",
        "README.md",
    ] {
        assert!(crate_dir.join(file).is_file(), "{file} was not written");
    }
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let sdk = support::workspace_root()
        .join("guest/sdk")
        .canonicalize()
        .unwrap();
    assert!(
        manifest.contains(&format!("path = \"{}\"", sdk.display())),
        "the SDK is an absolute path dependency on this checkout:\n{manifest}"
    );
    assert!(
        manifest.contains("\n[workspace]\n"),
        "a workspace of its own"
    );

    let build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", target_dir().join("scaffold"))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--offline",
        ])
        .output()
        .unwrap();
    assert!(build.status.success(), "cargo build: {}", stderr(&build));
    let wasm = target_dir().join("scaffold/wasm32-wasip2/release/my_model.wasm");
    let wasm = wasm.to_str().unwrap();

    let inspect = wasm_infer_in(&work, &["inspect", "--json", wasm]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["world"], "wasm-infer:model/model@0.1.0");
    assert_eq!(info["info"]["name"], NAME);
    assert_eq!(info["info"]["output_dimension"], 2);

    let texts = ["Hello World 42!", "ünï 3"];
    assert_eq!(starter(texts[0]), [15.0, 8.0]);
    let run = wasm_infer_in(&work, &["--fuel", "100M", wasm, texts[0]]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(out["model"], NAME);
    assert_eq!(out["embeddings"], serde_json::json!([starter(texts[0])]));
    std::fs::write(work.join("texts.txt"), texts.join("\n")).unwrap();
    let run = wasm_infer_in(&work, &["--accel", "off", wasm, "@texts.txt"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let expected: Vec<[f32; 2]> = texts.iter().map(|t| starter(t)).collect();
    assert_eq!(out["embeddings"], serde_json::json!(expected));

    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn new_refuses_an_existing_directory_and_writes_nothing() {
    let work = empty_dir("scaffold-exists");
    std::fs::create_dir(work.join(NAME)).unwrap();
    std::fs::write(work.join(NAME).join("Cargo.toml"), "mine").unwrap();
    let refused = wasm_infer_in(&work, &["new", "model", NAME]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(refused.stdout.is_empty());
    assert!(
        stderr(&refused).contains("my-model already exists; nothing was written"),
        "{}",
        stderr(&refused)
    );
    let kept = std::fs::read_to_string(work.join(NAME).join("Cargo.toml")).unwrap();
    assert_eq!(kept, "mine");
    assert_eq!(std::fs::read_dir(work.join(NAME)).unwrap().count(), 1);
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn new_refuses_a_name_that_is_not_a_crate_name_or_a_missing_sdk() {
    let work = empty_dir("scaffold-names");
    for bad in ["../escape", "2fast", "a b"] {
        let refused = wasm_infer_in(&work, &["new", "model", bad]);
        assert_eq!(
            refused.status.code(),
            Some(2),
            "{bad}: {}",
            stderr(&refused)
        );
        assert!(
            stderr(&refused).contains("is not a model crate name"),
            "{}",
            stderr(&refused)
        );
    }
    let refused = wasm_infer_in(&work, &["new", "model", "ok", "--sdk", "/nonexistent/sdk"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("no guest SDK at /nonexistent/sdk"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "nothing written"
    );
    std::fs::remove_dir_all(&work).unwrap();
}
