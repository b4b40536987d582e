//! The wasm-infer `model` world for all-MiniLM-L6-v2.
//!
//! The weights, config and tokenizer are embedded in the component at build time (see
//! `build.rs`) rather than read from a preopened directory: the guest then needs no filesystem
//! at all (no authority to grant, no path convention for the CLI), the component is one
//! self-contained artifact, and a later pre-initialisation snapshot can build the model without
//! calling a single import. The host calls `wizer-initialize` once and snapshots the result, so
//! every run starts with the model built; without a snapshot, `infer` builds it on first use,
//! and `info` stays cheap either way.

use std::sync::OnceLock;

use crate::{Embedder, DIMENSION, MAX_TOKENS, NAME};

wit_bindgen::generate!({
    world: "preinit-model",
    path: "../../wit",
});

use wasm_infer::model::types::{DataKind, ErrorCode};

static WEIGHTS: &[u8] = include_bytes!(env!("MINILM_WEIGHTS"));
static CONFIG: &[u8] = include_bytes!(env!("MINILM_CONFIG"));
static TOKENIZER: &[u8] = include_bytes!(env!("MINILM_TOKENIZER"));

static EMBEDDER: OnceLock<Result<Embedder, String>> = OnceLock::new();

fn embedder() -> Result<&'static Embedder, ModelError> {
    EMBEDDER
        .get_or_init(|| Embedder::load(WEIGHTS, CONFIG, TOKENIZER))
        .as_ref()
        .map_err(|message| ModelError {
            code: ErrorCode::Internal,
            message: message.clone(),
        })
}

fn internal(message: String) -> ModelError {
    ModelError {
        code: ErrorCode::Internal,
        message,
    }
}

struct MiniLm;

impl Guest for MiniLm {
    fn wizer_initialize() {
        // Errors are kept in the OnceLock and reported by the first `infer`.
        let _ = embedder();
    }

    fn info() -> ModelInfo {
        ModelInfo {
            name: NAME.to_string(),
            version: "sentence-transformers/all-MiniLM-L6-v2".to_string(),
            description:
                "English sentence embeddings (BERT, 6 layers), mean-pooled and L2-normalised"
                    .to_string(),
            inputs: vec![DataKind::Text, DataKind::Texts],
            output: DataKind::Embeddings,
            output_dimension: DIMENSION as u32,
            max_input_tokens: MAX_TOKENS as u32,
        }
    }

    fn infer(input: Input) -> Result<Output, ModelError> {
        let texts = match input {
            Input::Text(text) => vec![text],
            Input::Texts(texts) => texts,
            Input::Bytes(_) | Input::Tensor(_) => {
                return Err(ModelError {
                    code: ErrorCode::UnsupportedInput,
                    message: format!("{NAME} takes text or a batch of texts"),
                })
            }
        };
        let embedder = embedder()?;
        // One text at a time: no padding, so each embedding is exactly what the model computes
        // for that text alone (and what the reference computes with batch_size=1).
        let vectors = texts
            .iter()
            .map(|text| embedder.embed(text).map_err(internal))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Output::Embeddings(vectors))
    }
}

export!(MiniLm);
