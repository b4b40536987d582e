//! all-MiniLM-L6-v2 sentence embeddings with candle: tokenizer → BERT → mean pooling → L2 norm.
//!
//! The model code is plain and target-independent, so the very same code runs inside the sandbox
//! (the `wasm32` component in [`component`]) and natively (the tests' and benchmark's baseline).
//! There is one BERT forward, [`Embedder::forward`]; a [`Linears`] implementation decides where
//! its linear layers run ([`InSandbox`], or the component's accelerator path), and everything
//! else runs here.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

#[cfg(target_arch = "wasm32")]
mod component;
mod kernels;

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

/// Names one linear layer of a loaded model for the model's lifetime, so that a [`Linears`]
/// implementation can keep per-layer state (uploaded weights) under a cheap key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearId(usize);

/// A linear layer `x · Wᵀ + b`, with weight [out, in] and bias [out].
pub struct Linear {
    id: LinearId,
    weight: Tensor,
    bias: Tensor,
    /// The same weights packed for the guest's own matmul ([`Packed`]), once, at load.
    packed: kernels::PackedLinear,
}

impl Linear {
    /// Loads `weight` and `bias` under `vb` and takes the next id from `next_id`.
    fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        next_id: &mut usize,
    ) -> candle_core::Result<Self> {
        let id = LinearId(*next_id);
        *next_id += 1;
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = vb.get(out_dim, "bias")?;
        let packed = kernels::PackedLinear::pack(
            &weight.flatten_all()?.to_vec1()?,
            &bias.to_vec1()?,
            out_dim,
            in_dim,
        );
        Ok(Self {
            id,
            weight,
            bias,
            packed,
        })
    }

    pub fn id(&self) -> LinearId {
        self.id
    }

    /// [out, in].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// [out].
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// `x · Wᵀ + b` in candle for `x` [tokens, in], as `candle_nn::Linear` computes it.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }

    /// `x · Wᵀ + b` for `x` [tokens, in] with the guest's packed-weight kernel.
    pub fn forward_packed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.packed_with(x, kernels::PackedLinear::forward)
    }

    /// `gelu(x · Wᵀ + b)` (the erf form) with the guest's packed-weight kernel.
    pub fn forward_packed_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.packed_with(x, kernels::PackedLinear::forward_gelu)
    }

    fn packed_with(
        &self,
        x: &Tensor,
        kernel: fn(&kernels::PackedLinear, &[f32]) -> Vec<f32>,
    ) -> candle_core::Result<Tensor> {
        let tokens = x.dim(0)?;
        let y = kernel(&self.packed, &x.flatten_all()?.to_vec1()?);
        Tensor::from_vec(y, (tokens, self.packed.out_dim()), &Device::Cpu)
    }
}

/// Names one residual layer norm of a loaded model (as [`LinearId`] names a linear layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NormId(usize);

/// A residual layer norm, `norm(x + residual)` over the last dimension.
pub struct Norm {
    id: NormId,
    norm: LayerNorm,
}

impl Norm {
    fn load(
        vb: VarBuilder,
        hidden: usize,
        eps: f64,
        next_id: &mut usize,
    ) -> candle_core::Result<Self> {
        let id = NormId(*next_id);
        *next_id += 1;
        Ok(Self {
            id,
            norm: candle_nn::layer_norm(hidden, eps, vb)?,
        })
    }

    pub fn id(&self) -> NormId {
        self.id
    }

    /// The scale, [hidden].
    pub fn weight(&self) -> &Tensor {
        self.norm.weight()
    }

    /// The shift, [hidden].
    pub fn bias(&self) -> Option<&Tensor> {
        self.norm.bias()
    }

    pub fn eps(&self) -> f64 {
        self.norm.eps()
    }

    /// `norm(x + residual)` in candle, as candle-transformers' BERT computes it.
    pub fn forward(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        self.norm.forward(&x.add(residual)?)
    }
}

