//! Admission under memory pressure: when the machine is short of memory, admit fewer
//! concurrent runs and grant each a lower memory ceiling, and refuse the rest with
//! [`Error::Overloaded`](crate::Error::Overloaded) and a retry hint, rather than let the kernel
//! OOM-kill the process and every run in it.
//!
//! The pressure reading is a trait ([`PressureSource`]) so that tests and embedders can drive
//! it; [`Psi`] reads Linux's pressure-stall information (`/proc/pressure/memory`, "some avg10":
//! the share of the last ten seconds in which some task waited for memory).
//!
//! The policy, for a reading `p` between the configured `start` and `refuse` levels: the
//! concurrency cap falls linearly from `max_concurrent` to 1, and the memory ceiling a run is
//! granted falls linearly from the caller's limit to `min_memory` (never raised above the
//! caller's). At or past `refuse`, no new run is admitted. Besides the machine's pressure, the
//! host's own accounting: with a `memory_budget`, the memory ceilings granted to the runs in
//! flight never add up to more than it. Runs already admitted are never touched: pressure
//! changes what the next run gets.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::limits::Limits;

/// A reading of memory pressure, in percent of time stalled (0-100).
pub trait PressureSource: Send + Sync {
    /// The current pressure, 0 to 100. A source that cannot read returns 0 (no pressure).
    fn pressure(&self) -> f64;
}

/// Linux pressure-stall information for memory: `some avg10` of `/proc/pressure/memory` (or a
/// cgroup's `memory.pressure`).
#[derive(Debug, Clone)]
pub struct Psi {
    path: std::path::PathBuf,
}

impl Psi {
    /// The system-wide reading, `/proc/pressure/memory`.
    pub fn system() -> Self {
        Self::at("/proc/pressure/memory")
    }

    /// The reading in the PSI file at `path`.
    pub fn at(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Whether this kernel exposes the file.
    pub fn available(&self) -> bool {
        self.path.is_file()
    }
}

/// `some avg10` from the text of a PSI file.
fn parse_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let field = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?;
    field.parse().ok()
}

impl PressureSource for Psi {
    fn pressure(&self) -> f64 {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| parse_some_avg10(&text))
            .unwrap_or(0.0)
    }
}

/// How admission reacts to pressure (see the module docs).
#[derive(Clone)]
pub struct AdmissionConfig {
    /// Where the pressure comes from.
    pub source: Arc<dyn PressureSource>,
    /// Concurrent runs admitted without pressure.
    pub max_concurrent: u32,
    /// Pressure at which the caps start to fall (default 10).
    pub start: f64,
    /// Pressure at which new runs are refused (default 40).
    pub refuse: f64,
    /// The lowest memory ceiling granted under pressure, in bytes (default 256 MiB): a run that
    /// needs more than this fails its memory limit under heavy pressure instead of pushing the
    /// machine into the OOM killer.
    pub min_memory: u64,
    /// What an `Overloaded` refusal tells the caller to wait (default 1 s).
    pub retry_after: Duration,
    /// The most memory the runs in flight may be granted together, in bytes (default `None`:
    /// only the concurrency cap). A run whose ceiling does not fit is refused, not queued.
    pub memory_budget: Option<u64>,
}

impl std::fmt::Debug for AdmissionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionConfig")
            .field("max_concurrent", &self.max_concurrent)
            .field("start", &self.start)
            .field("refuse", &self.refuse)
            .field("min_memory", &self.min_memory)
            .field("retry_after", &self.retry_after)
            .field("memory_budget", &self.memory_budget)
            .finish_non_exhaustive()
    }
}

impl AdmissionConfig {
    /// PSI-driven admission of up to `max_concurrent` runs, with the default levels.
    pub fn psi(max_concurrent: u32) -> Self {
        Self {
            source: Arc::new(Psi::system()),
            max_concurrent,
            start: DEFAULT_PRESSURE_START,
            refuse: DEFAULT_PRESSURE_REFUSE,
            min_memory: DEFAULT_MIN_MEMORY,
            retry_after: DEFAULT_RETRY_AFTER,
            memory_budget: None,
        }
    }
}

/// Pressure (percent stalled over 10 s) at which admission starts to tighten: 10.
pub const DEFAULT_PRESSURE_START: f64 = 10.0;
/// Pressure at which new runs are refused: 40, a machine that spends four tenths of its time
/// waiting for memory is close to the OOM killer.
pub const DEFAULT_PRESSURE_REFUSE: f64 = 40.0;
/// The lowest memory ceiling granted under pressure: 256 MiB.
pub const DEFAULT_MIN_MEMORY: u64 = 256 << 20;
/// The retry hint of a refusal: 1 s (PSI's shortest average is over 10 s; a second lets a
/// burst drain).
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The admission state of a runtime.
pub(crate) struct Admission {
    config: AdmissionConfig,
    in_flight: Arc<AtomicU32>,
    granted_memory: Arc<AtomicU64>,
}

