//! all-MiniLM-L6-v2 sentence embeddings with candle: tokenizer → BERT → mean pooling → L2 norm.
//!
//! The model code is plain and target-independent, so the very same code runs inside the sandbox
//! (the `wasm32` component in [`component`]) and natively (the tests' and benchmark's baseline).

use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

#[cfg(target_arch = "wasm32")]
mod component;

/// Model name reported by `info`.
pub const NAME: &str = "all-MiniLM-L6-v2";
/// Length of every embedding.
pub const DIMENSION: usize = 384;
/// The model card's `max_seq_length`: longer inputs are truncated to this many tokens
/// (including `[CLS]` and `[SEP]`). The bundled tokenizer.json says 128 and pads to 128;
/// sentence-transformers overrides both, and so do we.
pub const MAX_TOKENS: usize = 256;

/// A loaded model: BERT weights plus its tokenizer.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
}

impl Embedder {
    /// Builds the model from the bytes of `model.safetensors`, `config.json` and `tokenizer.json`.
    pub fn load(weights: &[u8], config_json: &[u8], tokenizer_json: &[u8]) -> Result<Self, String> {
        let config: Config =
            serde_json::from_slice(config_json).map_err(|e| format!("config.json: {e}"))?;
        let vb = candle_nn::VarBuilder::from_slice_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| format!("model.safetensors: {e}"))?;
        let model = BertModel::load(vb, &config).map_err(|e| format!("BERT weights: {e}"))?;
        let mut tokenizer =
            Tokenizer::from_bytes(tokenizer_json).map_err(|e| format!("tokenizer.json: {e}"))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| format!("tokenizer truncation: {e}"))?;
        tokenizer.with_padding(None);
        Ok(Self { model, tokenizer })
    }

    /// Token ids for `text`, with `[CLS]`/`[SEP]`, truncated to [`MAX_TOKENS`].
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The unit-length sentence embedding of one text.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, String> {
        let ids = self.token_ids(text)?;
        self.embed_ids(&ids)
            .map_err(|e| format!("BERT forward: {e}"))
    }

    fn embed_ids(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        let input_ids = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let token_type_ids = input_ids.zeros_like()?;
        let attention_mask = input_ids.ones_like()?;
        let hidden = self
            .model
            .forward(&input_ids, &token_type_ids, Some(&attention_mask))?;
        let pooled = mean_pool(&hidden, &attention_mask)?;
        l2_normalize(&pooled)?.squeeze(0)?.to_vec1::<f32>()
    }
}

/// Mean of the token vectors `hidden` (batch, tokens, dim) over the positions where
/// `attention_mask` (batch, tokens) is 1, as sentence-transformers' `Pooling(mean_tokens)`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    // sentence-transformers clamps the token count at 1e-9 to avoid a division by zero.
    let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    summed.broadcast_div(&counts)
}

/// Scales each row of `x` (batch, dim) to unit L2 norm, as sentence-transformers' `Normalize`
/// (`torch.nn.functional.normalize`, which clamps the norm at 1e-12).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    x.broadcast_div(&norm)
}
