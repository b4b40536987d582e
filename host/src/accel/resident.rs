//! Resident weights: read-only device tensors shared by every run of the models that bind them.
//!
//! Two tables: a loaded model's [`ModelWeights`] maps the names its guest chose to the weights
//! it bound (so a run reaches only its own model's weights, by name), and the runtime's table
//! maps a content digest to the one physical copy (so models with the same weights, or runs
//! racing to bind the first time, share it). A [`Resident`] holds its bytes in the host-wide
//! pool until the last holder (a model's table, a run's handle) drops it.
//!
//! Lock order: a model's table, then the runtime's. A [`Resident`] is never dropped while the
//! runtime's table is locked (its `Drop` takes that lock).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::bindings::wasm_infer::model::accel::{AccelError, BudgetRefusal};

use super::{device_free_memory, Accel};

/// Most weights one loaded model may bind (MiniLM binds 72): bounds the names table a guest
/// can grow across runs. Its bytes are bounded by the host-wide device budget.
pub const MAX_RESIDENTS: usize = 4096;

/// Longest name a guest may give a resident weight, in bytes. The names table lives as long as
/// the model and no run's limit charges it, so each entry's size is bounded here: at most
/// [`MAX_RESIDENTS`] x 256 bytes per model.
pub const MAX_RESIDENT_NAME_BYTES: usize = 256;

/// One weight on the device, shared read-only.
pub(crate) struct Resident {
    pub(crate) tensor: Tensor,
    pub(crate) bytes: u64,
    digest: [u8; 32],
    accel: Arc<Accel>,
}

impl Drop for Resident {
    fn drop(&mut self) {
        self.accel.pool.release(self.bytes);
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

/// The weights one loaded model has bound, by the names its guest gave them.
#[derive(Default)]
pub(crate) struct ModelWeights {
    names: Mutex<HashMap<String, Arc<Resident>>>,
}

impl ModelWeights {
    /// The weight bound to `name`, binding it to `data` (little-endian f32, `dims`) if the
    /// name is new. `data` is read only then, so a run that names a bound weight costs the
    /// host no copy and no hash.
    pub(crate) fn bind<'d>(
        &self,
        accel: &Arc<Accel>,
        device: &Device,
        name: &str,
        dims: &[usize],
        data: impl FnOnce() -> &'d [u8],
    ) -> Result<Arc<Resident>, BindError> {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bound) = names.get(name) {
            if bound.tensor.dims() != dims {
                return Err(BindError::Other(AccelError::ReadOnly(format!(
                    "resident {name:?} is bound to shape {:?}, not {dims:?}",
                    bound.tensor.dims()
                ))));
            }
            return Ok(bound.clone());
        }
        if names.len() >= MAX_RESIDENTS {
            return Err(BindError::Other(AccelError::InvalidArgument(format!(
                "a model may bind at most {MAX_RESIDENTS} resident weights"
            ))));
        }
        let resident = accel.resident(device, dims, data())?;
        names.insert(name.to_string(), resident.clone());
        Ok(resident)
    }
}

impl Accel {
    /// The live copy of `data` (shape `dims`), or a new one charged to the host-wide pool.
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
        self.pool.reserve(bytes).map_err(BindError::Budget)?;
        let release = |e: AccelError| {
            self.pool.release(bytes);
            BindError::Other(e)
        };
        if let Some(free) = device_free_memory(device) {
            if bytes > free {
                return Err(release(AccelError::DeviceFailure(format!(
                    "the device has {free} bytes free, {bytes} requested"
                ))));
            }
        }
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let tensor =
            Tensor::from_vec(values, dims, device).map_err(|e| release(super::failure(e)))?;
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
        assert_eq!(accel.usage().used, 16);
        // A bound name ignores the data it is given again: a run cannot rebind it.
        let again = a.bind(&accel, &cpu, "w", &[2, 2], || &other).ok().unwrap();
        assert!(Arc::ptr_eq(&wa, &again));
        assert!(matches!(
            a.bind(&accel, &cpu, "w", &[4], || &data),
            Err(BindError::Other(AccelError::ReadOnly(_)))
        ));
        // Other content is another copy.
        let _wo = b.bind(&accel, &cpu, "o", &[4], || &other).ok().unwrap();
        assert_eq!(accel.usage().used, 32);
        drop((wa, wb, again, _wo));
        drop(a);
        assert_eq!(accel.usage().used, 32, "model b still holds both");
        drop(b);
        assert_eq!(accel.usage().used, 0);
        assert!(accel.residents.lock().unwrap().is_empty());
    }

    #[test]
    fn a_resident_past_the_host_wide_budget_is_refused_before_allocating() {
        let accel = Arc::new(Accel::new(AccelMode::Cpu, 8).unwrap());
        let weights = ModelWeights::default();
        let data = bytes(&[1.0, 2.0, 3.0]);
        match weights.bind(&accel, &Device::Cpu, "w", &[3], || &data) {
            Err(BindError::Budget(refusal)) => assert_eq!(
                refusal,
                BudgetRefusal {
                    requested: 12,
                    used: 0,
                    budget: 8
                }
            ),
            _ => panic!("expected a budget refusal"),
        }
        assert_eq!(accel.usage().used, 0);
    }
}