/// An admitted run: holds its place, and the memory it was granted, until dropped.
pub(crate) struct Ticket {
    in_flight: Arc<AtomicU32>,
    granted_memory: Arc<AtomicU64>,
    memory: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.granted_memory.fetch_sub(self.memory, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub(crate) fn new(config: AdmissionConfig) -> Self {
        Self {
            config,
            in_flight: Arc::new(AtomicU32::new(0)),
            granted_memory: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How far between `start` (0) and `refuse` (1) the pressure is.
    fn squeeze(&self, pressure: f64) -> f64 {
        let c = &self.config;
        ((pressure - c.start) / (c.refuse - c.start)).clamp(0.0, 1.0)
    }

    /// Admits a run under `limits`, returning its place and the limits it is granted (the
    /// memory ceiling possibly lowered), or refuses it.
    pub(crate) fn admit(&self, limits: &Limits) -> Result<(Ticket, Limits), Error> {
        let c = &self.config;
        let pressure = c.source.pressure();
        let squeeze = self.squeeze(pressure);
        let overloaded = || Error::Overloaded {
            pressure,
            retry_after: c.retry_after,
        };
        if pressure >= c.refuse {
            return Err(overloaded());
        }
        let span = f64::from(c.max_concurrent.saturating_sub(1));
        let cap = c.max_concurrent - (span * squeeze).round() as u32;
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                (current < cap).then_some(current + 1)
            })
            .map_err(|_| overloaded())?;
        let mut ticket = Ticket {
            in_flight: self.in_flight.clone(),
            granted_memory: self.granted_memory.clone(),
            memory: 0,
        };
        let mut granted = limits.clone();
        let floor = c.min_memory.min(limits.memory);
        let lowered = limits.memory - ((limits.memory - floor) as f64 * squeeze) as u64;
        granted.memory = lowered.min(limits.memory);
        let budget = c.memory_budget.unwrap_or(u64::MAX);
        // Past the budget, dropping the ticket gives its place back.
        self.granted_memory
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |committed| {
                let total = committed.saturating_add(granted.memory);
                (total <= budget).then_some(total)
            })
            .map_err(|_| overloaded())?;
        ticket.memory = granted.memory;
        Ok((ticket, granted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicU64;

    /// A pressure reading a test sets.
    struct Fake(AtomicU64);

    impl Fake {
        fn set(&self, pressure: f64) {
            self.0.store(pressure.to_bits(), Ordering::SeqCst);
        }
    }

    impl PressureSource for Fake {
        fn pressure(&self) -> f64 {
            f64::from_bits(self.0.load(Ordering::SeqCst))
        }
    }

    fn admission(fake: &Arc<Fake>) -> Admission {
        Admission::new(AdmissionConfig {
            source: fake.clone(),
            max_concurrent: 5,
            start: 10.0,
            refuse: 40.0,
            min_memory: 64 << 20,
            retry_after: Duration::from_millis(1500),
            memory_budget: None,
        })
    }

    fn admitted(admission: &Admission, limits: &Limits) -> Vec<Ticket> {
        let mut held = Vec::new();
        while let Ok((ticket, _)) = admission.admit(limits) {
            held.push(ticket);
        }
        held
    }

    #[test]
    fn the_concurrency_cap_falls_with_pressure_and_comes_back() {
        let fake = Arc::new(Fake(AtomicU64::new(0f64.to_bits())));
        let admission = admission(&fake);
        let limits = Limits::default();
        let held = admitted(&admission, &limits);
        assert_eq!(held.len(), 5);
        drop(held);
        fake.set(25.0); // halfway: 5 - round(4 × 0.5) = 3
        let held = admitted(&admission, &limits);
        assert_eq!(held.len(), 3);
        // Past the cap: refused with the reading and the hint.
        match admission.admit(&limits) {
            Err(Error::Overloaded {
                pressure,
                retry_after,
            }) => {
                assert_eq!(pressure, 25.0);
                assert_eq!(retry_after, Duration::from_millis(1500));
            }
            other => panic!("expected Overloaded, got {:?}", other.map(|_| ())),
        }
        fake.set(40.0);
        drop(held);
        assert!(admitted(&admission, &limits).is_empty(), "refuse level");
        fake.set(0.0);
        assert_eq!(admitted(&admission, &limits).len(), 5);
    }

    #[test]
    fn the_memory_ceiling_granted_falls_with_pressure_and_is_never_raised() {
        let fake = Arc::new(Fake(AtomicU64::new(0f64.to_bits())));
        let admission = admission(&fake);
        let limits = Limits::default().memory(1 << 30);
        assert_eq!(admission.admit(&limits).unwrap().1.memory, 1 << 30);
        fake.set(25.0);
        // Halfway from 1 GiB down to 64 MiB.
        let halfway = (1 << 30) - ((1u64 << 30) - (64 << 20)) / 2;
        assert_eq!(admission.admit(&limits).unwrap().1.memory, halfway);
        // A caller's limit below the floor is kept, not raised.
        let small = Limits::default().memory(16 << 20);
        assert_eq!(admission.admit(&small).unwrap().1.memory, 16 << 20);
        fake.set(39.9);
        assert!(admission.admit(&limits).unwrap().1.memory < 80 << 20);
    }

    #[test]
    fn granted_memory_never_adds_up_past_the_budget() {
        let fake = Arc::new(Fake(AtomicU64::new(0f64.to_bits())));
        let mut admission = admission(&fake);
        admission.config.memory_budget = Some(3 << 30);
        let limits = Limits::default().memory(1 << 30);
        let held = admitted(&admission, &limits);
        assert_eq!(held.len(), 3, "three 1 GiB runs fit in 3 GiB");
        let smaller = Limits::default().memory(64 << 20);
        assert!(admission.admit(&smaller).is_err());
        drop(held);
        // Under pressure the ceilings are lower, so more runs fit the same budget.
        fake.set(25.0);
        assert_eq!(
            admitted(&admission, &limits).len(),
            3,
            "the concurrency cap binds now"
        );
        assert_eq!(admission.granted_memory.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn psi_text_gives_some_avg10() {
        let text = "some avg10=12.34 avg60=1.00 avg300=0.00 total=5\n\
                    full avg10=3.00 avg60=0.00 avg300=0.00 total=1\n";
        assert_eq!(parse_some_avg10(text), Some(12.34));
        assert_eq!(parse_some_avg10("garbage"), None);
    }
}
