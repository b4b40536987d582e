//! all-MiniLM-L6-v2 as a wasm-infer model component, on the guest SDK (`wasm-infer-guest`).
//!
//! The weights, config and tokenizer are embedded in the component at build time (see
//! `build.rs`) rather than read from a preopened directory: the guest then needs no filesystem
//! at all (no authority to grant, no path convention for the CLI), the component is one
//! self-contained artifact, and pre-initialisation builds the model without calling a single
//! import. The SDK's export runs [`Model::load`] in `wizer-initialize`, so every run starts
//! from a snapshot with the model built; without a snapshot, the first `infer` builds it, and
//! `info` stays cheap either way.

use wasm_infer_guest::{export_model, Accel, Input, Model, ModelError, ModelInfo, Output};

use crate::{Embedder, DIMENSION, MAX_TOKENS, NAME};

static WEIGHTS: &[u8] = include_bytes!(env!("MINILM_WEIGHTS"));
static CONFIG: &[u8] = include_bytes!(env!("MINILM_CONFIG"));
static TOKENIZER: &[u8] = include_bytes!(env!("MINILM_TOKENIZER"));

impl Model for Embedder {
    fn load() -> Result<Self, ModelError> {
        Embedder::load(WEIGHTS, CONFIG, TOKENIZER).map_err(ModelError::internal)
    }

    fn info() -> ModelInfo {
        ModelInfo {
            version: "sentence-transformers/all-MiniLM-L6-v2".to_string(),
            max_input_tokens: MAX_TOKENS as u32,
            ..ModelInfo::embeddings(
                NAME,
                "English sentence embeddings (BERT, 6 layers), mean-pooled and L2-normalised",
                DIMENSION as u32,
            )
        }
    }

    fn infer(&self, input: Input, accel: &mut Accel) -> Result<Output, ModelError> {
        let texts = input.texts(NAME)?;
        // One text at a time: no padding, so each embedding is exactly what the model computes
        // for that text alone (and what the reference computes with batch_size=1).
        let mut vectors = Vec::with_capacity(texts.len());
        for text in &texts {
            let ids = self.token_ids(text).map_err(ModelError::internal)?;
            vectors.push(accel.forward(
                |on_device| self.forward(&ids, on_device),
                |in_sandbox| self.forward(&ids, in_sandbox),
            )?);
        }
        Ok(Output::Embeddings(vectors))
    }
}

export_model!(Embedder);
