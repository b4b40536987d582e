//! `wasm-infer check` and `wasm_infer::testing`: a cases file is blessed with the library's
//! exact figures, passes as blessed, fails with a readable diff when a figure, an input or the
//! engine fingerprint changed, and `--bless` rewrites exactly the figures that moved. A bad
//! file is refused naming it and what is wrong, and is never overwritten.

mod support;

use std::path::Path;
use std::process::Output;

use sha2::{Digest, Sha256};
use wasm_infer::testing::{assert_cases, check_cases, CasesFile, CheckError};
use wasm_infer::{Input, Limits};

use support::{case, cosine, embedding_bits, minilm, minilm_wasm, scratch, stderr, wasm_infer};

fn check(cases: &Path, bless: bool) -> Output {
    let minilm = minilm_wasm().display().to_string();
    let cases = cases.display().to_string();
    let mut args = vec!["check", &minilm, &cases];
    if bless {
        args.push("--bless");
    }
    wasm_infer(&args)
}

/// The lines of `after` that differ from `before`'s, by position (same line count).
fn changed_lines(before: &str, after: &str) -> Vec<String> {
    let (before, after): (Vec<_>, Vec<_>) = (before.lines().collect(), after.lines().collect());
    assert_eq!(before.len(), after.len(), "{after:?}");
    before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(_, a)| a.trim().to_string())
        .collect()
}

const FIRST: &str = "the quick brown fox";
const SECOND: &str = "sandboxed inference with exact fuel";

#[test]
fn a_blessed_file_passes_and_every_change_is_a_diff_that_bless_rewrites_exactly() {
    let dir = scratch("cycle");
    let cases = dir.join("usage.json");
    let fresh = format!(
        "{{\"cases\": [{{\"input\": \"{FIRST}\"}}, {{\"name\": \"second\", \"input\": \"{SECOND}\"}}]}}"
    );
    std::fs::write(&cases, &fresh).unwrap();

    // Never blessed: a check fails and writes nothing.
    let unblessed = check(&cases, false);
    assert_eq!(unblessed.status.code(), Some(20), "{}", stderr(&unblessed));
    assert!(
        stderr(&unblessed).starts_with(&format!(
            "{}: not yet blessed (no component_sha256 and engine)\n",
            cases.display()
        )),
        "{}",
        stderr(&unblessed)
    );
    assert!(stderr(&unblessed).contains(&format!(
        "case 1 (\"{FIRST}\"): fuel expected (not blessed), got "
    )));
    assert_eq!(std::fs::read_to_string(&cases).unwrap(), fresh);

    // Blessed: the library's own figures, and the output's digest computed here.
    let blessed = check(&cases, true);
    assert_eq!(blessed.status.code(), Some(0), "{}", stderr(&blessed));
    assert!(stderr(&blessed).contains("6 figure(s) rewritten"));
    let text = std::fs::read_to_string(&cases).unwrap();
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (i, input) in [FIRST, SECOND].iter().enumerate() {
        let outcome = minilm()
            .run(Input::Text(input.to_string()), &Limits::default())
            .unwrap();
        let case = &file["cases"][i];
        assert_eq!(case["fuel"], outcome.usage.fuel_consumed);
        assert_eq!(case["peak_memory_bytes"], outcome.usage.peak_memory_bytes);
        let digest = format!(
            "{:x}",
            Sha256::digest(serde_json::to_vec(&outcome.output).unwrap())
        );
        assert_eq!(case["output_sha256"], digest.as_str());
    }
    assert_eq!(file["schema_version"], 1);
    assert_eq!(
        file["component_sha256"],
        minilm().load_report().component_sha256.as_str()
    );
    assert_eq!(file["cases"][1]["name"], "second");

    // As blessed: passes, through the CLI and the library alike.
    let passed = check(&cases, false);
    assert_eq!(passed.status.code(), Some(0), "{}", stderr(&passed));
    assert!(stderr(&passed).contains("2 case(s) as blessed"));
    assert_cases(minilm(), &cases, &Limits::default());

    // A changed figure: a diff naming case, figure, expected and got; bless restores it.
    let fuel = file["cases"][0]["fuel"].as_u64().unwrap();
    let edited = text.replacen(
        &format!("\"fuel\": {fuel}"),
        &format!("\"fuel\": {}", fuel + 1),
        1,
    );
    assert_ne!(edited, text);
    std::fs::write(&cases, &edited).unwrap();
    let moved = check(&cases, false);
    assert_eq!(moved.status.code(), Some(20));
    assert_eq!(
        stderr(&moved).lines().next().unwrap(),
        format!(
            "case 1 (\"{FIRST}\"): fuel expected {}, got {fuel} (-1, {:+.3}%)",
            fuel + 1,
            -100.0 / (fuel + 1) as f64
        )
    );
    assert!(stderr(&moved).contains("1 figure(s) moved"));
    assert_eq!(std::fs::read_to_string(&cases).unwrap(), edited);
    assert_eq!(check(&cases, true).status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&cases).unwrap(), text);

    // A changed input: its fuel and output move (MiniLM's peak memory is its snapshot's, the
    // same for both), and bless rewrites exactly those two lines.
    let longer = format!("{SECOND} and a few more words");
    let edited = text.replacen(SECOND, &longer, 1);
    std::fs::write(&cases, &edited).unwrap();
    let moved = check(&cases, false);
    assert_eq!(moved.status.code(), Some(20));
    let report = stderr(&moved);
    for figure in ["fuel", "output_sha256"] {
        assert!(
            report.contains(&format!("case 2 (second): {figure} expected ")),
            "{report}"
        );
    }
    assert!(!report.contains("peak_memory_bytes"), "{report}");
    assert!(report.contains("2 figure(s) moved"), "{report}");
    assert_eq!(check(&cases, true).status.code(), Some(0));
    let reblessed = std::fs::read_to_string(&cases).unwrap();
    let outcome = minilm()
        .run(Input::Text(longer), &Limits::default())
        .unwrap();
    let digest = format!(
        "{:x}",
        Sha256::digest(serde_json::to_vec(&outcome.output).unwrap())
    );
    assert_eq!(
        changed_lines(&edited, &reblessed),
        [
            format!("\"fuel\": {},", outcome.usage.fuel_consumed),
            format!("\"output_sha256\": \"{digest}\""),
        ]
    );

    // A changed engine fingerprint: named first, non-zero, and the figures did not move.
    let on = reblessed.replacen(
        "\"nan_canonicalization\": false",
        "\"nan_canonicalization\": true",
        1,
    );
    assert_ne!(on, reblessed);
    std::fs::write(&cases, &on).unwrap();
    let moved = check(&cases, false);
    assert_eq!(moved.status.code(), Some(20));
    assert_eq!(
        stderr(&moved).lines().next().unwrap(),
        format!(
            "{}: blessed on another build: engine nan-canonicalization=on (this runtime: \
             nan-canonicalization=off)",
            cases.display()
        )
    );
    assert!(stderr(&moved).contains("0 figure(s) moved"));
    assert_eq!(check(&cases, true).status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&cases).unwrap(), reblessed);
}

