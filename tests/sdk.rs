//! The guest SDK (`guest/sdk`, crate `wasm-infer-guest`) from the host's side: the toy model
//! (guest/test-guests/toy, under 40 lines of model code) is a component the runtime loads,
//! pre-initialises, inspects and runs, with the accelerator bridge and its fallback, and every
//! output figure is checked against the arithmetic done here.

mod support;

use std::process::Command;

use support::{cache_dir, limit, runtime, text, toy_wasm};
use wasm_infer::{DataKind, Error, Input, Limits, Model, Output, Runtime, RuntimeConfig};

/// The toy's embedded weights (guest/test-guests/toy/build.rs), restated: the first three
/// outputs copy the features, the fourth is `0.5·bytes − 2·words + 3·capitals − 1`.
fn expected(text: &str) -> Vec<f32> {
    let bytes = text.len() as f64;
    let words = text.split_whitespace().count() as f64;
    let capitals = text.chars().filter(|c| c.is_uppercase()).count() as f64;
    vec![
        bytes as f32,
        words as f32,
        capitals as f32,
        (0.5 * bytes - 2.0 * words + 3.0 * capitals - 1.0) as f32,
    ]
}

const TEXTS: [&str; 4] = [
    "Hello World from WASM",
    "",
    "ünïcödé Ärger  with   spaces",
    "one",
];

fn toy() -> Model {
    Model::load(runtime(), toy_wasm()).expect("loading toy.wasm")
}

fn batch() -> Input {
    Input::Texts(TEXTS.iter().map(|t| t.to_string()).collect())
}

fn embeddings(output: Output) -> Vec<Vec<f32>> {
    output.embeddings().expect("embeddings").to_vec()
}

#[test]
fn the_toy_reports_its_info_from_the_sdk() {
    let model = toy();
    let info = model.info();
    assert_eq!(info.name, "toy");
    assert_eq!(info.inputs, [DataKind::Text, DataKind::Texts]);
    assert_eq!(info.output, DataKind::Embeddings);
    assert_eq!(info.output_dimension, 4);
    // The SDK's export runs the model's `load` in `wizer-initialize`: runs start from it.
    assert!(model.load_report().preinit.is_some(), "pre-initialised");
}

#[test]
fn the_toy_embeds_exactly_on_the_device_and_in_the_sandbox() {
    let expected: Vec<Vec<f32>> = TEXTS.iter().map(|t| expected(t)).collect();
    assert_eq!(expected[0], [21.0, 4.0, 6.0, 19.5]);
    let on_device = toy().run(batch(), &Limits::default()).unwrap();
    assert_eq!(embeddings(on_device.output), expected);
    // One upload of the features, the weight and bias bound, one linear, one download.
    assert!(on_device.usage.accel_ops > 0, "{}", on_device.usage);
    assert_eq!(on_device.usage.accel_refusals, 0);

    let off = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache_dir()),
        accel: wasm_infer::AccelMode::Off,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let in_sandbox = Model::load(&off, toy_wasm())
        .unwrap()
        .run(batch(), &Limits::default())
        .unwrap();
    assert_eq!(embeddings(in_sandbox.output), expected);
    assert_eq!(in_sandbox.usage.accel_ops, 0);
}

#[test]
fn a_refused_device_allocation_falls_back_to_the_sandbox_with_the_same_output() {
    let limits = Limits {
        device_memory: 8,
        ..Limits::default()
    };
    let outcome = toy().run(batch(), &limits).unwrap();
    assert_eq!(outcome.usage.accel_refusals, 1, "{}", outcome.usage);
    let expected: Vec<Vec<f32>> = TEXTS.iter().map(|t| expected(t)).collect();
    assert_eq!(embeddings(outcome.output), expected);
}

#[test]
fn the_toy_refuses_bytes_with_the_sdks_unsupported_input_error() {
    let failure = toy()
        .run(Input::Bytes(vec![1, 2, 3]), &Limits::default())
        .unwrap_err();
    match failure.error {
        Error::Model { code, message } => {
            assert_eq!(code, wasm_infer::ModelErrorCode::UnsupportedInput);
            assert_eq!(message, "toy takes text or a batch of texts");
        }
        other => panic!("expected a model error, got {other}"),
    }
}

#[test]
fn the_toys_fuel_is_a_limit_like_any_models() {
    let needed = toy()
        .run(text("Hello World from WASM"), &Limits::default())
        .unwrap()
        .usage
        .fuel_consumed;
    let capped = Limits {
        fuel: Some(needed - 1),
        ..Limits::default()
    };
    match limit(toy().run(text("Hello World from WASM"), &capped)) {
        wasm_infer::LimitExceeded::Fuel { limit, .. } => assert_eq!(limit, needed - 1),
        other => panic!("expected the fuel limit, got {other}"),
    }
}

#[test]
fn inspect_accepts_the_toy_and_the_cli_runs_it() {
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
            .env("WASM_INFER_CACHE_DIR", cache_dir())
            .args(args)
            .output()
            .unwrap()
    };
    let toy = toy_wasm().display().to_string();
    let inspect = cli(&["inspect", "--json", &toy]);
    assert!(inspect.status.success(), "{inspect:?}");
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["world"], "wasm-infer:model/model@0.1.0");
    assert_eq!(info["info"]["name"], "toy");
    assert_eq!(info["info"]["output_dimension"], 4);

    let run = cli(&["--fuel", "10M", &toy, "Hello World from WASM"]);
    assert!(run.status.success(), "{run:?}");
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(out["model"], "toy");
    assert_eq!(
        out["embeddings"],
        serde_json::json!([[21.0, 4.0, 6.0, 19.5]])
    );
}
