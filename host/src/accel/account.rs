//! One run's device account: charged before every allocation, refunded when the guest drops a
//! tensor, and emptied back into the host-wide pool when the run's store is dropped.

use std::sync::Arc;

use crate::attribution::Attribution;
use crate::bindings::wasm_infer::model::accel::{AccelError, BudgetRefusal};
use crate::error::LimitExceeded;

use super::{device_free_memory, Accel};

/// One run's device account; returns everything it still holds to the pool when dropped.
pub(crate) struct RunDevice {
    pub(super) accel: Arc<Accel>,
    pub(super) budget: u64,
    pub(crate) used: u64,
    pub(crate) peak: u64,
    pub(crate) uploaded: u64,
    pub(crate) downloaded: u64,
    pub(crate) ops: u64,
    pub(crate) refusals: u64,
    /// Where refusals and grants are recorded, for classifying a run that then fails.
    attribution: Attribution,
}

impl RunDevice {
    pub(crate) fn new(accel: Arc<Accel>, budget: u64, attribution: Attribution) -> Self {
        Self {
            accel,
            budget,
            used: 0,
            peak: 0,
            uploaded: 0,
            downloaded: 0,
            ops: 0,
            refusals: 0,
            attribution,
        }
    }

    /// Charges `bytes` to this run and to the pool, or refuses (nothing charged).
    pub(super) fn alloc(&mut self, bytes: u64) -> Result<(), AccelError> {
        let refusal = if self.used.saturating_add(bytes) > self.budget {
            Some(BudgetRefusal {
                requested: bytes,
                used: self.used,
                budget: self.budget,
            })
        } else {
            self.accel.pool.reserve(bytes).err()
        };
        if let Some(refusal) = refusal {
            self.refusals += 1;
            self.attribution.refused(LimitExceeded::DeviceMemory {
                requested: refusal.requested,
                used: refusal.used,
                budget: refusal.budget,
            });
            return Err(AccelError::BudgetExceeded(refusal));
        }
        if let Some(free) = self.accel.device.as_ref().and_then(device_free_memory) {
            if bytes > free {
                self.accel.pool.release(bytes);
                return Err(AccelError::DeviceFailure(format!(
                    "the device has {free} bytes free, {bytes} requested"
                )));
            }
        }
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        self.attribution.granted();
        Ok(())
    }

    pub(super) fn free(&mut self, bytes: u64) {
        self.used -= bytes;
        self.accel.pool.release(bytes);
    }
}

impl Drop for RunDevice {
    fn drop(&mut self) {
        self.accel.pool.release(self.used);
    }
}