#[test]
fn a_bad_cases_file_is_refused_naming_it_and_is_never_overwritten() {
    let dir = scratch("bad");
    let files = [
        (
            "malformed.json",
            "{\"cases\": [".to_string(),
            "malformed JSON",
        ),
        (
            "version.json",
            "{\"schema_version\": 7, \"cases\": []}".to_string(),
            "cases file of schema_version 7, this build reads 1",
        ),
        (
            "unknown.json",
            "{\"cases\": [{\"input\": \"x\", \"fule\": 3}]}".to_string(),
            "not a cases file: unknown field `fule`",
        ),
        (
            "two-ways.json",
            "{\"cases\": [{\"input\": \"x\", \"output_sha256\": \"ab\", \"min_cosine\": 0.9}]}"
                .to_string(),
            "case 1 (\"x\"): has both output_sha256 and min_cosine (its output is compared one \
             way: drop one)",
        ),
        (
            "bound.json",
            "{\"cases\": [{\"input\": \"x\", \"min_cosine\": 1.5}]}".to_string(),
            "case 1 (\"x\"): min_cosine 1.5 is not in [-1, 1]",
        ),
        (
            "vectors.json",
            "{\"cases\": [{\"input\": \"x\", \"output_vectors\": [[1.0]]}]}".to_string(),
            "case 1 (\"x\"): has output_vectors without a min_cosine bound",
        ),
    ];
    for (name, contents, needle) in files {
        let file = dir.join(name);
        std::fs::write(&file, &contents).unwrap();
        for bless in [false, true] {
            let output = check(&file, bless);
            assert_eq!(output.status.code(), Some(2), "{name}: {}", stderr(&output));
            let message = stderr(&output);
            assert!(
                message.contains(&format!("error: {}: ", file.display())),
                "{message}"
            );
            assert!(message.contains(needle), "{name}: {message}");
            assert_eq!(std::fs::read_to_string(&file).unwrap(), contents);
        }
    }
    // Another component's file: named first, non-zero, untouched without --bless.
    let other = dir.join("other.json");
    let engine = serde_json::to_value(minilm().runtime().fingerprint()).unwrap();
    let contents = serde_json::to_string_pretty(&serde_json::json!({
        "schema_version": 1,
        "component_sha256": "cd".repeat(32),
        "engine": engine,
        "cases": [],
    }))
    .unwrap();
    std::fs::write(&other, &contents).unwrap();
    let output = check(&other, false);
    assert_eq!(output.status.code(), Some(20));
    assert!(stderr(&output).starts_with(&format!(
        "{}: blessed on another build: component sha256 {} (this model: {})",
        other.display(),
        "cd".repeat(32),
        minilm().load_report().component_sha256
    )));
    assert_eq!(std::fs::read_to_string(&other).unwrap(), contents);
    // The library says the same, as a typed error for a file it cannot read.
    let error = check_cases(
        minilm(),
        dir.join("malformed.json"),
        &Limits::default(),
        true,
    )
    .unwrap_err();
    assert!(matches!(error, CheckError::File(ref e) if e.problem.contains("malformed JSON")));
}

