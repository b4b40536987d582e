//! Correctness and determinism of the real model in the sandbox: embeddings against an
//! independent engine (sentence-transformers/PyTorch) and against the same candle code run
//! natively; exact, repeatable fuel figures.

mod support;

use std::sync::OnceLock;

use support::{assert_golden, case, cosine, embed_case, minilm, model_dir, reference};
use wasm_infer::{Input, Limits, Outcome, Output};

/// The accuracy the issue asks for against the independent reference.
const MIN_COSINE_VS_REFERENCE: f64 = 0.9999;

fn texts() -> Vec<String> {
    reference().cases.iter().map(|c| c.text.clone()).collect()
}

fn embeddings(outcome: &Outcome) -> &[Vec<f32>] {
    outcome.output.embeddings().expect("an embeddings output")
}

/// One sandboxed run over every reference text as a batch, shared by the tests below.
fn batch_run() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| {
        minilm()
            .run(Input::Texts(texts()), &Limits::default())
            .expect("batch run")
    })
}

fn native() -> &'static minilm::Embedder {
    static NATIVE: OnceLock<minilm::Embedder> = OnceLock::new();
    NATIVE
        .get_or_init(|| minilm::Embedder::load_dir(&model_dir()).expect("loading the native model"))
}

#[test]
fn sandboxed_embeddings_match_the_independent_reference() {
    let reference = reference();
    assert_eq!(reference.dimension, 384);
    assert!(reference.cases.len() >= 10);
    let outcome = batch_run();
    let vectors = embeddings(outcome);
    assert_eq!(vectors.len(), reference.cases.len());
    for (case, vector) in reference.cases.iter().zip(vectors) {
        assert_eq!(vector.len(), 384, "{}", case.name);
        let similarity = cosine(vector, &case.embedding);
        assert!(
            similarity >= MIN_COSINE_VS_REFERENCE,
            "{}: cosine {similarity} against {}",
            case.name,
            reference.generator
        );
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{}: norm {norm}", case.name);
    }
}

#[test]
fn in_sandbox_tokenizer_matches_the_reference_tokenizer() {
    // The guest runs this very code; the long case proves truncation at 256 tokens and the
    // empty case that [CLS] [SEP] alone is embedded.
    for case in &reference().cases {
        assert_eq!(
            native().token_ids(&case.text).unwrap(),
            case.token_ids,
            "{}",
            case.name
        );
    }
    assert_eq!(case("long_truncated").token_ids.len(), 256);
    assert_eq!(case("empty").token_ids, vec![101, 102]);
}

#[test]
fn sandboxed_embeddings_match_native_candle() {
    let vectors = embeddings(batch_run());
    for (case, vector) in reference().cases.iter().zip(vectors) {
        let native = native().embed(&case.text).unwrap();
        let similarity = cosine(vector, &native);
        let max_diff = vector
            .iter()
            .zip(&native)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Same code, different float summation order (wasm simd128 vs native SIMD).
        assert!(similarity >= 0.99999, "{}: cosine {similarity}", case.name);
        assert!(max_diff < 1e-4, "{}: max |diff| {max_diff}", case.name);
    }
}

#[test]
fn single_text_and_batch_give_the_same_vector() {
    let case = case("accents");
    let single = minilm()
        .run(Input::Text(case.text.clone()), &Limits::default())
        .unwrap();
    let index = reference()
        .cases
        .iter()
        .position(|c| c.name == "accents")
        .unwrap();
    assert_eq!(embeddings(&single)[0], embeddings(batch_run())[index]);
}

#[test]
fn fuel_and_output_are_identical_on_every_run() {
    let input = Input::Text(case("short_bench").text);
    let runs: Vec<Outcome> = (0..3)
        .map(|_| minilm().run(input.clone(), &Limits::default()).unwrap())
        .collect();
    let fuel = runs[0].usage.fuel_consumed;
    for run in &runs {
        assert_eq!(run.usage.fuel_consumed, fuel);
        assert_eq!(run.usage.peak_memory_bytes, runs[0].usage.peak_memory_bytes);
        let bits =
            |o: &Outcome| -> Vec<u32> { embeddings(o)[0].iter().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(run), bits(&runs[0]));
    }
    assert_golden("minilm_short_bench", fuel);
    assert_golden(
        "minilm_short_bench_peak_memory",
        runs[0].usage.peak_memory_bytes,
    );
    assert_golden("minilm_reference_batch", batch_run().usage.fuel_consumed);
}

#[test]
fn concurrent_runs_do_not_change_each_others_fuel() {
    let names = ["plain", "cjk_japanese", "emoji", "long_bench"];
    let sequential: Vec<u64> = names
        .iter()
        .map(|n| embed_case(n).usage.fuel_consumed)
        .collect();
    let parallel: Vec<(u64, Output)> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                scope.spawn(move || {
                    let outcome = embed_case(n);
                    (outcome.usage.fuel_consumed, outcome.output)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((name, seq), (par, output)) in names.iter().zip(&sequential).zip(&parallel) {
        assert_eq!(seq, par, "{name}");
        let vector = &output.embeddings().unwrap()[0];
        assert!(cosine(vector, &case(name).embedding) >= MIN_COSINE_VS_REFERENCE);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_runs_share_an_executor_and_agree_with_blocking_runs() {
    let model = minilm().clone();
    let tasks: Vec<_> = ["plain", "symbols", "cyrillic"]
        .into_iter()
        .map(|name| {
            let model = model.clone();
            tokio::spawn(async move {
                let outcome = model
                    .run_async(Input::Text(case(name).text), &Limits::default())
                    .await
                    .unwrap();
                (name, outcome)
            })
        })
        .collect();
    for task in tasks {
        let (name, outcome) = task.await.unwrap();
        let blocking = tokio::task::spawn_blocking(move || embed_case(name))
            .await
            .unwrap();
        assert_eq!(
            outcome.usage.fuel_consumed, blocking.usage.fuel_consumed,
            "{name}"
        );
        assert_eq!(outcome.output, blocking.output, "{name}");
    }
}

#[test]
fn info_describes_the_model() {
    let info = minilm().info();
    assert_eq!(info.name, "all-MiniLM-L6-v2");
    assert_eq!(info.output_dimension, 384);
    assert_eq!(info.max_input_tokens, 256);
    assert_eq!(
        info.inputs,
        vec![wasm_infer::DataKind::Text, wasm_infer::DataKind::Texts]
    );
}

#[test]
fn unsupported_input_kind_is_a_model_error() {
    let failure = minilm()
        .run(Input::Bytes(vec![1, 2, 3]), &Limits::default())
        .unwrap_err();
    assert!(
        matches!(
            failure.error,
            wasm_infer::Error::Model {
                code: wasm_infer::ModelErrorCode::UnsupportedInput,
                ..
            }
        ),
        "{failure}"
    );
}
