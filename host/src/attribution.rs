//! Which refusal, if any, caused a failed run.
//!
//! The memory limiter and the device account refuse growth without failing the run: the guest
//! sees `-1` from `memory.grow`, or `budget-exceeded` from an accelerator call, and may carry
//! on (retry smaller, fall back to the sandbox). Whether a later failure was *caused* by a
//! refusal therefore depends on what happened in between. The rule, kept here for every
//! account of a run: a refusal is the cause of a failure only if no growth or allocation was
//! granted after it. A guest that was granted memory, table elements or device memory after a
//! refusal had handled it, and a later trap is its own. Of several refusals with no grant
//! between them, the first is the cause (an allocator that aborts may ask again on its way
//! down; the figure that matters is the one that failed first).

use std::sync::{Arc, Mutex};

use crate::error::LimitExceeded;

/// The order of one run's refusals and grants, shared by its accounts (cheap to clone).
#[derive(Clone, Default)]
pub(crate) struct Attribution {
    inner: Arc<Mutex<Ledger>>,
}

#[derive(Default)]
struct Ledger {
    /// The first refusal since the last grant, and whether a grant came after it.
    last_refusal: Option<LimitExceeded>,
    granted_since: bool,
}

impl Attribution {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a refused growth or allocation, as the limit it would have crossed.
    pub(crate) fn refused(&self, limit: LimitExceeded) {
        let mut ledger = self.ledger();
        if ledger.last_refusal.is_none() || ledger.granted_since {
            ledger.last_refusal = Some(limit);
            ledger.granted_since = false;
        }
    }

    /// Records a granted growth or allocation: whatever was refused before is handled.
    pub(crate) fn granted(&self) {
        self.ledger().granted_since = true;
    }

    /// The refusal that stands as the cause of a failure: the last one, unless a grant
    /// followed it.
    pub(crate) fn cause(&self) -> Option<LimitExceeded> {
        let ledger = self.ledger();
        match (&ledger.last_refusal, ledger.granted_since) {
            (Some(limit), false) => Some(limit.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(requested: u64) -> LimitExceeded {
        LimitExceeded::Memory {
            limit: 10,
            requested,
        }
    }

    #[test]
    fn the_first_refusal_since_the_last_grant_is_the_cause() {
        let a = Attribution::default();
        assert_eq!(a.cause(), None);
        a.granted();
        a.refused(memory(11));
        assert_eq!(a.cause(), Some(memory(11)));
        a.granted();
        assert_eq!(a.cause(), None);
        a.refused(memory(12));
        a.refused(memory(13));
        assert_eq!(
            a.cause(),
            Some(memory(12)),
            "the first of a run of refusals"
        );
    }
}
