//! The generic cell rate algorithm: one reservation and one refund as pure arithmetic over a
//! key's stored theoretical arrival time (see the [module](super) docs), shared by the
//! in-process store, the per-peer limits and, in Lua, the Redis store (`gcra.lua`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Decision, Quota};

const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// Comparisons of accumulated TATs allow this much rounding (in microseconds): `burst` single
/// units of a quota whose period is not a whole number of microseconds (3/s: 333333.33 µs) add
/// up to the tolerance give or take a last bit, and must all be admitted.
const ROUNDING_SLACK_MICROS: f64 = 1e-3;

/// How long one unit of `quota` occupies, in microseconds.
fn unit_micros(quota: Quota) -> f64 {
    MICROS_PER_SECOND / quota.per_second
}

fn micros_to_duration(micros: f64) -> Duration {
    if micros <= ROUNDING_SLACK_MICROS {
        Duration::ZERO
    } else {
        Duration::from_micros((micros - ROUNDING_SLACK_MICROS).ceil() as u64)
    }
}

/// Units that fit now when the TAT is `ahead` microseconds past now.
fn remaining_units(quota: Quota, ahead: f64) -> u64 {
    let tolerance = quota.burst as f64 * unit_micros(quota);
    // A millionth of a unit of slack: enough for the rounding of accumulated TATs, never a
    // whole unit even when a unit is a nanosecond of a fuel quota.
    let free = ((tolerance - ahead) / unit_micros(quota) + 1e-6).floor();
    (free.max(0.0) as u64).min(quota.burst)
}

/// One GCRA reservation: from the stored TAT (`None`: a new or expired key) and now, the
/// decision and, when admitted, the TAT to store.
pub fn gcra_reserve(
    quota: Quota,
    tat: Option<f64>,
    now: f64,
    cost: u64,
) -> (Decision, Option<f64>) {
    let unit = unit_micros(quota);
    let tolerance = quota.burst as f64 * unit;
    let tat = tat.map_or(now, |tat| tat.max(now));
    let new_tat = tat + cost as f64 * unit;
    let over = new_tat - now - tolerance;
    if over > ROUNDING_SLACK_MICROS {
        let retry_after = (cost <= quota.burst).then(|| micros_to_duration(over));
        let decision = Decision::Limited {
            retry_after,
            remaining: remaining_units(quota, tat - now),
            reset: micros_to_duration(tat - now),
        };
        (decision, None)
    } else {
        let decision = Decision::Allowed {
            remaining: remaining_units(quota, new_tat - now),
            reset: micros_to_duration(new_tat - now),
        };
        (decision, Some(new_tat))
    }
}

/// One GCRA refund: the TAT to store (`None`: the quota is full, the key can go).
pub fn gcra_refund(quota: Quota, tat: Option<f64>, now: f64, cost: u64) -> Option<f64> {
    let unit = unit_micros(quota);
    let refunded = tat? - cost.min(quota.burst) as f64 * unit;
    (refunded > now + ROUNDING_SLACK_MICROS).then_some(refunded)
}

/// A source of microseconds (monotonic for the in-process store; tests inject their own).
pub type Clock = Arc<dyn Fn() -> f64 + Send + Sync>;

/// A clock in microseconds since it was made.
pub fn monotonic_clock() -> Clock {
    let start = Instant::now();
    Arc::new(move || start.elapsed().as_micros() as f64)
}
