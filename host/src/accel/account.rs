//! One run's device account: charged before every allocation, refunded when the guest drops a
//! tensor, and emptied back into the host-wide pool when the run's store is dropped.
//!
//! `used` (what the run's budget and usage see) counts a resident weight by rule, whether or not
//! it was already on the device; `pooled` counts what this run holds in the host-wide pool
//! itself (its own tensors, not the shared residents).

use std::sync::Arc;

use crate::attribution::Attribution;
use crate::bindings::wasm_infer::model::accel::{AccelError, BudgetRefusal};
use crate::error::LimitExceeded;

use super::{device_free_memory, Accel, ModelWeights};

/// One run's device account; returns everything it still holds to the pool when dropped.
pub(crate) struct RunDevice {
    pub(super) accel: Arc<Accel>,
    pub(super) budget: u64,
    /// The accelerator is hidden from this run ([`crate::DeviceAccess::Hidden`]).
    pub(super) hidden: bool,
    pub(crate) used: u64,
    /// Bytes this run holds in the host-wide pool (returned when the run ends).
    pooled: u64,
    /// The loaded model's resident weights (a run of no model gets a table of its own).
    pub(super) weights: Arc<ModelWeights>,
    pub(crate) peak: u64,
    pub(crate) uploaded: u64,
    pub(crate) downloaded: u64,
    pub(crate) ops: u64,
    pub(crate) refusals: u64,
    /// Calls stopped part-way at the run's deadline.
    pub(crate) interrupted: u64,
    /// Where refusals and grants are recorded, for classifying a run that then fails.
    attribution: Attribution,
}

impl RunDevice {
    /// Gives this run the loaded model's resident weights (before it is instantiated), so
    /// that its uploads of them share the model's one copy on the device.
    pub(crate) fn share_weights(&mut self, weights: Arc<ModelWeights>) {
        self.weights = weights;
    }

    pub(crate) fn new(
        accel: Arc<Accel>,
        budget: u64,
        hidden: bool,
        attribution: Attribution,
    ) -> Self {
        Self {
            accel,
            budget,
            hidden,
            used: 0,
            pooled: 0,
            weights: Arc::default(),
            peak: 0,
            uploaded: 0,
            downloaded: 0,
            ops: 0,
            refusals: 0,
            interrupted: 0,
            attribution,
        }
    }

    /// Charges `bytes` to this run and to the pool, or refuses (nothing charged).
    pub(super) fn alloc(&mut self, bytes: u64) -> Result<(), AccelError> {
        if let Some(refusal) = self.over_budget(bytes) {
            return Err(self.refuse(refusal));
        }
        if let Err(refusal) = self.accel.pool.reserve(bytes) {
            return Err(self.refuse(refusal));
        }
        if let Some(free) = self.accel.device.as_ref().and_then(device_free_memory) {
            if bytes > free {
                self.accel.pool.release(bytes);
                return Err(AccelError::DeviceFailure(format!(
                    "the device has {free} bytes free, {bytes} requested"
                )));
            }
        }
        self.pooled += bytes;
        self.grant(bytes);
        Ok(())
    }

    /// Charges `bytes` of a resident weight to this run only (the pool holds the weight's
    /// one copy), or refuses: the same figures whether or not the weight was resident.
    pub(super) fn alloc_by_rule(&mut self, bytes: u64) -> Result<(), AccelError> {
        if let Some(refusal) = self.over_budget(bytes) {
            return Err(self.refuse(refusal));
        }
        self.grant(bytes);
        Ok(())
    }

    fn over_budget(&self, bytes: u64) -> Option<BudgetRefusal> {
        (self.used.saturating_add(bytes) > self.budget).then_some(BudgetRefusal {
            requested: bytes,
            used: self.used,
            budget: self.budget,
        })
    }

    fn grant(&mut self, bytes: u64) {
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        self.attribution.granted();
    }

    /// Records a refusal (for the usage and for classifying a run that then fails).
    pub(super) fn refuse(&mut self, refusal: BudgetRefusal) -> AccelError {
        self.refusals += 1;
        self.attribution.refused(LimitExceeded::DeviceMemory {
            requested: refusal.requested,
            used: refusal.used,
            budget: refusal.budget,
        });
        AccelError::BudgetExceeded(refusal)
    }

    /// Returns `bytes` of a tensor the guest dropped (`pooled`: one of this run's own).
    pub(super) fn free(&mut self, bytes: u64, pooled: bool) {
        self.used -= bytes;
        if pooled {
            self.pooled -= bytes;
            self.accel.pool.release(bytes);
        }
    }
}

impl Drop for RunDevice {
    fn drop(&mut self) {
        self.accel.pool.release(self.pooled);
    }
}
