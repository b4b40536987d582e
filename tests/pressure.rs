//! Limits that tighten under memory pressure, end to end: a fake pressure source drives a real
//! runtime; the granted memory ceiling is the one a run trips at, refusals are typed and cost
//! nothing, and runs are whole again when the pressure goes.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{assert_golden, hostile_wasm, limit, text};
use wasm_infer::pressure::{AdmissionConfig, PressureSource};
use wasm_infer::{Error, LimitExceeded, Limits, Model, Runtime, RuntimeConfig};

struct Fake(AtomicU64);

impl PressureSource for Fake {
    fn pressure(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::SeqCst))
    }
}

fn setup() -> (Arc<Fake>, Model) {
    let fake = Arc::new(Fake(AtomicU64::new(0f64.to_bits())));
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(support::cache_dir()),
        admission: Some(AdmissionConfig {
            source: fake.clone(),
            max_concurrent: 4,
            start: 10.0,
            refuse: 40.0,
            min_memory: 64 << 20,
            retry_after: Duration::from_secs(2),
            memory_budget: None,
        }),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let model = Model::load(&runtime, hostile_wasm()).unwrap();
    (fake, model)
}

#[test]
fn under_pressure_a_run_is_granted_a_lower_memory_ceiling_and_trips_at_it() {
    let (fake, model) = setup();
    fake.0.store(25f64.to_bits(), Ordering::SeqCst);
    let asked = 1u64 << 30;
    let granted = asked - (asked - (64 << 20)) / 2;
    match limit(model.run(text("grow"), &Limits::default().memory(asked))) {
        LimitExceeded::Memory { limit, .. } => assert_eq!(limit, granted),
        other => panic!("expected a memory trip, got {other:?}"),
    }
}

#[test]
fn past_the_refusal_level_a_run_is_overloaded_with_a_retry_hint_and_costs_nothing() {
    let (fake, model) = setup();
    fake.0.store(45f64.to_bits(), Ordering::SeqCst);
    let failure = model
        .run(text("work:1000"), &Limits::default())
        .unwrap_err();
    match failure.error {
        Error::Overloaded {
            pressure,
            retry_after,
        } => {
            assert_eq!(pressure, 45.0);
            assert_eq!(retry_after, Duration::from_secs(2));
        }
        other => panic!("expected Overloaded, got {other}"),
    }
    assert_eq!(failure.kind(), wasm_infer::ErrorKind::Overloaded);
    assert_eq!(failure.usage.fuel_consumed, 0);
    // The pressure goes: the same run is admitted, whole, with its golden fuel.
    fake.0.store(0f64.to_bits(), Ordering::SeqCst);
    let outcome = model.run(text("work:1000"), &Limits::default()).unwrap();
    assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
}
