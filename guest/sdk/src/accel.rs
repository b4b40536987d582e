//! The accelerator bridge: a [`Linears`] on the host's device, and the fallback to the
//! sandbox when the device says no.
//!
//! Weights are resident on the host (bound by name the first time any run of the model uses
//! them, then shared by every run, which only names them); activations go up per layer, and a
//! feed-forward block's intermediate activation never leaves the device. When the host refuses
//! an allocation (`budget-exceeded`) or an operation (`unsupported`), [`Accel::forward`] runs
//! the same forward in the sandbox and keeps the rest of the run there; the host's usage report
//! counts the refusal.
//!
//! Natively (a model's own tests) no device is ever offered, so every forward runs
//! [`InSandbox`].

use std::collections::hash_map::{Entry, HashMap};

use candle_core::{CpuStorage, Storage, Tensor};

use crate::bindings::wasm_infer::model::accel::{self, AccelError, DeviceKind};
use crate::layers::{InSandbox, Linear, LinearId, Linears, Norm, NormId};
use crate::ModelError;

/// This run's accelerator: the host's device until it refuses something, then none.
pub struct Accel {
    device: Option<OnDevice>,
}

impl Accel {
    /// The device the host offers this run (none natively, or when the host runs with
    /// `--accel off`).
    pub fn offered() -> Self {
        let offered = cfg!(target_arch = "wasm32") && accel::info().kind != DeviceKind::None;
        Self {
            device: offered.then(OnDevice::new),
        }
    }

    /// No device: every forward runs in the sandbox.
    pub fn none() -> Self {
        Self { device: None }
    }

    /// Whether forwards still go to the device.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// One forward: `on_device` while the device is in use, else (and after the device
    /// refused something, for the rest of the run) `in_sandbox`. Both closures should run the
    /// same generic forward, so the run's result does not depend on where it ran beyond float
    /// rounding.
    pub fn forward<T>(
        &mut self,
        on_device: impl FnOnce(&mut OnDevice) -> Result<T, Fallback>,
        in_sandbox: impl FnOnce(&mut InSandbox) -> candle_core::Result<T>,
    ) -> Result<T, ModelError> {
        if let Some(device) = self.device.as_mut() {
            match on_device(device) {
                Ok(value) => return Ok(value),
                Err(Fallback::Accel(e)) => {
                    // Budget refused or operation unsupported: the rest of this run
                    // computes in the sandbox (the host's usage counts the refusal).
                    eprintln!("accel: falling back to in-sandbox compute: {e:?}");
                    self.device = None;
                }
                Err(Fallback::Model(e)) => return Err(e.into()),
            }
        }
        Ok(in_sandbox(&mut InSandbox)?)
    }
}

/// Why an offloaded forward stopped: the device said no (fall back), or the model is broken.
#[derive(Debug)]
pub enum Fallback {
    Accel(AccelError),
    Model(candle_core::Error),
}

impl From<AccelError> for Fallback {
    fn from(e: AccelError) -> Self {
        Self::Accel(e)
    }
}

impl From<candle_core::Error> for Fallback {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(e)
    }
}

/// The layers on the host's accelerator, with this run's handles to the resident weights.
pub struct OnDevice {
    /// (weight, bias) of each linear layer used so far in this run.
    weights: HashMap<LinearId, (accel::Tensor, accel::Tensor)>,
    /// (scale, shift) of each layer norm used so far in this run.
    norms: HashMap<NormId, (accel::Tensor, accel::Tensor)>,
}

impl OnDevice {
    fn new() -> Self {
        Self {
            weights: HashMap::new(),
            norms: HashMap::new(),
        }
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
