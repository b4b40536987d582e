//! all-MiniLM-L6-v2 sentence embeddings with candle: tokenizer → BERT → mean pooling → L2 norm.
//!
//! The model code is plain and target-independent, so the very same code runs inside the sandbox
//! (the `wasm32` component in `component.rs`, exported with the guest SDK, `wasm-infer-guest`)
//! and natively (the tests' and benchmark's baseline). There is one BERT forward,
//! [`Embedder::forward`]; a [`Linears`] implementation from the SDK decides where its linear
//! layers, attention and layer norms run ([`InSandbox`], or the SDK's accelerator path), and
//! everything else runs here.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};
pub use wasm_infer_guest::{Ids, InSandbox, Linear, LinearId, Linears, Norm, NormId, Packed};

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

/// The only activation implemented, BERT's erf-based GELU (config.json `hidden_act`).
const HIDDEN_ACT: &str = "gelu";
/// `torch.nn.functional.normalize` (sentence-transformers' `Normalize`) clamps the norm at this.
const MIN_NORM: f32 = 1e-12;

/// The config.json fields the forward needs.
#[derive(Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f64,
}

/// Token, position and token-type embeddings, summed and normalised.
struct Embeddings {
    words: Embedding,
    positions: Tensor,
    /// The type-0 row: one text is one segment, so every token has type 0.
    single_segment: Tensor,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let hidden = config.hidden_size;
        let token_types = vb.get(
            (config.type_vocab_size, hidden),
            "token_type_embeddings.weight",
        )?;
        Ok(Self {
            words: candle_nn::embedding(config.vocab_size, hidden, vb.pp("word_embeddings"))?,
            positions: vb.get(
                (config.max_position_embeddings, hidden),
                "position_embeddings.weight",
            )?,
            single_segment: token_types.get(0)?,
            norm: candle_nn::layer_norm(hidden, config.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// [tokens] ids → [tokens, hidden].
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let tokens = ids.dim(0)?;
        // candle-transformers' order: words + token types, then + positions.
        let summed = self
            .words
            .forward(ids)?
            .broadcast_add(&self.single_segment)?
            .add(&self.positions.narrow(0, 0, tokens)?)?;
        self.norm.forward(&summed)
    }
}

/// Multi-head self-attention with its output projection and residual layer norm.
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: Norm,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, config: &Config, ids: &mut Ids) -> candle_core::Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            query: Linear::load(vb.pp("self.query"), hidden, hidden, ids)?,
            key: Linear::load(vb.pp("self.key"), hidden, hidden, ids)?,
            value: Linear::load(vb.pp("self.value"), hidden, hidden, ids)?,
            output: Linear::load(vb.pp("output.dense"), hidden, hidden, ids)?,
            norm: Norm::load(
                vb.pp("output.LayerNorm"),
                hidden,
                config.layer_norm_eps,
                ids,
            )?,
            heads: config.num_attention_heads,
        })
    }

    /// [tokens, hidden] → [tokens, hidden]. No mask: texts go one at a time, unpadded.
    fn forward<L: Linears>(&self, x: &Tensor, linears: &mut L) -> Result<Tensor, L::Error> {
        let q = linears.linear(&self.query, x)?;
        let k = linears.linear(&self.key, x)?;
        let v = linears.linear(&self.value, x)?;
        let context = linears.attention(&q, &k, &v, self.heads)?;
        let projected = linears.linear(&self.output, &context)?;
        linears.add_norm(&self.norm, &projected, x)
    }
}

/// One encoder layer: attention, then the feed-forward block with its residual layer norm.
struct Layer {
    attention: Attention,
    intermediate: Linear,
    output: Linear,
    norm: Norm,
}

impl Layer {
    fn load(vb: VarBuilder, config: &Config, ids: &mut Ids) -> candle_core::Result<Self> {
        let (hidden, inner) = (config.hidden_size, config.intermediate_size);
        let attention = Attention::load(vb.pp("attention"), config, ids)?;
        Ok(Self {
            attention,
            intermediate: Linear::load(vb.pp("intermediate.dense"), hidden, inner, ids)?,
            output: Linear::load(vb.pp("output.dense"), inner, hidden, ids)?,
            norm: Norm::load(
                vb.pp("output.LayerNorm"),
                hidden,
                config.layer_norm_eps,
                ids,
            )?,
        })
    }

    fn forward<L: Linears>(&self, x: &Tensor, linears: &mut L) -> Result<Tensor, L::Error> {
        let attended = self.attention.forward(x, linears)?;
        let fed = linears.feed_forward(&self.intermediate, &self.output, &attended)?;
        linears.add_norm(&self.norm, &fed, &attended)
    }
}

/// A loaded model: BERT weights plus its tokenizer.
pub struct Embedder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    tokenizer: Tokenizer,
}

impl Embedder {
    /// Builds the model from the bytes of `model.safetensors`, `config.json` and `tokenizer.json`.
    pub fn load(weights: &[u8], config_json: &[u8], tokenizer_json: &[u8]) -> Result<Self, String> {
        let config: Config =
            serde_json::from_slice(config_json).map_err(|e| format!("config.json: {e}"))?;
        if config.hidden_act != HIDDEN_ACT {
            return Err(format!(
                "config.json: hidden_act {:?} is not supported (only {HIDDEN_ACT:?})",
                config.hidden_act
            ));
        }
        let weights = candle_core::safetensors::load_buffer(weights, &Device::Cpu)
            .map_err(|e| format!("model.safetensors: {e}"))?;
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let (embeddings, layers) =
            Self::load_bert(vb, &config).map_err(|e| format!("BERT weights: {e}"))?;
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
            embeddings,
            layers,
            tokenizer,
        })
    }

    fn load_bert(vb: VarBuilder, config: &Config) -> candle_core::Result<(Embeddings, Vec<Layer>)> {
        let embeddings = Embeddings::load(vb.pp("embeddings"), config)?;
        let mut ids = Ids::default();
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder.layer").pp(i), config, &mut ids))
            .collect::<candle_core::Result<_>>()?;
        Ok((embeddings, layers))
    }

    /// Token ids for `text`, with `[CLS]`/`[SEP]`, truncated to [`MAX_TOKENS`].
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The unit-length sentence embedding of one text, computed in the sandbox.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, String> {
        let ids = self.token_ids(text)?;
        self.forward(&ids, &mut InSandbox)
            .map_err(|e| format!("BERT forward: {e}"))
    }

    /// The unit-length sentence embedding of the token ids of one text (as
    /// [`Embedder::token_ids`] returns them), with the linear layers run by `linears`. The
    /// arithmetic is candle-transformers' BERT's.
    pub fn forward<L: Linears>(&self, ids: &[u32], linears: &mut L) -> Result<Vec<f32>, L::Error> {
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let mut hidden = self.embeddings.forward(&ids)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, linears)?;
        }
        Ok(l2_normalize(&mean_pool(&hidden)?)?.to_vec1::<f32>()?)
    }
}

/// Mean of the token vectors `hidden` [tokens, dim], as sentence-transformers'
/// `Pooling(mean_tokens)`. Every token counts: texts go one at a time, unpadded.
fn mean_pool(hidden: &Tensor) -> candle_core::Result<Tensor> {
    hidden.mean(0)
}

/// Scales `x` [dim] to unit L2 norm, as sentence-transformers' `Normalize`.
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(MIN_NORM, f32::MAX)?;
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
