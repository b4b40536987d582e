//! The native model against the independent sentence-transformers reference, and the
//! [`Linears`] seam: the forward calls it for every linear layer and for nothing else.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Tensor;
use minilm::{Embedder, InSandbox, Linear, LinearId, Linears, Packed, DIMENSION};
use serde::Deserialize;

/// The accuracy asked of the model against the reference.
const MIN_COSINE_VS_REFERENCE: f64 = 0.9999;
/// Two computations of the same linear layers differ by float rounding only.
const MIN_COSINE_BETWEEN_LINEARS: f64 = 0.99999;
/// all-MiniLM-L6-v2: six encoder layers.
const LAYERS: usize = 6;
/// Query, key, value and attention output go through `Linears::linear`.
const LINEARS_PER_LAYER: usize = 4;
/// Intermediate and output go through `Linears::feed_forward`, in one call.
const FEED_FORWARD_LINEARS: usize = 2;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/reference.json"
        );
        let json = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_slice(&json).expect("reference.json")
    })
}

fn embedder() -> &'static Embedder {
    static EMBEDDER: OnceLock<Embedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        let dir = std::env::var_os("WASM_INFER_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/wasm-infer/model")
            });
        Embedder::load_dir(&dir)
            .unwrap_or_else(|e| panic!("{e} (run scripts/setup.sh or set WASM_INFER_MODEL_DIR)"))
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Checks the vector `vector_of` gives for every reference case against the reference
/// embedding (cosine at least [`MIN_COSINE_VS_REFERENCE`]) and prints the worst case, named by
/// `label`. `vector_of` makes its own checks of the case beside.
fn check_against_reference(label: &str, vector_of: impl Fn(&Case) -> Vec<f32>) {
    let mut worst = (f64::INFINITY, "");
    for case in &reference().cases {
        let vector = vector_of(case);
        let similarity = cosine(&vector, &case.embedding);
        assert!(
            similarity >= MIN_COSINE_VS_REFERENCE,
            "{}: cosine {similarity}",
            case.name
        );
        if similarity < worst.0 {
            worst = (similarity, &case.name);
        }
    }
    println!(
        "{label}: minimum cosine vs reference: {} ({})",
        worst.0, worst.1
    );
}

#[test]
fn embeddings_match_the_reference() {
    check_against_reference("embed", |case| {
        let ids = embedder().token_ids(&case.text).unwrap();
        assert_eq!(ids, case.token_ids, "{}: token ids", case.name);
        let vector = embedder().embed(&case.text).unwrap();
        assert_eq!(vector.len(), DIMENSION, "{}", case.name);
        vector
    });
}

#[test]
fn packed_kernels_match_the_reference_and_candle() {
    // The sandbox's kernels (natively their portable micro-kernel, the same packing, blocking,
    // summation order and FMA rounding) on every reference text.
    check_against_reference("packed kernels", |case| {
        let packed = embedder().forward(&case.token_ids, &mut Packed).unwrap();
        let candle = embedder().embed(&case.text).unwrap();
        let between = cosine(&packed, &candle);
        assert!(
            between >= MIN_COSINE_BETWEEN_LINEARS,
            "{}: cosine {between} between the packed kernels and candle",
            case.name
        );
        packed
    });
}

/// Linear layers computed another way (an elementwise product summed, and GELU from its erf
/// definition), counting the calls and the layers seen.
#[derive(Default)]
struct Counting {
    linear_calls: usize,
    feed_forward_calls: usize,
    layers: HashSet<LinearId>,
}

impl Counting {
    fn apply(&mut self, layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        self.layers.insert(layer.id());
        // [tokens, 1, in] * [1, out, in] summed over in.
        x.unsqueeze(1)?
            .broadcast_mul(&layer.weight().unsqueeze(0)?)?
            .sum(2)?
            .broadcast_add(layer.bias())
    }
}

impl Linears for Counting {
    type Error = candle_core::Error;

    fn linear(&mut self, layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_calls += 1;
        self.apply(layer, x)
    }

    fn feed_forward(
        &mut self,
        intermediate: &Linear,
        output: &Linear,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.feed_forward_calls += 1;
        let inner = self.apply(intermediate, x)?;
        let gelu = ((&inner * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?
            .mul(&inner)?
            .affine(0.5, 0.0)?;
        self.apply(output, &gelu)
    }
}

#[test]
fn linears_run_every_linear_layer_and_only_those() {
    // Short texts: the elementwise linear holds a [tokens, out, in] product.
    for name in ["plain", "empty", "short_bench"] {
        let case = reference()
            .cases
            .iter()
            .find(|c| c.name == name)
            .expect("case");
        let ids = embedder().token_ids(&case.text).unwrap();
        let mut counting = Counting::default();
        let counted = embedder().forward(&ids, &mut counting).unwrap();
        assert_eq!(counting.linear_calls, LAYERS * LINEARS_PER_LAYER, "{name}");
        assert_eq!(counting.feed_forward_calls, LAYERS, "{name}");
        assert_eq!(
            counting.layers.len(),
            LAYERS * (LINEARS_PER_LAYER + FEED_FORWARD_LINEARS),
            "{name}: every linear layer has its own id"
        );
        let in_sandbox = embedder().forward(&ids, &mut InSandbox).unwrap();
        assert_eq!(in_sandbox, embedder().embed(&case.text).unwrap(), "{name}");
        let similarity = cosine(&counted, &in_sandbox);
        assert!(
            similarity >= MIN_COSINE_BETWEEN_LINEARS,
            "{name}: cosine {similarity} between the two Linears"
        );
        assert!(
            cosine(&counted, &case.embedding) >= MIN_COSINE_VS_REFERENCE,
            "{name}"
        );
    }
}
