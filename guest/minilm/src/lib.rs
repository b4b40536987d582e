//! all-MiniLM-L6-v2 sentence embeddings with candle: tokenizer → BERT → mean pooling → L2 norm.
//!
//! The model code is plain and target-independent, so the very same code runs inside the sandbox
//! (the `wasm32` component in [`component`]) and natively (the tests' and benchmark's baseline).

use std::collections::HashMap;

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
    /// The same weight tensors by checkpoint name (shared with `model`, not copied), for
    /// forwards that place some layers elsewhere (the accelerator path).
    weights: HashMap<String, Tensor>,
    config: Config,
}

impl Embedder {
    /// Builds the model from the bytes of `model.safetensors`, `config.json` and `tokenizer.json`.
    pub fn load(weights: &[u8], config_json: &[u8], tokenizer_json: &[u8]) -> Result<Self, String> {
        let config: Config =
            serde_json::from_slice(config_json).map_err(|e| format!("config.json: {e}"))?;
        let weights = candle_core::safetensors::load_buffer(weights, &Device::Cpu)
            .map_err(|e| format!("model.safetensors: {e}"))?;
        let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
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
        Ok(Self {
            model,
            tokenizer,
            weights,
            config,
        })
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

/// Where a BERT linear layer runs: the forward below calls it for the attention projections and
/// the feed-forward block, and does everything else (embeddings, attention scores, softmax,
/// layer norms, pooling) itself.
pub trait Linears {
    /// The failure that makes the caller fall back.
    type Error: From<candle_core::Error>;
    /// `x · Wᵀ + b` for the layer named `name` (a checkpoint prefix such as
    /// `encoder.layer.0.attention.self.query`); `x` is [tokens, k].
    fn linear(&mut self, name: &str, x: &Tensor) -> Result<Tensor, Self::Error>;
    /// The feed-forward block `out(gelu(intermediate(x)))` of layer `layer`, as one step, so
    /// that an implementation can keep the intermediate activations where they are.
    fn feed_forward(&mut self, layer: usize, x: &Tensor) -> Result<Tensor, Self::Error>;
}

impl Embedder {
    /// The weight tensor `name` from the checkpoint.
    pub fn weight(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.weights
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no weight {name}")))
    }

    /// Number of transformer layers.
    pub fn layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    /// The unit-length embedding of `text` with the linear layers run by `linears`, the rest
    /// as [`Embedder::embed`] does (same arithmetic as candle-transformers' BERT).
    pub fn embed_with<L: Linears>(&self, text: &str, linears: &mut L) -> Result<Vec<f32>, L::Error>
    where
        L::Error: From<String>,
    {
        let ids = self.token_ids(text)?;
        let n = ids.len();
        let eps = self.config.layer_norm_eps;
        let norm = |prefix: &str| -> candle_core::Result<candle_nn::LayerNorm> {
            Ok(candle_nn::LayerNorm::new(
                self.weight(&format!("{prefix}.LayerNorm.weight"))?.clone(),
                self.weight(&format!("{prefix}.LayerNorm.bias"))?.clone(),
                eps,
            ))
        };
        use candle_core::Module;
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)?;
        let words = self
            .weight("embeddings.word_embeddings.weight")?
            .embedding(&input)?;
        let positions = self
            .weight("embeddings.position_embeddings.weight")?
            .narrow(0, 0, n)?;
        let types = self
            .weight("embeddings.token_type_embeddings.weight")?
            .narrow(0, 0, 1)?;
        let embedded = words.add(&positions)?.broadcast_add(&types)?;
        let mut hidden = norm("embeddings")?.forward(&embedded)?;
        let heads = self.config.num_attention_heads;
        let head_size = self.config.hidden_size / heads;
        for layer in 0..self.layers() {
            let prefix = format!("encoder.layer.{layer}");
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((n, heads, head_size))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let q = split(linears.linear(&format!("{prefix}.attention.self.query"), &hidden)?)?;
            let k = split(linears.linear(&format!("{prefix}.attention.self.key"), &hidden)?)?;
            let v = split(linears.linear(&format!("{prefix}.attention.self.value"), &hidden)?)?;
            let scores = (q.matmul(&k.t()?)? / (head_size as f64).sqrt())?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let context = probs
                .matmul(&v)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n, heads * head_size))?;
            let attended = linears.linear(&format!("{prefix}.attention.output.dense"), &context)?;
            let attended =
                norm(&format!("{prefix}.attention.output"))?.forward(&attended.add(&hidden)?)?;
            let fed = linears.feed_forward(layer, &attended)?;
            hidden = norm(&format!("{prefix}.output"))?.forward(&fed.add(&attended)?)?;
        }
        let pooled = hidden.mean_keepdim(0)?;
        Ok(l2_normalize(&pooled)?.squeeze(0)?.to_vec1::<f32>()?)
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

#[cfg(not(target_arch = "wasm32"))]
impl Embedder {
    /// Builds the model from `model.safetensors`, `config.json` and `tokenizer.json` in `dir`
    /// (the native baseline of the tests and the benchmark; the component embeds the files).
    pub fn load_dir(dir: &std::path::Path) -> Result<Self, String> {
        let read = |file: &str| {
            std::fs::read(dir.join(file)).map_err(|e| format!("{}: {e}", dir.join(file).display()))
        };
        Self::load(
            &read("model.safetensors")?,
            &read("config.json")?,
            &read("tokenizer.json")?,
        )
    }
}
