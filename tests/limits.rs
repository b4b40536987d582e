//! Each limit, specified by the figures it trips at: the exact fuel cap, the exact memory
//! ceiling, the input and output ceilings; and that a trip does not harm the model. The
//! attacks (spinning, bombs, traps, floods, blocked host calls) are in tests/hostile.rs.

mod support;

use std::time::Duration;

use support::{assert_golden, case, cosine, hostile, limit, minilm, text};
use wasm_infer::{Error, Input, LimitExceeded, Limits, Output};

/// A good MiniLM run after a trip: the right embedding and the usual fuel figure.
fn assert_model_still_healthy() {
    let short = case("short_bench");
    let outcome = minilm()
        .run(Input::Text(short.text), &Limits::default())
        .expect("a good run after a trip");
    let vector = &outcome.output.embeddings().unwrap()[0];
    assert!(cosine(vector, &short.embedding) >= 0.9999);
    assert_golden("minilm_short_bench", outcome.usage.fuel_consumed);
}

#[test]
fn fuel_cap_is_exact_for_the_real_model() {
    let input = Input::Text(case("plain").text);
    let needed = minilm()
        .run(input.clone(), &Limits::default())
        .unwrap()
        .usage
        .fuel_consumed;
    assert_golden("minilm_plain", needed);

    let exact = minilm()
        .run(input.clone(), &Limits::default().fuel(needed))
        .expect("exactly the fuel it needs is enough");
    assert_eq!(exact.usage.fuel_consumed, needed);

    let short = limit(minilm().run(input, &Limits::default().fuel(needed - 1)));
    assert_eq!(
        short,
        LimitExceeded::Fuel {
            limit: needed - 1,
            consumed: needed
        }
    );
    assert_model_still_healthy();
}

#[test]
fn fuel_cap_is_exact_for_a_small_loop() {
    let needed = hostile()
        .run(text("work:1000"), &Limits::default())
        .unwrap()
        .usage
        .fuel_consumed;
    assert_golden("hostile_work_1000", needed);
    assert!(hostile()
        .run(text("work:1000"), &Limits::default().fuel(needed))
        .is_ok());
    assert!(matches!(
        limit(hostile().run(text("work:1000"), &Limits::default().fuel(needed - 1))),
        LimitExceeded::Fuel { limit, .. } if limit == needed - 1
    ));
}

#[test]
fn memory_ceiling_is_exact_for_the_real_model() {
    // Without the snapshot the run builds the model itself, growing its memory well past the
    // embedded weights (from a snapshot, a request fits in the image's free heap).
    let minilm = support::minilm_no_preinit;
    let input = Input::Text(case("long_truncated").text);
    let usage = minilm()
        .run(input.clone(), &Limits::default())
        .unwrap()
        .usage;
    let peak = usage.peak_memory_bytes;
    assert!(peak > usage.initial_memory_bytes, "{usage}");
    assert_golden("minilm_long_truncated_peak_memory", peak);

    let enough = minilm()
        .run(input.clone(), &Limits::default().memory(peak))
        .expect("a ceiling at the peak is enough");
    assert_eq!(enough.usage.peak_memory_bytes, peak);

    // The growth that would reach the peak is refused; the guest's allocator then aborts with
    // `unreachable`, and the run is still reported as a memory trip with the exact figures.
    let short = limit(minilm().run(input, &Limits::default().memory(peak - 1)));
    assert_eq!(
        short,
        LimitExceeded::Memory {
            limit: peak - 1,
            requested: peak
        }
    );
    assert_model_still_healthy();
}

#[test]
fn memory_ceiling_below_the_model_image_fails_at_instantiation() {
    let ceiling = 64 << 20;
    match limit(minilm().run(text("hi"), &Limits::default().memory(ceiling))) {
        LimitExceeded::Memory {
            limit: l,
            requested,
        } => {
            assert_eq!(l, ceiling);
            // The initial memory is the snapshot's: embedded weights plus the built model,
            // exactly what initialisation left behind.
            let init = &minilm().load_report().preinit.as_ref().unwrap().init;
            assert_eq!(requested, init.memory_bytes);
            assert_golden("minilm_snapshot_memory", requested);
        }
        other => panic!("expected a memory trip, got {other}"),
    }
    assert_model_still_healthy();
}

#[test]
fn oversized_input_is_refused_before_any_guest_work() {
    let input = "x".repeat(101);
    let failure = minilm()
        .run(Input::Text(input), &Limits::default().max_input(100))
        .unwrap_err();
    assert!(matches!(
        failure.error,
        Error::Limit(LimitExceeded::Input {
            limit: 100,
            size: 101
        })
    ));
    assert_eq!(failure.usage.fuel_consumed, 0);
    assert_eq!(failure.usage.peak_memory_bytes, 0);
    // A batch's size counts 8 bytes per item on top of its text: 101 + 2 × 8.
    let batch = || Input::Texts(vec!["x".repeat(60), "y".repeat(41)]);
    assert_eq!(
        limit(minilm().run(batch(), &Limits::default().max_input(116))),
        LimitExceeded::Input {
            limit: 116,
            size: 117
        }
    );
    assert!(minilm()
        .run(batch(), &Limits::default().max_input(117))
        .is_ok());
    assert!(minilm()
        .run(
            Input::Text("x".repeat(100)),
            &Limits::default().max_input(100)
        )
        .is_ok());
    assert_model_still_healthy();
}

#[test]
fn oversized_output_is_withheld() {
    let limits = Limits::default().max_output(1000);
    let ok = hostile().run(text("bytes:1000"), &limits).unwrap();
    assert_eq!(ok.output, Output::Bytes(vec![7; 1000]));
    assert_eq!(ok.usage.output_bytes, 1000);
    assert_eq!(
        limit(hostile().run(text("bytes:1001"), &limits)),
        LimitExceeded::Output {
            limit: 1000,
            size: 1001,
            at_least: false,
        }
    );
    // 384 floats of 4 bytes plus 8 for the vector: one MiniLM embedding is 1544 bytes.
    assert_eq!(
        limit(minilm().run(text("hi"), &Limits::default().max_output(1543))),
        LimitExceeded::Output {
            limit: 1543,
            size: 1544,
            at_least: false,
        }
    );
    let fits = minilm()
        .run(text("hi"), &Limits::default().max_output(1544))
        .unwrap();
    assert_eq!(fits.usage.output_bytes, 1544);
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_entry_points_do_not_panic_inside_an_async_runtime() {
    // Loading asks the guest for its info, and `run` blocks: both drive a private executor,
    // on a helper thread when the caller is already inside one.
    let model = wasm_infer::Model::load(support::runtime(), support::hostile_wasm()).unwrap();
    let outcome = model.run(text("echo:inside"), &Limits::default()).unwrap();
    assert_eq!(outcome.output, Output::Text("inside".into()));
    let failure = model
        .run(
            text("spin"),
            &Limits::default().wall_time(Duration::from_millis(100)),
        )
        .unwrap_err();
    assert!(matches!(
        failure.error,
        Error::Limit(LimitExceeded::WallTime { .. })
    ));
}
