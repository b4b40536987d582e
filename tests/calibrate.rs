//! Calibration and admission by prediction: the fitted bounds cover the calibration set and
//! nearly cover a held-out one, a predicted overrun is refused before any guest work with the
//! predicted limit's kind and exit status, the real caps still stop a mispredicted run, and a
//! profile of another component, engine or format is refused naming what differs.

mod support;

use std::path::Path;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use wasm_infer::profile::{self, Profile, Sample};
use wasm_infer::{Error, ErrorKind, Input, LimitExceeded, Limits, PredictedLimit};

use support::{minilm, minilm_wasm, runtime, scratch, stderr, wasm_infer};

/// Deterministic texts varied in length: 0 to 60 words of everyday English (so tokens grow
/// with bytes at a steady rate), from a 64-bit LCG. Bytes are the only figure known before a
/// run, so the bound is as good as bytes predict tokens: a set of rare and made-up words
/// (several tokens to a short word) spreads fuel at a given size far wider.
fn texts(seed: u64, count: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "a",
        "model",
        "runs",
        "in",
        "sandbox",
        "with",
        "fuel",
        "and",
        "memory",
        "limits",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "of",
        "to",
        "is",
        "that",
        "for",
        "it",
        "on",
        "was",
        "people",
        "time",
        "year",
        "said",
        "small",
        "large",
        "under",
        "every",
        "request",
        "machine",
        "learning",
        "inference",
        "sentence",
        "embedding",
        "vector",
        "text",
        "number",
        "world",
        "house",
        "water",
        "light",
        "music",
        "city",
        "river",
    ];
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..count)
        .map(|_| {
            let words = next() % 61;
            (0..words)
                .map(|_| WORDS[next() % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// 50 calibration texts and their figures, and the profile fitted on them (once per binary).
fn calibration() -> &'static (Vec<Sample>, Profile) {
    static CALIBRATION: OnceLock<(Vec<Sample>, Profile)> = OnceLock::new();
    CALIBRATION.get_or_init(|| {
        let model = minilm();
        let samples = model
            .measure(&texts(1, 50), &Limits::default(), |_| {})
            .unwrap_or_else(|(i, e)| panic!("calibration input {i}: {e}"));
        let profile = Profile::fit(
            &model.load_report().component_sha256,
            model.runtime().fingerprint(),
            &model.info().name,
            &samples,
            10,
        );
        (samples, profile)
    })
}

#[test]
fn the_bound_never_under_predicts_its_calibration_set_and_a_held_out_set_by_at_most_2_percent() {
    let (samples, profile) = calibration();
    // The set is varied: sizes from empty to hundreds of bytes.
    let sizes: Vec<u64> = samples.iter().map(|s| s.input_bytes).collect();
    assert_eq!(*sizes.iter().min().unwrap(), 0);
    assert!(*sizes.iter().max().unwrap() > 300, "{sizes:?}");
    for s in samples {
        assert!(profile.fuel.predict(s.input_bytes) >= s.fuel, "{s:?}");
        assert!(
            profile.peak_memory.predict(s.input_bytes) >= s.peak_memory_bytes,
            "{s:?}"
        );
    }
    // Held out: 50 more texts from another seed, measured and compared with the bound.
    let held_out = minilm()
        .measure(&texts(2, 50), &Limits::default(), |_| {})
        .unwrap_or_else(|(i, e)| panic!("held-out input {i}: {e}"));
    let worst = |figure: fn(&Sample) -> u64, bound: &profile::Bound| {
        held_out
            .iter()
            .map(|s| {
                let actual = figure(s) as f64;
                (actual - bound.predict(s.input_bytes) as f64) / actual
            })
            .fold(0f64, f64::max)
    };
    let fuel = worst(|s| s.fuel, &profile.fuel);
    let memory = worst(|s| s.peak_memory_bytes, &profile.peak_memory);
    eprintln!(
        "held-out worst under-prediction: fuel {:.3}%, peak memory {:.3}%; bounds: fuel {}, \
         memory {}",
        fuel * 100.0,
        memory * 100.0,
        profile.fuel,
        profile.peak_memory
    );
    assert!(fuel <= 0.02, "fuel under-predicted by {:.3}%", fuel * 100.0);
    assert!(
        memory <= 0.02,
        "memory under-predicted by {:.3}%",
        memory * 100.0
    );
}

#[test]
fn a_predicted_fuel_overrun_is_refused_before_any_guest_work_as_a_fuel_trip() {
    let (_, profile) = calibration();
    let model = minilm().with_profile(profile.clone()).unwrap();
    let text = texts(3, 1).pop().unwrap_or_default() + " and some more words";
    let predicted = profile.predict(&Input::Text(text.clone())).0;
    let failure = model
        .run(
            Input::Text(text.clone()),
            &Limits::default().fuel(predicted - 1),
        )
        .unwrap_err();
    assert_eq!(failure.kind(), ErrorKind::Fuel);
    assert_eq!(
        failure.error.limit(),
        Some(&LimitExceeded::Predicted {
            limit: predicted - 1,
            predicted,
            resource: PredictedLimit::Fuel,
        })
    );
    assert_eq!(failure.usage.fuel_consumed, 0);
    assert_eq!(failure.usage.peak_memory_bytes, 0);
    assert_eq!(failure.usage.input_bytes, text.len() as u64);
    // At the prediction it runs, and uses no more than predicted.
    let outcome = model
        .run(Input::Text(text), &Limits::default().fuel(predicted))
        .unwrap();
    assert!(outcome.usage.fuel_consumed <= predicted);
    assert!(outcome.usage.fuel_consumed > 0);
}

#[test]
fn a_predicted_memory_overrun_is_refused_as_a_memory_trip() {
    let (_, profile) = calibration();
    let model = minilm().with_profile(profile.clone()).unwrap();
    let input = Input::Text("a sentence".into());
    let predicted = profile.predict(&input).1;
    let failure = model
        .run(input, &Limits::default().memory(predicted - 1))
        .unwrap_err();
    assert_eq!(failure.kind(), ErrorKind::Memory);
    assert!(matches!(
        failure.error.limit(),
        Some(LimitExceeded::Predicted {
            resource: PredictedLimit::Memory,
            predicted: p,
            ..
        }) if *p == predicted
    ));
    assert_eq!(failure.usage.fuel_consumed, 0);
}

#[test]
fn a_profile_that_under_predicts_still_leaves_the_real_cap_to_stop_the_run() {
    let (_, profile) = calibration();
    // A deliberately wrong profile: it predicts a tenth of the truth.
    let mut wrong = profile.clone();
    wrong.fuel.intercept /= 10.0;
    wrong.fuel.per_byte /= 10.0;
    wrong.fuel.per_byte_squared /= 10.0;
    let model = minilm().with_profile(wrong.clone()).unwrap();
    let input = Input::Text("the quick brown fox jumps over the lazy dog".into());
    let actual = minilm()
        .run(input.clone(), &Limits::default())
        .unwrap()
        .usage
        .fuel_consumed;
    let cap = actual - 1;
    assert!(
        wrong.predict(&input).0 <= cap,
        "the wrong profile admits it"
    );
    let failure = model.run(input, &Limits::default().fuel(cap)).unwrap_err();
    assert!(
        matches!(
            failure.error.limit(),
            Some(LimitExceeded::Fuel { limit, consumed }) if *limit == cap && *consumed > cap
        ),
        "{:?}",
        failure.error
    );
}

#[test]
fn a_profile_of_another_component_or_engine_is_refused_naming_what_differs() {
    let (_, profile) = calibration();
    let mut other = profile.clone();
    other.component_sha256 = "0".repeat(64);
    let error = minilm().with_profile(other).unwrap_err();
    assert!(matches!(error, Error::Config(_)));
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "component sha256 {} (this model: {})",
            "0".repeat(64),
            profile.component_sha256
        )),
        "{message}"
    );
    let mut engine = profile.clone();
    engine.engine.nan_canonicalization = !engine.engine.nan_canonicalization;
    engine.engine.wasmtime = "1.0.0".into();
    let message = minilm().with_profile(engine).unwrap_err().to_string();
    assert!(
        message.contains("engine wasmtime 1.0.0 (this build: "),
        "{message}"
    );
    assert!(message.contains("nan-canonicalization="), "{message}");
}

