//! The GCRA state in this process: the `memory` backend, and the fallback of a failing
//! backend under `on_backend_error = "open"`.

use std::collections::HashMap;
use std::sync::Mutex;

use super::gcra::{gcra_refund, gcra_reserve, monotonic_clock, Clock};
use super::{BackendError, Charge, Decision, RateStore};

/// Below this many keys the in-process store never sweeps; above, it sweeps when the map has
/// doubled since the last sweep, so sweeping costs O(1) per reservation amortised.
const SWEEP_MIN_KEYS: usize = 1024;

/// The GCRA state in this process.
pub struct MemoryStore {
    clock: Clock,
    state: Mutex<MemoryState>,
}

struct MemoryState {
    tats: HashMap<String, f64>,
    sweep_at: usize,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::with_clock(monotonic_clock())
    }

    pub fn with_clock(clock: Clock) -> MemoryStore {
        MemoryStore {
            clock,
            state: Mutex::new(MemoryState {
                tats: HashMap::new(),
                sweep_at: SWEEP_MIN_KEYS,
            }),
        }
    }

    /// Keys held (a full quota holds none once swept).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().tats.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // The state is a map of plain numbers, valid after any panic in another holder.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    fn reserve_now(&self, key: &str, quota: super::Quota, cost: u64) -> Decision {
        let mut decisions = self.reserve_all_now(&[Charge::new(key, quota, cost)]);
        decisions.pop().expect("one decision per charge")
    }

    /// [`RateStore::reserve_all`] under one lock: every charge decided against the same now,
    /// stored only when all admit.
    pub(super) fn reserve_all_now(&self, charges: &[Charge]) -> Vec<Decision> {
        let now = (self.clock)();
        let mut state = self.lock();
        let decided: Vec<(Decision, Option<f64>)> = charges
            .iter()
            .map(|c| gcra_reserve(c.quota, state.tats.get(&c.key).copied(), now, c.cost))
            .collect();
        let admitted = decided.iter().all(|(decision, _)| decision.is_allowed());
        let decisions = decided
            .into_iter()
            .zip(charges)
            .map(|((decision, new_tat), charge)| match new_tat {
                Some(new_tat) if admitted => {
                    state.tats.insert(charge.key.clone(), new_tat);
                    decision
                }
                // Admitted alone but not reserved: what is left now, as a reservation of
                // nothing answers it.
                Some(_) => {
                    let tat = state.tats.get(&charge.key).copied();
                    gcra_reserve(charge.quota, tat, now, 0).0
                }
                None => decision,
            })
            .collect();
        if state.tats.len() >= state.sweep_at {
            // Idle keys (TAT in the past: the quota is full) carry no information.
            state.tats.retain(|_, tat| *tat > now);
            state.sweep_at = (state.tats.len() * 2).max(SWEEP_MIN_KEYS);
        }
        decisions
    }

    #[cfg(test)]
    fn refund_now(&self, key: &str, quota: super::Quota, cost: u64) {
        self.refund_all_now(&[Charge::new(key, quota, cost)]);
    }

    /// [`RateStore::refund_all`] under one lock.
    pub(super) fn refund_all_now(&self, charges: &[Charge]) {
        let now = (self.clock)();
        let mut state = self.lock();
        for Charge { key, quota, cost } in charges {
            match gcra_refund(*quota, state.tats.get(key).copied(), now, *cost) {
                Some(tat) => state.tats.insert(key.clone(), tat),
                None => state.tats.remove(key),
            };
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

#[async_trait::async_trait]
impl RateStore for MemoryStore {
    async fn reserve_all(&self, charges: &[Charge]) -> Result<Vec<Decision>, BackendError> {
        Ok(self.reserve_all_now(charges))
    }

    async fn refund_all(&self, charges: &[Charge]) -> Result<(), BackendError> {
        self.refund_all_now(charges);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::super::{all_allowed, Quota};
    use super::*;

    /// A clock the test moves by hand, in microseconds.
    fn manual_clock() -> (Clock, Arc<Mutex<f64>>) {
        let now = Arc::new(Mutex::new(0.0));
        let read = now.clone();
        (Arc::new(move || *read.lock().unwrap()), now)
    }

    fn advance(now: &Mutex<f64>, by: Duration) {
        *now.lock().unwrap() += by.as_micros() as f64;
    }

    const TEN_PER_SECOND_BURST_5: Quota = Quota {
        per_second: 10.0,
        burst: 5,
    };

    fn reserve(store: &MemoryStore, cost: u64) -> Decision {
        store.reserve_now("t:requests", TEN_PER_SECOND_BURST_5, cost)
    }

    #[test]
    fn burst_passes_and_the_next_waits_exactly_one_period() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        for n in 1..=5u64 {
            assert_eq!(
                reserve(&store, 1),
                Decision::Allowed {
                    remaining: 5 - n,
                    reset: Duration::from_millis(100 * n),
                }
            );
        }
        assert_eq!(
            reserve(&store, 1),
            Decision::Limited {
                retry_after: Some(Duration::from_millis(100)),
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
    }

    #[test]
    fn waiting_the_retry_after_admits_exactly_one_more() {
        let (clock, now) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        for _ in 0..5 {
            assert!(reserve(&store, 1).is_allowed());
        }
        advance(&now, Duration::from_micros(99_999));
        assert_eq!(
            reserve(&store, 1),
            Decision::Limited {
                retry_after: Some(Duration::from_micros(1)),
                remaining: 0,
                reset: Duration::from_micros(400_001),
            }
        );
        advance(&now, Duration::from_micros(1));
        assert_eq!(
            reserve(&store, 1),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert!(!reserve(&store, 1).is_allowed());
    }

    #[test]
    fn cost_weighs_the_reservation() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        assert_eq!(
            reserve(&store, 3),
            Decision::Allowed {
                remaining: 2,
                reset: Duration::from_millis(300),
            }
        );
        // 3 more do not fit until 1 unit has drained: 100 ms.
        assert_eq!(
            reserve(&store, 3),
            Decision::Limited {
                retry_after: Some(Duration::from_millis(100)),
                remaining: 2,
                reset: Duration::from_millis(300),
            }
        );
        assert!(reserve(&store, 2).is_allowed());
    }

    #[test]
    fn cost_above_the_burst_never_fits() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        assert_eq!(
            reserve(&store, 6),
            Decision::Limited {
                retry_after: None,
                remaining: 5,
                reset: Duration::ZERO,
            }
        );
        // Nothing was reserved.
        assert!(store.is_empty());
        assert!(reserve(&store, 5).is_allowed());
    }

    #[test]
    fn refund_restores_exactly_what_was_not_used() {
        let (clock, now) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        assert!(reserve(&store, 5).is_allowed());
        store.refund_now("t:requests", TEN_PER_SECOND_BURST_5, 3);
        assert_eq!(
            reserve(&store, 3),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert!(!reserve(&store, 1).is_allowed());
        // A full refund after time has passed restores the quota to full, not beyond: the
        // 200 ms that passed are not handed out twice.
        advance(&now, Duration::from_millis(200));
        store.refund_now("t:requests", TEN_PER_SECOND_BURST_5, 5);
        assert!(store.is_empty());
        assert_eq!(
            reserve(&store, 5),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert!(!reserve(&store, 1).is_allowed());
    }

    #[test]
    fn a_period_that_is_not_a_whole_microsecond_still_admits_the_whole_burst() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let quota = Quota {
            per_second: 3.0,
            burst: 3,
        };
        for n in 1..=3u64 {
            let decision = store.reserve_now("k", quota, 1);
            assert!(decision.is_allowed(), "unit {n}: {decision:?}");
        }
        assert_eq!(
            store.reserve_now("k", quota, 1),
            Decision::Limited {
                retry_after: Some(Duration::from_micros(333_334)),
                remaining: 0,
                reset: Duration::from_secs(1),
            }
        );
    }

    #[test]
    fn a_fuel_quota_admits_by_weight() {
        // 1e9 fuel/s, burst 3e9: three requests capped at 1e9 fuel, not four.
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let quota = Quota {
            per_second: 1e9,
            burst: 3_000_000_000,
        };
        for _ in 0..3 {
            assert!(store
                .reserve_now("t:fuel", quota, 1_000_000_000)
                .is_allowed());
        }
        assert_eq!(
            store.reserve_now("t:fuel", quota, 1_000_000_000),
            Decision::Limited {
                retry_after: Some(Duration::from_secs(1)),
                remaining: 0,
                reset: Duration::from_secs(3),
            }
        );
        // The run used 1e8 of its 1e9: the rest comes back at once.
        store.refund_now("t:fuel", quota, 900_000_000);
        assert_eq!(
            store.reserve_now("t:fuel", quota, 900_000_000),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_secs(3),
            }
        );
    }

    /// A request's three quotas: 1 request (burst 5), 4 tokens (burst 10), 1e9 fuel (burst 2e9).
    fn request_charges(fuel: u64) -> Vec<Charge> {
        vec![
            Charge::new("t:requests", TEN_PER_SECOND_BURST_5, 1),
            Charge::new(
                "t:tokens",
                Quota {
                    per_second: 10.0,
                    burst: 10,
                },
                4,
            ),
            Charge::new(
                "t:fuel",
                Quota {
                    per_second: 1e9,
                    burst: 2_000_000_000,
                },
                fuel,
            ),
        ]
    }

    #[test]
    fn a_request_reserves_all_its_quotas_at_once() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let decisions = store.reserve_all_now(&request_charges(1_000_000_000));
        assert!(all_allowed(&decisions));
        assert_eq!(
            decisions,
            vec![
                Decision::Allowed {
                    remaining: 4,
                    reset: Duration::from_millis(100),
                },
                Decision::Allowed {
                    remaining: 6,
                    reset: Duration::from_millis(400),
                },
                Decision::Allowed {
                    remaining: 1_000_000_000,
                    reset: Duration::from_secs(1),
                },
            ]
        );
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn a_refusal_by_one_quota_reserves_nothing_in_the_others() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        // The fuel burst (2e9) holds one request capped at 1.5e9, not two.
        assert!(all_allowed(
            &store.reserve_all_now(&request_charges(1_500_000_000))
        ));
        let refused = store.reserve_all_now(&request_charges(1_500_000_000));
        assert!(!all_allowed(&refused));
        // The quotas that would have admitted say what is left without this request.
        assert_eq!(
            refused,
            vec![
                Decision::Allowed {
                    remaining: 4,
                    reset: Duration::from_millis(100),
                },
                Decision::Allowed {
                    remaining: 6,
                    reset: Duration::from_millis(400),
                },
                Decision::Limited {
                    retry_after: Some(Duration::from_secs(1)),
                    remaining: 500_000_000,
                    reset: Duration::from_millis(1500),
                },
            ]
        );
        // Nothing was taken from the request or token quotas: 4 more requests and 1 more
        // 4-token input fit exactly as after the first.
        for n in 0..4u64 {
            assert_eq!(
                store.reserve_now("t:requests", TEN_PER_SECOND_BURST_5, 1),
                Decision::Allowed {
                    remaining: 3 - n,
                    reset: Duration::from_millis(200 + 100 * n),
                }
            );
        }
        assert!(!store
            .reserve_now("t:requests", TEN_PER_SECOND_BURST_5, 1)
            .is_allowed());
        let tokens = request_charges(0)[1].clone();
        assert_eq!(
            store.reserve_now(&tokens.key, tokens.quota, 4),
            Decision::Allowed {
                remaining: 2,
                reset: Duration::from_millis(800),
            }
        );
    }

    #[test]
    fn a_refusal_by_several_quotas_reports_each_and_reserves_nothing() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        // 5 requests fill the request quota; fuel 2e9 fills the fuel quota.
        for _ in 0..5 {
            store.reserve_now("t:requests", TEN_PER_SECOND_BURST_5, 1);
        }
        let fuel = request_charges(0)[2].clone();
        assert!(store
            .reserve_now(&fuel.key, fuel.quota, 2_000_000_000)
            .is_allowed());
        let refused = store.reserve_all_now(&request_charges(2_000_000_000));
        assert_eq!(
            refused[0],
            Decision::Limited {
                retry_after: Some(Duration::from_millis(100)),
                remaining: 0,
                reset: Duration::from_millis(500),
            }
        );
        assert_eq!(
            refused[2],
            Decision::Limited {
                retry_after: Some(Duration::from_secs(2)),
                remaining: 0,
                reset: Duration::from_secs(2),
            }
        );
        // The token quota, which admitted alone, holds no key: nothing was reserved there.
        assert!(refused[1].is_allowed());
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn one_refund_gives_back_every_charge() {
        let (clock, _) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        let charges = request_charges(2_000_000_000);
        assert!(all_allowed(&store.reserve_all_now(&charges)));
        store.refund_all_now(&charges);
        // Every quota is full again: its key is gone.
        assert!(store.is_empty());
    }

    #[test]
    fn idle_keys_are_swept() {
        let (clock, now) = manual_clock();
        let store = MemoryStore::with_clock(clock);
        for n in 0..SWEEP_MIN_KEYS - 1 {
            store.reserve_now(&format!("k{n}"), TEN_PER_SECOND_BURST_5, 1);
        }
        assert_eq!(store.len(), SWEEP_MIN_KEYS - 1);
        advance(&now, Duration::from_millis(100));
        store.reserve_now("last", TEN_PER_SECOND_BURST_5, 1);
        assert_eq!(store.len(), 1);
    }
}