/// Multi-head scaled dot-product self-attention without a mask: `q`, `k`, `v` are
/// [tokens, heads × head_size]; per head softmax(q·kᵀ / √head_size)·v; the result is
/// [tokens, heads × head_size].
///
/// In the sandbox this runs on the guest's kernels ([`kernels::attention`]: candle's wasm
/// softmax is scalar and its small per-head matmuls re-pack every call); natively in candle.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (tokens, hidden) = q.dims2()?;
    let head_size = hidden / heads;
    if cfg!(target_arch = "wasm32") {
        let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let context = kernels::attention(&values(q)?, &values(k)?, &values(v)?, heads, head_size);
        return Tensor::from_vec(context, q.shape(), q.device());
    }
    // [tokens, hidden] → [heads, tokens, head_size]
    let split = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.reshape((tokens, heads, head_size))?
            .transpose(0, 1)?
            .contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (q.matmul(&k.t()?)? / (head_size as f64).sqrt())?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs
        .matmul(&v)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((tokens, hidden))
}

/// Where the linear layers, the attention and the residual layer norms of
/// [`Embedder::forward`] run (the defaults: here, in candle). The forward does everything else
/// (embeddings, pooling) itself.
pub trait Linears {
    /// The failure that stops the forward (the accelerator path falls back on it).
    type Error: From<candle_core::Error>;
    /// `layer` applied to `x` [tokens, in].
    fn linear(&mut self, layer: &Linear, x: &Tensor) -> Result<Tensor, Self::Error>;
    /// The feed-forward block `output(gelu(intermediate(x)))` as one step, so that an
    /// implementation can keep the (widest) intermediate activation where it was computed.
    fn feed_forward(
        &mut self,
        intermediate: &Linear,
        output: &Linear,
        x: &Tensor,
    ) -> Result<Tensor, Self::Error>;
    /// [`attention`] of the projected `q`, `k`, `v`.
    fn attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<Tensor, Self::Error> {
        Ok(attention(q, k, v, heads)?)
    }
    /// `norm(x + residual)`.
    fn add_norm(
        &mut self,
        norm: &Norm,
        x: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor, Self::Error> {
        Ok(norm.forward(x, residual)?)
    }
}

/// The linear layers on the CPU this code runs on: in the sandbox with the guest's own kernels
/// ([`Packed`]); natively (the tests' and benchmark's baseline) in candle.
pub struct InSandbox;

impl Linears for InSandbox {
    type Error = candle_core::Error;

    fn linear(&mut self, layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        if cfg!(target_arch = "wasm32") {
            Packed.linear(layer, x)
        } else {
            layer.forward(x)
        }
    }

    fn feed_forward(
        &mut self,
        intermediate: &Linear,
        output: &Linear,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if cfg!(target_arch = "wasm32") {
            Packed.feed_forward(intermediate, output, x)
        } else {
            output.forward(&intermediate.forward(x)?.gelu_erf()?)
        }
    }
}

/// The linear layers with the guest's packed-weight kernels ([`kernels`]): what the sandbox
/// runs, and natively (a portable micro-kernel with the same roundings) what the tests check.
pub struct Packed;

impl Linears for Packed {
    type Error = candle_core::Error;

    fn linear(&mut self, layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        layer.forward_packed(x)
    }

    fn feed_forward(
        &mut self,
        intermediate: &Linear,
        output: &Linear,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        output.forward_packed(&intermediate.forward_packed_gelu(x)?)
    }
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
        let next_id = &mut ids.linear;
        Ok(Self {
            query: Linear::load(vb.pp("self.query"), hidden, hidden, next_id)?,
            key: Linear::load(vb.pp("self.key"), hidden, hidden, next_id)?,
            value: Linear::load(vb.pp("self.value"), hidden, hidden, next_id)?,
            output: Linear::load(vb.pp("output.dense"), hidden, hidden, next_id)?,
            norm: Norm::load(
                vb.pp("output.LayerNorm"),
                hidden,
                config.layer_norm_eps,
                &mut ids.norm,
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

/// The next free [`LinearId`] and [`NormId`] while a model loads.
#[derive(Default)]
struct Ids {
    linear: usize,
    norm: usize,
}

impl Layer {
    fn load(vb: VarBuilder, config: &Config, ids: &mut Ids) -> candle_core::Result<Self> {
        let (hidden, inner) = (config.hidden_size, config.intermediate_size);
        let attention = Attention::load(vb.pp("attention"), config, ids)?;
        Ok(Self {
            attention,
            intermediate: Linear::load(
                vb.pp("intermediate.dense"),
                hidden,
                inner,
                &mut ids.linear,
            )?,
            output: Linear::load(vb.pp("output.dense"), inner, hidden, &mut ids.linear)?,
            norm: Norm::load(
                vb.pp("output.LayerNorm"),
                hidden,
                config.layer_norm_eps,
                &mut ids.norm,
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
