//! The wasm-infer `model` world for all-MiniLM-L6-v2.
//!
//! The weights, config and tokenizer are embedded in the component at build time (see
//! `build.rs`) rather than read from a preopened directory: the guest then needs no filesystem
//! at all (no authority to grant, no path convention for the CLI), the component is one
//! self-contained artifact, and a later pre-initialisation snapshot can build the model without
//! calling a single import. The host calls `wizer-initialize` once and snapshots the result, so
//! every run starts with the model built; without a snapshot, `infer` builds it on first use,
//! and `info` stays cheap either way.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::OnceLock;

use candle_core::{CpuStorage, Storage, Tensor};

use crate::{Embedder, Linear, LinearId, Linears, Norm, NormId, DIMENSION, MAX_TOKENS, NAME};

wit_bindgen::generate!({
    world: "preinit-model",
    path: "../../wit",
});

use wasm_infer::model::accel::{self, AccelError, DeviceKind};
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
        let mut device = OnDevice::offered();
        let mut vectors = Vec::with_capacity(texts.len());
        for text in &texts {
            if let Some(on_device) = device.as_mut() {
                let ids = embedder.token_ids(text).map_err(internal)?;
                match embedder.forward(&ids, on_device) {
                    Ok(vector) => {
                        vectors.push(vector);
                        continue;
                    }
                    Err(Fallback::Accel(e)) => {
                        // Budget refused or operation unsupported: the rest of this run
                        // computes in the sandbox (the host's usage counts the refusal).
                        eprintln!("accel: falling back to in-sandbox compute: {e:?}");
                        device = None;
                    }
                    Err(Fallback::Model(message)) => return Err(internal(message)),
                }
            }
            vectors.push(embedder.embed(text).map_err(internal)?);
        }
        Ok(Output::Embeddings(vectors))
    }
}

export!(MiniLm);

/// Why an offloaded forward stopped: the device said no (fall back), or the model is broken.
enum Fallback {
    Accel(AccelError),
    Model(String),
}

impl From<AccelError> for Fallback {
    fn from(e: AccelError) -> Self {
        Self::Accel(e)
    }
}

impl From<candle_core::Error> for Fallback {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(format!("BERT forward: {e}"))
    }
}

/// The linear layers on the host's accelerator. Weights are resident on the host (bound by
/// name the first time any run of this model uses them, then shared by every run, which only
/// names them); activations go up per layer, and the feed-forward block's intermediate
/// activations never leave the device.
struct OnDevice {
    /// (weight, bias) of each linear layer used so far in this run.
    weights: HashMap<LinearId, (accel::Tensor, accel::Tensor)>,
    /// (scale, shift) of each layer norm used so far in this run.
    norms: HashMap<NormId, (accel::Tensor, accel::Tensor)>,
}

impl OnDevice {
    /// `Some` when the host offers a device.
    fn offered() -> Option<Self> {
        (accel::info().kind != DeviceKind::None).then(|| Self {
            weights: HashMap::new(),
            norms: HashMap::new(),
        })
    }

    /// Gets handles to `layer`'s resident weights unless this run has them already.
    fn hold(&mut self, layer: &Linear) -> Result<(), Fallback> {
        if let Entry::Vacant(slot) = self.weights.entry(layer.id()) {
            let index = layer.id().0;
            let w = resident(&format!("linear{index}.weight"), layer.weight())?;
            let b = resident(&format!("linear{index}.bias"), layer.bias())?;
            slot.insert((w, b));
        }
        Ok(())
    }

    /// Gets handles to `norm`'s resident scale and shift unless this run has them already.
    fn hold_norm(&mut self, norm: &Norm, bias: &Tensor) -> Result<(), Fallback> {
        if let Entry::Vacant(slot) = self.norms.entry(norm.id()) {
            let index = norm.id().0;
            let g = resident(&format!("norm{index}.weight"), norm.weight())?;
            let b = resident(&format!("norm{index}.bias"), bias)?;
            slot.insert((g, b));
        }
        Ok(())
    }
}

/// `t`'s values in row-major order, borrowed from candle's storage where `t` is a contiguous
/// f32 CPU tensor (every weight, and the forward's activations), else copied.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(f(&values[start..end]));
    }
    drop(storage);
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

fn shape_of(t: &Tensor) -> Vec<u32> {
    t.dims().iter().map(|&d| d as u32).collect()
}

/// `t` as a resident weight named `name`. The values cross as little-endian bytes borrowed
/// from candle's storage (no copy in the sandbox), so naming an already resident weight costs
/// the same few instructions as binding it: the host reads the bytes only the first time.
fn resident(name: &str, t: &Tensor) -> Result<accel::Tensor, Fallback> {
    let shape = shape_of(t);
    Ok(with_values(t, |values| {
        // SAFETY: f32 has no padding and every bit pattern is a valid byte, the length is the
        // slice's in bytes, and wasm32 is little-endian, which is the layout the host reads.
        let bytes = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        accel::resident(name, &shape, bytes)
    })??)
}

/// `t` uploaded, its values passed straight from candle's storage (the host copies them).
fn upload(t: &Tensor) -> Result<accel::Tensor, Fallback> {
    let shape = shape_of(t);
    Ok(with_values(t, |values| accel::upload(&shape, values))??)
}

fn download(t: &accel::Tensor) -> Result<Tensor, Fallback> {
    let dims: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
    Ok(Tensor::from_vec(
        t.download()?,
        dims,
        &candle_core::Device::Cpu,
    )?)
}

impl Linears for OnDevice {
    type Error = Fallback;

    fn linear(&mut self, layer: &Linear, x: &Tensor) -> Result<Tensor, Fallback> {
        let x = upload(x)?;
        self.hold(layer)?;
        let (w, b) = &self.weights[&layer.id()];
        download(&accel::linear(&x, w, Some(b))?)
    }

    fn feed_forward(
        &mut self,
        intermediate: &Linear,
        output: &Linear,
        x: &Tensor,
    ) -> Result<Tensor, Fallback> {
        let x = upload(x)?;
        self.hold(intermediate)?;
        self.hold(output)?;
        let (wi, bi) = &self.weights[&intermediate.id()];
        let (wo, bo) = &self.weights[&output.id()];
        let hidden = accel::gelu(&accel::linear(&x, wi, Some(bi))?)?;
        download(&accel::linear(&hidden, wo, Some(bo))?)
    }

    fn attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<Tensor, Fallback> {
        let (q, k, v) = (upload(q)?, upload(k)?, upload(v)?);
        download(&accel::attention(&q, &k, &v, heads as u32)?)
    }

    fn add_norm(&mut self, norm: &Norm, x: &Tensor, residual: &Tensor) -> Result<Tensor, Fallback> {
        let Some(bias) = norm.bias() else {
            return Ok(norm.forward(x, residual)?);
        };
        let (x, residual) = (upload(x)?, upload(residual)?);
        self.hold_norm(norm, bias)?;
        let (g, b) = &self.norms[&norm.id()];
        download(&accel::layer_norm(
            &x,
            Some(&residual),
            g,
            b,
            norm.eps() as f32,
        )?)
    }
}
