//! What a guest can make the *host* spend, per class of value that crosses the boundary: each
//! worst case ends in its typed error, and the host's extra resident memory while it ran stays
//! within a stated bound. Measured as the soak test does, from /proc: the peak resident set
//! (VmHWM, reset before each case) less the resident set before it, less the guest's own
//! linear memory (which lives in this process too, and is bounded by `--mem`). The cases run
//! one at a time so that one's allocations do not count against another.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use support::{hostile, invalid, limit, minilm, reply, runtime, text, WatModel};
use wasm_infer::{Input, InvalidModel, LimitExceeded, Limits, Model};

/// The most host memory any single case may take beyond the guest's own: 64 MiB. The host's
/// structures for one run are kilobytes; the largest copy the limits allow out of a guest's
/// result is three times the output limit plus 1 MiB (49 MiB at the default 16 MiB), and the
/// rest is allocator slack.
const HOST_EXTRA_BOUND: u64 = 64 << 20;

/// What the host copies of a result at most under the default limits (see above).
const RESULT_BUDGET: u64 = 3 * (16 << 20) + (1 << 20);

static SERIAL: Mutex<()> = Mutex::new(());

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
}

/// Runs `case` and returns its result and the host's extra resident bytes: the peak during
/// the case less the resident set before it, less `guest_memory(&result)`.
fn host_extra<R>(case: impl FnOnce() -> R, guest_memory: impl Fn(&R) -> u64) -> (R, u64) {
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident set");
    let before = status_kib("VmRSS:") << 10;
    let result = case();
    let peak = status_kib("VmHWM:") << 10;
    let extra = peak
        .saturating_sub(before)
        .saturating_sub(guest_memory(&result));
    (result, extra)
}

fn assert_bounded(class: &str, extra: u64) {
    eprintln!("{class}: host extra {} KiB", extra >> 10);
    assert!(
        extra <= HOST_EXTRA_BOUND,
        "{class}: the host took {} MiB beyond the guest's memory",
        extra >> 20
    );
}

fn run_guest_memory(result: &Result<wasm_infer::Outcome, wasm_infer::RunError>) -> u64 {
    match result {
        Ok(outcome) => outcome.usage.peak_memory_bytes,
        Err(failure) => failure.usage.peak_memory_bytes,
    }
}

#[test]
fn ten_million_empty_vectors_are_refused_by_their_structure_without_a_host_copy() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    hostile();
    let (result, extra) = host_extra(
        || hostile().run(text("empty-vectors:10000000"), &Limits::default()),
        run_guest_memory,
    );
    // 24 bytes of host header per vector: 240 MB, past the result's copy budget, so the copy
    // is refused before it starts.
    assert_eq!(
        limit(result),
        LimitExceeded::Output {
            limit: 16 << 20,
            size: RESULT_BUDGET + 1,
            at_least: true
        }
    );
    assert_bounded("output structure", extra);
}

#[test]
fn a_giant_byte_output_is_refused_before_it_is_copied() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    hostile();
    let (result, extra) = host_extra(
        || hostile().run(text("bytes:200000000"), &Limits::default()),
        run_guest_memory,
    );
    assert_eq!(
        limit(result),
        LimitExceeded::Output {
            limit: 16 << 20,
            size: RESULT_BUDGET + 1,
            at_least: true
        }
    );
    assert_bounded("output payload", extra);
}

#[test]
fn the_largest_output_the_limit_admits_costs_the_host_its_copy_budget_at_most() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    hostile();
    // 2,000,000 empty vectors: 16,000,000 bytes by the output limit's count (8 each), within
    // 16 MiB, so they are returned; the host's copy is 24 bytes a vector, 48 MB.
    let (result, extra) = host_extra(
        || hostile().run(text("empty-vectors:2000000"), &Limits::default()),
        run_guest_memory,
    );
    let outcome = result.expect("within the output limit");
    assert_eq!(outcome.usage.output_bytes, 16_000_000);
    assert!(extra <= RESULT_BUDGET + (8 << 20), "{}", extra >> 20);
    drop(outcome);
    assert_bounded("output within the limit", extra);
}

#[test]
fn a_million_dimension_tensor_is_refused_at_upload() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    hostile();
    let (answer, extra) = host_extra(|| reply("accel-rank:1000000"), |_| 0);
    assert_eq!(
        answer,
        "AccelError::InvalidArgument(\"a tensor has at most 8 dimensions, not 1000000\")"
    );
    // The 4 MB shape list itself crosses (bounded by the hostcall budget), nothing more.
    assert_bounded("accelerator shapes", extra);
}

#[test]
fn a_million_empty_texts_cost_the_host_nothing_beyond_the_callers_vector() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    minilm();
    let flood = Input::Texts(vec![String::new(); 1_000_000]);
    let (result, extra) = host_extra(|| minilm().run(flood, &Limits::default()), |_| 0);
    assert_eq!(
        limit(result),
        LimitExceeded::Batch {
            limit: 1024,
            items: 1_000_000
        }
    );
    assert_bounded("batch overhead", extra);
}

#[test]
fn a_quarter_gigabyte_model_name_is_refused_without_being_copied() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // `info` returns a record whose name is the first 256 MiB of its (zero-filled) memory.
    let wasm = WatModel {
        info: "(i32.store (i32.const 1024) (i32.const 0))
               (i32.store (i32.const 1028) (i32.const 268435456))",
        memory_pages: 4097,
        ..WatModel::default()
    }
    .build();
    let (result, extra) = host_extra(|| Model::from_bytes(runtime(), &wasm), |_| 0);
    assert_eq!(
        invalid(result),
        InvalidModel::InfoTooLarge {
            limit: wasm_infer::limits::MAX_INFO_BYTES
        }
    );
    assert_bounded("model info", extra);
}

#[test]
fn ten_thousand_live_handles_is_the_cap_and_a_typed_limit() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    hostile();
    let (result, extra) = host_extra(
        || hostile().run(text("accel-handles"), &Limits::default()),
        run_guest_memory,
    );
    assert_eq!(
        limit(result),
        LimitExceeded::Handles {
            limit: wasm_infer::limits::MAX_HANDLES
        }
    );
    assert_bounded("resource handles", extra);
}

#[test]
fn one_bulk_memory_instruction_overruns_the_deadline_by_at_most_one_pass_over_the_ceiling() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    hostile();
    // A 384 MiB `memory.fill` in a loop under 512 MiB: the epoch check runs between fills,
    // so the run ends after the fill in progress at its deadline. docs/cli.md states the
    // measured rate (about 1 s per GiB written, first touch included); this bound is generous
    // for a shared machine.
    let limits = Limits::default()
        .memory(512 << 20)
        .wall_time(Duration::from_millis(100));
    let failure = hostile().run(text("fill:384"), &limits).unwrap_err();
    match failure.error.limit() {
        Some(LimitExceeded::WallTime { limit, elapsed }) => {
            assert_eq!(*limit, Duration::from_millis(100));
            assert!(*elapsed < Duration::from_secs(3), "{elapsed:?}");
        }
        other => panic!("expected a wall-time trip, got {other:?}"),
    }
    // wasmtime charges bulk memory by the byte: the fills it ran are in the fuel figure.
    assert!(
        failure.usage.fuel_consumed >= 384 << 20,
        "{}",
        failure.usage.fuel_consumed
    );
}
