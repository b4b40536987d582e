//! Resident weights: read-only device tensors shared by every run of the models that bind them.
//!
//! Two tables: a loaded model's [`ModelWeights`] maps the names its guest chose to the weights
//! it bound (so a run reaches only its own model's weights, by name), and the runtime's table
//! maps a content digest to the one physical copy (so models with the same weights, or runs
//! racing to bind the first time, share it). A [`Resident`] holds its bytes in the host-wide
//! pool until the last holder (a model's table, a run's handle) drops it.
//!
//! **Ownership.** A model owns the weights its runs bind and pays for them from its own
//! resident budget ([`LoadOptions::resident_memory`](crate::LoadOptions::resident_memory),
//! default [`DEFAULT_RESIDENT_MEMORY`]): every name bound counts its bytes against it by rule
//! (whether or not another model already holds the same content), and a bind past it is
//! refused with `budget-exceeded` (the model's figures). The physical copies are counted apart
//! from the host-wide budget that runs draw on (`DeviceUsage::resident`), so no model's weights
//! can take device memory another model's runs need: what all residents may hold together is
//! bounded by the loaded models' budgets.
//!
//! Lock order: a model's table, then the runtime's. A [`Resident`] is never dropped while the
//! runtime's table is locked (its `Drop` takes that lock).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::bindings::wasm_infer::model::accel::{AccelError, BudgetRefusal};

use super::{device_free_memory, Accel};

/// Most weights one loaded model may bind (MiniLM binds 72): bounds the names table a guest
/// can grow across runs. Its bytes are bounded by the model's resident budget.
pub const MAX_RESIDENTS: usize = 4096;

/// Longest name a guest may give a resident weight, in bytes. The names table lives as long as
/// the model and no run's limit charges it, so each entry's size is bounded here: at most
/// [`MAX_RESIDENTS`] x 256 bytes per model.
pub const MAX_RESIDENT_NAME_BYTES: usize = 256;

/// Default resident budget of one loaded model: 256 MiB (MiniLM binds 42,587,136 bytes).
pub const DEFAULT_RESIDENT_MEMORY: u64 = 256 << 20;

/// One weight on the device, shared read-only.
pub(crate) struct Resident {
    pub(crate) tensor: Tensor,
    pub(crate) bytes: u64,
    digest: [u8; 32],
    accel: Arc<Accel>,
}

impl Drop for Resident {
    fn drop(&mut self) {
        self.accel
            .resident_bytes
            .fetch_sub(self.bytes, Ordering::SeqCst);
        let mut live = self
            .accel
            .residents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A racing bind may already have replaced this entry with a live copy: keep that one.
        if live
            .get(&self.digest)
            .is_some_and(|w| w.strong_count() == 0)
        {
            live.remove(&self.digest);
        }
    }
}

/// Why binding a resident weight failed: a budget refusal (for the run's account to record) or
/// any other answer for the guest.
pub(crate) enum BindError {
    Budget(BudgetRefusal),
    Other(AccelError),
}

/// The weights one loaded model has bound, by the names its guest gave them, and what they
/// cost its resident budget.
pub(crate) struct ModelWeights {
    names: Mutex<Names>,
    /// The model's resident budget, in bytes.
    budget: u64,
}

#[derive(Default)]
struct Names {
    bound: HashMap<String, Arc<Resident>>,
    /// Bytes of every name bound (by rule: a weight shared with another model counts whole).
    bytes: u64,
}

impl Default for ModelWeights {
    fn default() -> Self {
        Self::new(DEFAULT_RESIDENT_MEMORY)
    }
}

impl ModelWeights {
    /// An empty table with a resident budget of `budget` bytes.
    pub(crate) fn new(budget: u64) -> Self {
        Self {
            names: Mutex::default(),
            budget,
        }
    }

    /// `(bound, budget)`: the bytes of the names bound, and the model's resident budget.
    pub(crate) fn figures(&self) -> (u64, u64) {
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        (names.bytes, self.budget)
    }

    /// The weight bound to `name`, binding it to `data` (little-endian f32, `dims`) if the
    /// name is new and fits the model's resident budget (refused with the model's figures
    /// otherwise, nothing bound). `data` is read only then, so a run that names a bound weight
    /// costs the host no copy and no hash.
    pub(crate) fn bind<'d>(
        &self,
        accel: &Arc<Accel>,
        device: &Device,
        name: &str,
        dims: &[usize],
        data: impl FnOnce() -> &'d [u8],
    ) -> Result<Arc<Resident>, BindError> {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bound) = names.bound.get(name) {
            if bound.tensor.dims() != dims {
                return Err(BindError::Other(AccelError::ReadOnly(format!(
                    "resident {name:?} is bound to shape {:?}, not {dims:?}",
                    bound.tensor.dims()
                ))));
            }
            return Ok(bound.clone());
        }
        if names.bound.len() >= MAX_RESIDENTS {
            return Err(BindError::Other(AccelError::InvalidArgument(format!(
                "a model may bind at most {MAX_RESIDENTS} resident weights"
            ))));
        }
        let bytes = dims.iter().product::<usize>() as u64 * 4;
        if names.bytes.saturating_add(bytes) > self.budget {
            return Err(BindError::Budget(BudgetRefusal {
                requested: bytes,
                used: names.bytes,
                budget: self.budget,
            }));
        }
        let resident = accel.resident(device, dims, data())?;
        names.bound.insert(name.to_string(), resident.clone());
        names.bytes += bytes;
        Ok(resident)
    }
}