// The CLI: `calibrate`, `--profile`, and what a bad profile file gets.

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn the_cli_calibrates_writes_a_profile_and_refuses_a_predicted_overrun_with_exit_10() {
    let dir = scratch("cli");
    let inputs = dir.join("inputs.txt");
    let lines = texts(4, 6);
    std::fs::write(&inputs, lines.join("\n")).unwrap();
    let out = dir.join("profile.json");
    let minilm = path(&minilm_wasm());
    let calibrated = wasm_infer(&[
        "calibrate",
        &minilm,
        &format!("@{}", inputs.display()),
        "--out",
        &path(&out),
    ]);
    let report = String::from_utf8_lossy(&calibrated.stdout).into_owned();
    assert_eq!(calibrated.status.code(), Some(0), "{}", stderr(&calibrated));
    // The figures are the library's, input by input.
    let samples = support::minilm()
        .measure(&lines, &Limits::default(), |_| {})
        .unwrap();
    for (i, s) in samples.iter().enumerate() {
        let row = report
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&(i + 1).to_string()))
            .unwrap_or_else(|| panic!("no row {}: {report}", i + 1));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], s.input_bytes.to_string(), "{row}");
        assert_eq!(cells[2], s.fuel.to_string(), "{row}");
        assert_eq!(cells[4], s.peak_memory_bytes.to_string(), "{row}");
    }
    assert!(report.contains("fuel:        p50 "), "{report}");
    assert!(
        report.contains("worst under-prediction on the set 0.000%"),
        "{report}"
    );
    assert!(report.contains("suggested limits: --fuel "), "{report}");
    let written = Profile::read(&out).unwrap();
    assert_eq!(written.schema_version, profile::PROFILE_SCHEMA_VERSION);
    let digest = format!(
        "{:x}",
        Sha256::digest(std::fs::read(minilm_wasm()).unwrap())
    );
    assert_eq!(written.component_sha256, digest);
    assert_eq!(written.engine, runtime().fingerprint());
    assert_eq!(written.inputs, 6);

    // Predicted over --fuel: exit 10, nothing on stdout, fuel 0 in the report.
    let text = "a sentence long enough to cost some fuel";
    let predicted = written.predict(&Input::Text(text.into())).0;
    let refused = wasm_infer(&[
        "--fuel",
        &(predicted - 1).to_string(),
        "--profile",
        &path(&out),
        "--report",
        "json",
        &minilm,
        text,
    ]);
    assert_eq!(refused.status.code(), Some(10), "{}", stderr(&refused));
    assert!(refused.stdout.is_empty());
    let json: serde_json::Value = serde_json::from_str(stderr(&refused).trim()).unwrap();
    assert_eq!(json["error"]["kind"], "fuel");
    assert_eq!(json["usage"]["fuel_consumed"], 0);
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("predicted fuel of "));
    // At the prediction: it runs.
    let ran = wasm_infer(&[
        "--fuel",
        &predicted.to_string(),
        "--profile",
        &path(&out),
        &minilm,
        text,
    ]);
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
}