/// Writes a cases file in the canonical form a bless writes.
fn write_canonical(path: &Path, file: &CasesFile) {
    let mut bytes = serde_json::to_vec_pretty(file).unwrap();
    bytes.push(b'\n');
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_cosine_bound_compares_vectors_names_the_worst_cosine_and_bless_rewrites_only_them() {
    let dir = scratch("cosine");
    let cases = dir.join("usage.json");
    let (plain, cyrillic) = (case("plain"), case("cyrillic"));
    let fresh = serde_json::json!({"cases": [
        {"name": "plain", "input": plain.text, "min_cosine": 0.9999},
        {"name": "cyrillic", "input": cyrillic.text, "min_cosine": 0.9999},
    ]});
    std::fs::write(&cases, fresh.to_string()).unwrap();

    // Blessed: fuel, peak memory and the vectors themselves (no digest), bit for bit the
    // library's.
    let blessed = check(&cases, true);
    assert_eq!(blessed.status.code(), Some(0), "{}", stderr(&blessed));
    assert!(
        stderr(&blessed).contains("6 figure(s) rewritten"),
        "{}",
        stderr(&blessed)
    );
    let file: CasesFile = serde_json::from_slice(&std::fs::read(&cases).unwrap()).unwrap();
    let mut outputs = Vec::new();
    for (i, text) in [&plain.text, &cyrillic.text].into_iter().enumerate() {
        let outcome = minilm()
            .run(Input::Text(text.clone()), &Limits::default())
            .unwrap();
        let recorded = file.cases[i].output_vectors.as_deref().unwrap();
        let vectors = outcome.output.embeddings().unwrap();
        assert_eq!(embedding_bits(recorded), embedding_bits(vectors));
        assert_eq!(file.cases[i].output_sha256, None);
        assert_eq!(file.cases[i].fuel, Some(outcome.usage.fuel_consumed));
        outputs.push(vectors[0].clone());
    }

    // As blessed: the vectors are the output's own, cosine exactly 1.
    let passed = check(&cases, false);
    assert_eq!(passed.status.code(), Some(0), "{}", stderr(&passed));
    assert!(stderr(&passed).contains("worst cosine against the recorded vectors: 1\n"));

    // Case 1 recorded as sentence-transformers' embedding (tests/fixtures/reference.json): its
    // cosine with the sandbox's, computed here, is the worst; within 0.9999 it passes.
    let mut edited = file.clone();
    edited.cases[0].output_vectors = Some(vec![plain.embedding.clone()]);
    let against_reference = cosine(&plain.embedding, &outputs[0]);
    assert!((0.9999..1.0).contains(&against_reference));
    write_canonical(&cases, &edited);
    let passed = check(&cases, false);
    assert_eq!(passed.status.code(), Some(0), "{}", stderr(&passed));
    assert!(
        stderr(&passed).contains(&format!(
            "worst cosine against the recorded vectors: {against_reference}\n"
        )),
        "{}",
        stderr(&passed)
    );

    // A bound above that cosine: a diff naming the case, the bound and the worst cosine;
    // nothing written.
    let bound = against_reference + (1.0 - against_reference) / 2.0;
    edited.cases[0].min_cosine = Some(bound);
    write_canonical(&cases, &edited);
    let before = std::fs::read_to_string(&cases).unwrap();
    let failed = check(&cases, false);
    assert_eq!(failed.status.code(), Some(20), "{}", stderr(&failed));
    assert!(
        stderr(&failed).contains(&format!(
            "case 1 (plain): output_vectors expected cosine >= {bound}, got worst cosine \
             {against_reference} (vector 1)\n"
        )),
        "{}",
        stderr(&failed)
    );
    assert!(stderr(&failed).contains("1 figure(s) moved"));
    assert_eq!(std::fs::read_to_string(&cases).unwrap(), before);

    // Bless rewrites exactly those vectors (the bound stays): the file is the edited one with
    // case 1's vectors the output's again.
    let reblessed = check(&cases, true);
    assert_eq!(reblessed.status.code(), Some(0), "{}", stderr(&reblessed));
    assert!(stderr(&reblessed).contains("1 figure(s) rewritten"));
    let mut expected = edited.clone();
    expected.cases[0].output_vectors = Some(vec![outputs[0].clone()]);
    let mut expected_bytes = serde_json::to_vec_pretty(&expected).unwrap();
    expected_bytes.push(b'\n');
    assert_eq!(std::fs::read(&cases).unwrap(), expected_bytes);
    let changed = changed_lines(&before, &String::from_utf8(expected_bytes).unwrap());
    let differing = plain
        .embedding
        .iter()
        .zip(&outputs[0])
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(changed.len(), differing, "only case 1's vector components");
    let passed = check(&cases, false);
    assert_eq!(passed.status.code(), Some(0), "{}", stderr(&passed));
}