impl Accel {
    /// The live copy of `data` (shape `dims`), or a new one (counted in `resident_bytes`, not
    /// in the pool runs draw on: the binding model's budget has paid for it).
    fn resident(
        self: &Arc<Self>,
        device: &Device,
        dims: &[usize],
        data: &[u8],
    ) -> Result<Arc<Resident>, BindError> {
        let digest = content_digest(dims, data);
        let mut live = self
            .residents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(resident) = live.get(&digest).and_then(|w| w.upgrade()) {
            return Ok(resident);
        }
        let bytes = data.len() as u64;
        if let Some(free) = device_free_memory(device) {
            if bytes > free {
                return Err(BindError::Other(AccelError::DeviceFailure(format!(
                    "the device has {free} bytes free, {bytes} requested"
                ))));
            }
        }
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let tensor = Tensor::from_vec(values, dims, device)
            .map_err(|e| BindError::Other(super::failure(e)))?;
        let total = self.resident_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.resident_peak.fetch_max(total, Ordering::SeqCst);
        let resident = Arc::new(Resident {
            tensor,
            bytes,
            digest,
            accel: self.clone(),
        });
        live.insert(digest, Arc::downgrade(&resident));
        Ok(resident)
    }
}

/// SHA-256 of the shape (each dimension as a little-endian u64) and the data.
fn content_digest(dims: &[usize], data: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update((dims.len() as u64).to_le_bytes());
    for &d in dims {
        hash.update((d as u64).to_le_bytes());
    }
    hash.update(data);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::AccelMode;

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn one_copy_per_content_freed_with_the_last_model() {
        let accel = Arc::new(Accel::new(AccelMode::Cpu, 1 << 20).unwrap());
        let (a, b) = (ModelWeights::default(), ModelWeights::default());
        let data = bytes(&[1.0, 2.0, 3.0, 4.0]);
        let other = bytes(&[5.0, 6.0, 7.0, 8.0]);
        let cpu = Device::Cpu;
        let wa = a.bind(&accel, &cpu, "w", &[2, 2], || &data).ok().unwrap();
        // The same content under another model's name: the same copy.
        let wb = b.bind(&accel, &cpu, "x", &[2, 2], || &data).ok().unwrap();
        assert!(Arc::ptr_eq(&wa, &wb));
        assert_eq!(accel.usage().resident, 16);
        // A bound name ignores the data it is given again: a run cannot rebind it.
        let again = a.bind(&accel, &cpu, "w", &[2, 2], || &other).ok().unwrap();
        assert!(Arc::ptr_eq(&wa, &again));
        assert!(matches!(
            a.bind(&accel, &cpu, "w", &[4], || &data),
            Err(BindError::Other(AccelError::ReadOnly(_)))
        ));
        // Other content is another copy.
        let _wo = b.bind(&accel, &cpu, "o", &[4], || &other).ok().unwrap();
        assert_eq!(accel.usage().resident, 32);
        drop((wa, wb, again, _wo));
        drop(a);
        assert_eq!(accel.usage().resident, 32, "model b still holds both");
        drop(b);
        assert_eq!(accel.usage().resident, 0);
        assert!(accel.residents.lock().unwrap().is_empty());
    }

    #[test]
    fn a_bind_past_the_models_budget_is_refused_and_the_runs_pool_is_untouched() {
        // A host-wide budget of 8 bytes for runs: residents never draw on it.
        let accel = Arc::new(Accel::new(AccelMode::Cpu, 8).unwrap());
        let weights = ModelWeights::new(40);
        let other = ModelWeights::new(40);
        let (three, four) = (bytes(&[1.0, 2.0, 3.0]), bytes(&[4.0, 5.0, 6.0, 7.0]));
        weights
            .bind(&accel, &Device::Cpu, "a", &[3], || &three)
            .ok()
            .unwrap();
        // Shared content still counts whole against the second model's budget.
        other
            .bind(&accel, &Device::Cpu, "b", &[3], || &three)
            .ok()
            .unwrap();
        assert_eq!((weights.figures(), other.figures()), ((12, 40), (12, 40)));
        weights
            .bind(&accel, &Device::Cpu, "c", &[4], || &four)
            .ok()
            .unwrap();
        match weights.bind(&accel, &Device::Cpu, "d", &[4], || &four) {
            Err(BindError::Budget(refusal)) => assert_eq!(
                refusal,
                BudgetRefusal {
                    requested: 16,
                    used: 28,
                    budget: 40
                }
            ),
            _ => panic!("expected a budget refusal"),
        }
        assert_eq!(weights.figures(), (28, 40), "nothing bound");
        let usage = accel.usage();
        assert_eq!((usage.used, usage.peak, usage.resident), (0, 0, 28));
    }
}