#[test]
fn a_bad_profile_file_is_refused_naming_the_file_and_what_is_wrong() {
    let dir = scratch("bad");
    let (_, profile) = calibration();
    let minilm = path(&minilm_wasm());
    let good = serde_json::to_value(profile).unwrap();
    let cases: [(&str, String, &str); 4] = [
        (
            "malformed.json",
            "{\"schema_version\": 1,".into(),
            "malformed JSON",
        ),
        (
            "version.json",
            {
                let mut v = good.clone();
                v["schema_version"] = 2.into();
                v.to_string()
            },
            "calibration profile of schema_version 2, this build reads 1",
        ),
        (
            "other.json",
            {
                let mut v = good.clone();
                v["component_sha256"] = "ab".repeat(32).into();
                v.to_string()
            },
            "measured on another build: component sha256 abab",
        ),
        (
            "shape.json",
            {
                let mut v = good.clone();
                v["fuel"] = "lots".into();
                v.to_string()
            },
            "not a calibration profile: invalid type",
        ),
    ];
    for (name, contents, needle) in cases {
        let file = dir.join(name);
        std::fs::write(&file, &contents).unwrap();
        let output = wasm_infer(&["--profile", &path(&file), &minilm, "hello"]);
        assert_eq!(output.status.code(), Some(2), "{name}: {}", stderr(&output));
        assert!(output.stdout.is_empty());
        let message = stderr(&output);
        assert!(message.contains(&path(&file)), "{name}: {message}");
        assert!(message.contains(needle), "{name}: {message}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), contents);
    }
    // A calibration that fails overwrites no profile.
    let out = dir.join("kept.json");
    std::fs::write(&out, "previous").unwrap();
    let inputs = dir.join("inputs.txt");
    std::fs::write(&inputs, "one\ntwo").unwrap();
    let failed = wasm_infer(&[
        "calibrate",
        &minilm,
        &format!("@{}", inputs.display()),
        "--fuel",
        "1000",
        "--out",
        &path(&out),
    ]);
    assert_eq!(failed.status.code(), Some(10), "{}", stderr(&failed));
    assert!(stderr(&failed).contains("input 1 (line 1) failed: fuel limit"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous");
}

/// A generator's calibration: the profile's token figures are the library's own, prompt by
/// prompt. The first-token bound covers every prompt and touches one (it is the least-squares
/// line raised by the largest under-prediction); the per-token figure is the set's largest.
#[test]
fn a_generator_is_calibrated_to_its_fuel_to_the_first_token_and_per_token() {
    let dir = scratch("generator");
    let prompts = [
        "Hi",
        "Write a haiku about sandboxes",
        "Explain in two sentences why a compute cap matters for a service that runs untrusted models.",
    ];
    let inputs = dir.join("prompts.txt");
    std::fs::write(&inputs, prompts.join("\n")).unwrap();
    let out = dir.join("smollm2.profile.json");
    let smollm2 = path(&support::smollm2_wasm());
    let calibrated = wasm_infer(&[
        "calibrate",
        "--compile-mem",
        "6G",
        &smollm2,
        &format!("@{}", inputs.display()),
        "--max-tokens",
        "3",
        "--out",
        &path(&out),
    ]);
    assert_eq!(calibrated.status.code(), Some(0), "{}", stderr(&calibrated));
    let profile = Profile::read(&out).unwrap();
    let tokens = profile
        .tokens
        .as_ref()
        .expect("a generator's profile has token figures");
    assert_eq!(tokens.max_tokens, 3);

    let model = wasm_infer::Model::load(runtime(), support::smollm2_wasm()).unwrap();
    let mut per_token = Vec::new();
    let mut slack = Vec::new();
    for prompt in prompts {
        let generation = model
            .generate(
                wasm_infer::GenerateRequest::new(prompt, 3),
                &Limits::default(),
            )
            .unwrap();
        let first = generation.token_fuel.to_first_token.unwrap();
        let bound = tokens.to_first_token.predict(prompt.len() as u64);
        assert!(bound >= first, "{prompt:?}: bound {bound} < {first}");
        slack.push(bound - first);
        per_token.push(generation.token_fuel.per_token.unwrap());
        // The whole run is what the profile's fuel bound covers, as for any model.
        assert!(profile.fuel.predict(prompt.len() as u64) >= generation.usage.fuel_consumed);
        assert_eq!(
            tokens.predict(prompt.len() as u64, 3),
            bound + 2 * tokens.per_token
        );
    }
    assert!(slack.iter().min().unwrap() <= &1, "{slack:?}");
    assert_eq!(Some(&tokens.per_token), per_token.iter().max());

    // `--max-tokens` is for generators only.
    let refused = wasm_infer(&[
        "calibrate",
        &path(&minilm_wasm()),
        &format!("@{}", inputs.display()),
        "--max-tokens",
        "3",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--max-tokens is for text generators"));
}
