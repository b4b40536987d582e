//! The memory limiter: caps a run's total linear memory and table elements, and the number of
//! instances, memories and tables its component may create (the same caps the pooling
//! allocator is configured with, from `limits.rs`).

use crate::attribution::Attribution;
use crate::error::LimitExceeded;
use crate::limits::{MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES, MAX_TABLE_ELEMENTS};

/// Caps the *total* linear memory of all the guest's memories and records every refusal with
/// the run's [`Attribution`], so that a run whose allocator turns a refused `memory.grow` into a
/// trap is reported as a memory-limit trip, with the size it asked for.
pub(crate) struct MemoryLimiter {
    limit: u64,
    total: u64,
    pub(crate) peak: u64,
    /// The growth last allowed, taken back if the grow then fails anyway.
    last_growth: u64,
    table_elements: u64,
    attribution: Attribution,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: u64, attribution: Attribution) -> Self {
        Self {
            limit,
            total: 0,
            peak: 0,
            last_growth: 0,
            table_elements: 0,
            attribution,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let requested = self.total.saturating_add((desired - current) as u64);
        if requested > self.limit {
            self.attribution.refused(LimitExceeded::Memory {
                limit: self.limit,
                requested,
            });
            return Ok(false);
        }
        self.last_growth = requested - self.total;
        self.total = requested;
        self.peak = self.peak.max(requested);
        self.attribution.granted();
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Growth we allowed but the OS or the memory's own maximum refused: nothing was added.
        self.total -= std::mem::take(&mut self.last_growth);
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let requested = self
            .table_elements
            .saturating_add((desired - current) as u64);
        if requested > MAX_TABLE_ELEMENTS {
            self.attribution.refused(LimitExceeded::Table {
                limit: MAX_TABLE_ELEMENTS,
                requested,
            });
            return Ok(false);
        }
        self.table_elements = requested;
        self.attribution.granted();
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES as usize
    }
    fn tables(&self) -> usize {
        MAX_TABLES as usize
    }
    fn memories(&self) -> usize {
        MAX_MEMORIES as usize
    }
}
