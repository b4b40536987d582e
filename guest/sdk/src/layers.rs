//! The layers whose compute can move: linear layers, residual layer norms and attention, and
//! the [`Linears`] seam that decides where they run.
//!
//! A model's forward is plain candle code that calls a `L: Linears` for these steps and does
//! everything else (embeddings, pooling, sampling) itself. [`InSandbox`] runs them in the
//! sandbox on the guest's own kernels ([`crate::kernels`]; natively in candle, the tests'
//! baseline); [`crate::accel::OnDevice`] runs them on the host's accelerator. Every layer has
//! an id ([`LinearId`], [`NormId`]) given at load by [`Ids`], so an implementation can keep
//! per-layer state (a device handle to the resident weight) under a cheap key.
//!
//! The trait's methods beyond [`Linears::linear`] and [`Linears::feed_forward`] have defaults,
//! so steps a decoder needs (a causal or cached attention, say) can be added the same way
//! without breaking an existing implementation.

use candle_core::{Device, Module, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use crate::kernels;

/// Names one linear layer of a loaded model for the model's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearId(pub(crate) usize);

/// Names one residual layer norm of a loaded model (as [`LinearId`] names a linear layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NormId(pub(crate) usize);

/// Hands out the next free [`LinearId`] and [`NormId`] while a model loads; one per model.
#[derive(Default)]
pub struct Ids {
    linear: usize,
    norm: usize,
}

impl Ids {
    fn next_linear(&mut self) -> LinearId {
        let id = LinearId(self.linear);
        self.linear += 1;
        id
    }

    fn next_norm(&mut self) -> NormId {
        let id = NormId(self.norm);
        self.norm += 1;
        id
    }
}

/// A linear layer `x · Wᵀ + b`, with weight [out, in] and bias [out].
pub struct Linear {
    id: LinearId,
    weight: Tensor,
    bias: Tensor,
    /// The same weights packed for the guest's own matmul ([`Packed`]), once, at load.
    packed: kernels::PackedLinear,
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out] under `vb` (PyTorch's names and layout).
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        ids: &mut Ids,
    ) -> candle_core::Result<Self> {
        let id = ids.next_linear();
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = vb.get(out_dim, "bias")?;
        Self::with_id(id, weight, bias, out_dim, in_dim)
    }

    /// A layer of `weight` [out, in] and `bias` [out] built in code.
    pub fn new(weight: Tensor, bias: Tensor, ids: &mut Ids) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Self::with_id(ids.next_linear(), weight, bias, out_dim, in_dim)
    }

    fn with_id(
        id: LinearId,
        weight: Tensor,
        bias: Tensor,
        out_dim: usize,
        in_dim: usize,
    ) -> candle_core::Result<Self> {
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

/// A residual layer norm, `norm(x + residual)` over the last dimension.
pub struct Norm {
    id: NormId,
    norm: LayerNorm,
}

impl Norm {
    /// Loads `weight` and `bias` [hidden] under `vb` (candle-nn's `layer_norm`).
    pub fn load(
        vb: VarBuilder,
        hidden: usize,
        eps: f64,
        ids: &mut Ids,
    ) -> candle_core::Result<Self> {
        let id = ids.next_norm();
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

/// Where a forward's linear layers, attention and residual layer norms run (the defaults:
/// here, in candle). The forward does everything else itself.
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

/// The layers on the CPU this code runs on: in the sandbox with the guest's own kernels
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_built_in_code_get_consecutive_ids_and_compute_x_wt_plus_b() {
        let mut ids = Ids::default();
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let first = Linear::new(w.clone(), b.clone(), &mut ids).unwrap();
        let second = Linear::new(w, b, &mut ids).unwrap();
        assert_eq!((first.id(), second.id()), (LinearId(0), LinearId(1)));
        let x = Tensor::new(&[[1f32, 1.0], [2.0, -1.0]], &Device::Cpu).unwrap();
        // Row 0: [1+2, 3+4, 5+6] + b; row 1: [2-2, 6-4, 10-6] + b.
        let expected = [[3.5f32, 6.0, 13.0], [0.5, 1.0, 6.0]];
        for y in [
            InSandbox.linear(&first, &x).unwrap(),
            Packed.linear(&first, &x).unwrap(),
        ] {
            assert_eq!(y.to_vec2::<f32>().unwrap(), expected);
        }
    }
}
