//! The attack suite: one test per denial-of-service or escape vector a model component (or its
//! input) can try, each asserting the exact error the user sees and that the same `Model` and
//! `Runtime` then complete good runs correctly. docs/security.md's attack table lists these tests
//! one to one; SECURITY.md states the threat model.
//!
//! Verdicts never depend on timing, except the wall-time trips' generous upper bounds.

mod support;

use std::time::Duration;

use support::{
    assert_golden, case, cosine, hostile, invalid, limit, minilm, reply, runtime, text, trap,
    wat_model,
};
use wasm_infer::{
    ComponentPart, Error, Input, InvalidModel, LimitExceeded, Limits, Model, Output, RunError,
    RuntimeConfig, Trap,
};

fn hostile_run(command: &str, limits: &Limits) -> Result<wasm_infer::Outcome, RunError> {
    hostile().run(text(command), limits)
}

/// After an attack: the hostile model still answers, with its golden fuel, and MiniLM on the
/// same runtime still gives the right embedding with its golden fuel.
fn assert_host_unharmed() {
    let echo = hostile_run("work:1000", &Limits::default()).expect("a good hostile run");
    assert_golden("hostile_work_1000", echo.usage.fuel_consumed);
    let short = case("short_bench");
    let outcome = minilm()
        .run(Input::Text(short.text), &Limits::default())
        .expect("a good MiniLM run after an attack");
    assert!(cosine(&outcome.output.embeddings().unwrap()[0], &short.embedding) >= 0.9999);
    assert_golden("minilm_short_bench", outcome.usage.fuel_consumed);
}

/// A run of a WAT-built model (see `support::wat_model`) on the shared runtime.
fn wat_run(
    infer_body: &str,
    extra: &str,
    limits: &Limits,
) -> Result<wasm_infer::Outcome, RunError> {
    let model = Model::from_bytes(runtime(), &wat_model(infer_body, extra)).expect("loading");
    model.run(text("x"), limits)
}

// --- compute ------------------------------------------------------------------------------

#[test]
fn infinite_loop_without_calls_is_stopped_by_fuel_and_by_wall_time() {
    assert_eq!(
        limit(hostile_run("spin", &Limits::default().fuel(3_000_000))),
        LimitExceeded::Fuel {
            limit: 3_000_000,
            consumed: 3_000_001
        }
    );
    let wall = Duration::from_millis(300);
    let failure = hostile_run("spin", &Limits::default().wall_time(wall)).unwrap_err();
    assert!(failure.usage.fuel_consumed > 0);
    match failure.error.limit() {
        Some(&LimitExceeded::WallTime { limit, elapsed }) => {
            assert_eq!(limit, wall);
            // One or two 10 ms ticks is the design; the bound is generous for a loaded machine.
            assert!(
                elapsed >= wall && elapsed < wall + Duration::from_secs(2),
                "{elapsed:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_host_unharmed();
}

#[test]
fn infinite_loop_calling_a_host_function_is_stopped_by_fuel_and_by_wall_time() {
    assert_eq!(
        limit(hostile_run("host-loop", &Limits::default().fuel(3_000_000))),
        LimitExceeded::Fuel {
            limit: 3_000_000,
            consumed: 3_000_001
        }
    );
    assert!(matches!(
        limit(hostile_run(
            "host-loop",
            &Limits::default().wall_time(Duration::from_millis(100))
        )),
        LimitExceeded::WallTime { elapsed, .. } if elapsed < Duration::from_secs(10)
    ));
    assert_host_unharmed();
}

#[test]
fn a_guest_blocked_inside_a_host_call_is_stopped_by_wall_time() {
    // `sleep` blocks in wasi:clocks for an hour: no wasm runs, so no epoch check can fire;
    // the outer deadline ends it.
    assert!(matches!(
        limit(hostile_run(
            "sleep",
            &Limits::default().wall_time(Duration::from_millis(100))
        )),
        LimitExceeded::WallTime { elapsed, .. } if elapsed < Duration::from_secs(10)
    ));
    assert_host_unharmed();
}

#[test]
fn unbounded_recursion_is_a_stack_overflow_trap() {
    let (code, _, _) = trap(hostile_run("recurse", &Limits::default()));
    assert_eq!(code, Some(Trap::StackOverflow));
    assert_host_unharmed();
}

#[test]
fn a_loop_stopped_by_wall_time_reports_the_fuel_it_burnt() {
    // Compiled wasm writes its fuel count back only at calls and fuel checks; the store
    // yields on fuel every 10M units so that the count is current when the deadline stops a
    // loop that makes no calls. Before, this run reported under a thousand units.
    let failure = hostile_run(
        "spin",
        &Limits::default().wall_time(Duration::from_millis(200)),
    )
    .unwrap_err();
    assert!(matches!(
        failure.error,
        Error::Limit(LimitExceeded::WallTime { .. })
    ));
    assert!(
        failure.usage.fuel_consumed >= 10_000_000,
        "{}",
        failure.usage.fuel_consumed
    );
    assert_host_unharmed();
}

// --- memory and tables --------------------------------------------------------------------

#[test]
fn a_memory_bomb_is_refused_at_the_ceiling() {
    let ceiling = 48 << 20;
    match limit(hostile_run("grow", &Limits::default().memory(ceiling))) {
        LimitExceeded::Memory { limit, requested } => {
            assert_eq!(limit, ceiling);
            assert!(
                requested > ceiling && requested <= ceiling + (2 << 20),
                "{requested}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_host_unharmed();
}

#[test]
fn a_single_huge_grow_is_denied_and_the_guest_sees_minus_one() {
    // 65,536 pages = 4 GiB, far past the 1 GiB default: `memory.grow` returns -1 (the guest
    // can carry on), nothing is allocated, and the run reports the unchanged memory.
    let outcome = hostile_run("grow-pages:65536", &Limits::default()).unwrap();
    assert_eq!(outcome.output, Output::Text("-1".into()));
    assert_eq!(
        outcome.usage.peak_memory_bytes,
        outcome.usage.initial_memory_bytes
    );
    assert_host_unharmed();
}

#[test]
fn a_table_growth_bomb_is_refused_at_the_table_limit() {
    let model = Model::from_bytes(runtime(), &support::table_bomb_wasm()).unwrap();
    let result = model.run(text("x"), &Limits::default());
    let max = wasm_infer::limits::MAX_TABLE_ELEMENTS;
    match limit(result) {
        LimitExceeded::Table { limit, requested } => {
            assert_eq!(limit, max);
            // The refused growth: past the cap by at most one step (plus the component's own
            // small tables).
            assert!(
                requested > max && requested <= max + 1000 + 100,
                "{requested}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_host_unharmed();
}

#[test]
fn too_many_memories_are_refused_at_load_with_the_count_and_the_cap() {
    // 21 memories in one module (the exported one plus 20), past the cap of 4 that both the
    // limiter and the pooling allocator apply: refused by counting, before compiling.
    let extra: String = (0..20).map(|i| format!("(memory $m{i} 1)\n")).collect();
    assert_eq!(
        invalid(Model::from_bytes(runtime(), &wat_model("", &extra))),
        InvalidModel::TooMany {
            part: ComponentPart::Memories,
            count: 21,
            cap: wasm_infer::limits::MAX_MEMORIES,
        }
    );
    assert_host_unharmed();
}

#[test]
fn a_component_at_the_caps_loads_on_demand_and_pooled_alike() {
    // Four memories: exactly the cap, on both allocators (they read the same constants).
    let extra: String = (0..3).map(|i| format!("(memory $m{i} 1)\n")).collect();
    let wasm = wat_model("", &extra);
    let pooled = wasm_infer::Runtime::with_config(RuntimeConfig {
        cache_dir: None,
        pool: Some(1),
        ..RuntimeConfig::default()
    })
    .unwrap();
    for runtime in [runtime(), &pooled] {
        let model = Model::from_bytes(runtime, &wasm).expect("four memories load");
        model.run(text("x"), &Limits::default()).expect("and run");
    }
}

// --- accelerator arguments are checked before the host allocates ---------------------------

#[test]
fn an_accelerator_shape_whose_element_count_overflows_is_an_invalid_argument() {
    assert_eq!(
        reply("accel-overflow"),
        "AccelError::InvalidArgument(\"shape [65536, 65536, 65536, 65536] has more elements \
         than one tensor may (2147483648)\")"
    );
    assert_host_unharmed();
}

#[test]
fn a_linear_layer_with_k_zero_is_an_invalid_argument_not_a_device_failure() {
    assert_eq!(
        reply("accel-k0"),
        "AccelError::InvalidArgument(\"x's last dimension (k) must be at least 1\")"
    );
}

// --- attribution: a refusal the guest handled is not the cause of a later failure --------

#[test]
fn a_memory_refusal_the_guest_handled_then_an_unrelated_panic_is_a_trap() {
    // A 4 GiB grow is refused (the guest sees -1), a 1-page grow is then granted, then it
    // panics: the refusal was handled, the panic is its own. (The unhandled case is the
    // memory bomb above: the allocator aborts right after the refusal.)
    let failure = hostile_run("handled-grow:65536", &Limits::default().memory(16 << 20));
    let (code, _, stderr) = trap(failure);
    assert_eq!(code, Some(Trap::UnreachableCodeReached));
    assert!(
        stderr.contains("unrelated failure after a handled refusal"),
        "{stderr}"
    );
    assert_host_unharmed();
}

#[test]
fn a_device_refusal_the_guest_handled_then_an_unrelated_panic_is_a_trap() {
    let (code, _, stderr) = trap(hostile_run("accel-handled", &Limits::default()));
    assert_eq!(code, Some(Trap::UnreachableCodeReached));
    assert!(
        stderr.contains("unrelated failure after a handled device refusal"),
        "{stderr}"
    );
    assert_host_unharmed();
}

// --- output -------------------------------------------------------------------------------

#[test]
fn a_giant_output_is_refused_without_the_host_copying_it() {
    // 200 MB built in the guest (under its 1 GiB memory limit). The host copies at most three
    // times the output limit plus 1 MiB of a result (enough for any output within the limit),
    // so it stops at 49 MiB instead of allocating 200 MB, whatever the device budget.
    let result_budget = 3 * (16 << 20) + (1 << 20);
    for limits in [Limits::default(), Limits::default().device_memory(0)] {
        assert_eq!(
            limit(hostile_run("bytes:200000000", &limits)),
            LimitExceeded::Output {
                limit: 16 << 20,
                size: result_budget + 1,
                at_least: true,
            }
        );
    }
    assert_host_unharmed();
}

#[test]
fn output_just_under_and_at_the_cap_is_returned_and_one_byte_over_is_withheld() {
    let cap = 4096;
    let limits = Limits::default().max_output(cap);
    for size in [cap - 1, cap] {
        let outcome = hostile_run(&format!("bytes:{size}"), &limits).unwrap();
        assert_eq!(outcome.output, Output::Bytes(vec![7; size as usize]));
        assert_eq!(outcome.usage.output_bytes, size);
    }
    assert_eq!(
        limit(hostile_run(&format!("bytes:{}", cap + 1), &limits)),
        LimitExceeded::Output {
            limit: cap,
            size: cap + 1,
            at_least: false,
        }
    );
    assert_host_unharmed();
}

// --- crashes ------------------------------------------------------------------------------

#[test]
fn a_panic_is_a_trap_carrying_the_panic_message() {
    let (code, _, stderr) = trap(hostile_run("panic", &Limits::default()));
    assert_eq!(code, Some(Trap::UnreachableCodeReached));
    assert!(
        stderr.contains("hostile guest panicked on purpose"),
        "{stderr}"
    );
    assert_host_unharmed();
}

#[test]
fn abort_is_an_unreachable_trap() {
    let (code, _, _) = trap(hostile_run("abort", &Limits::default()));
    assert_eq!(code, Some(Trap::UnreachableCodeReached));
    assert_host_unharmed();
}

#[test]
fn a_bare_unreachable_is_a_trap() {
    let (code, _, stderr) = trap(wat_run("unreachable", "", &Limits::default()));
    assert_eq!(code, Some(Trap::UnreachableCodeReached));
    assert!(stderr.is_empty());
    assert_host_unharmed();
}

#[test]
fn integer_division_by_zero_is_a_trap() {
    let model = Model::from_bytes(runtime(), &support::div_zero_wasm()).unwrap();
    let (code, _, _) = trap(model.run(text("x"), &Limits::default()));
    assert_eq!(code, Some(Trap::IntegerDivisionByZero));
    assert_host_unharmed();
}

#[test]
fn an_out_of_bounds_access_is_a_trap() {
    let body = "(drop (i32.load (i32.const -4)))";
    let (code, _, _) = trap(wat_run(body, "", &Limits::default()));
    assert_eq!(code, Some(Trap::MemoryOutOfBounds));
    assert_host_unharmed();
}

// --- stdio --------------------------------------------------------------------------------

#[test]
fn printing_in_a_loop_is_captured_capped_and_counted() {
    let outcome = hostile_run("print:100000", &Limits::default()).unwrap();
    assert_eq!(outcome.output, Output::Text("printed".into()));
    let expected: u64 = (0..100_000u64)
        .map(|i| format!("line {i} of guest output\n").len() as u64)
        .sum();
    assert_eq!(outcome.usage.guest_stdout_bytes, expected);
    assert_host_unharmed();
}

#[test]
fn stdin_is_empty() {
    assert_eq!(reply("stdin"), "stdin: 0 bytes, true");
}

// --- escape attempts: each denied or harmless ---------------------------------------------

#[test]
fn files_are_unreachable_there_is_no_preopened_directory() {
    for path in ["/etc/passwd", "../../secret", "/proc/self/environ", "."] {
        assert_eq!(
            reply(&format!("read-file:{path}")),
            "denied: NotFound",
            "{path}"
        );
    }
    for path in ["/", "."] {
        assert_eq!(
            reply(&format!("list-dir:{path}")),
            "denied: NotFound",
            "{path}"
        );
    }
    assert_host_unharmed();
}

#[test]
fn sockets_and_name_lookup_are_denied() {
    for addr in ["127.0.0.1:22", "10.0.0.1:80", "[::1]:443"] {
        assert_eq!(
            reply(&format!("connect:{addr}")),
            "denied: PermissionDenied",
            "{addr}"
        );
    }
    assert!(reply("resolve:localhost").starts_with("denied:"));
    assert_host_unharmed();
}

#[test]
fn environment_and_arguments_are_empty() {
    // The host's own environment is not empty (tests/cli.rs runs the same command with a
    // secret set in the CLI's environment); the guest's is.
    assert!(std::env::vars_os().next().is_some());
    assert_eq!(reply("env"), "vars=0 args=0 cwd=Some(\"/\")");
}

#[test]
fn clocks_are_frozen_so_reading_them_in_a_loop_leaks_nothing() {
    // Wall clock pinned to 2000-01-01, monotonic clock does not move: no timing side channel
    // through the clocks, and the reading loop is bounded by fuel like any other.
    assert_eq!(
        reply("clock:100000"),
        "wall=946684800 monotonic_advanced=false"
    );
    assert_eq!(
        limit(hostile_run(
            "clock:100000000",
            &Limits::default().fuel(5_000_000)
        )),
        LimitExceeded::Fuel {
            limit: 5_000_000,
            consumed: 5_000_001
        }
    );
}

#[test]
fn timers_run_on_the_frozen_clock_so_polling_one_gives_the_same_answer_every_run() {
    // A 1 ms timer polled between units of ~0.1 ms of work: on real time it fired after a
    // host-speed-dependent number of units (about 10 here), so output and fuel differed run to
    // run. On the frozen clock a future timer is never ready and a zero one is ready at once.
    let runs: Vec<(String, u64)> = (0..3)
        .map(|_| {
            let outcome = hostile_run("timer:1000000,40", &Limits::default()).unwrap();
            let Output::Text(text) = outcome.output else {
                panic!("expected text")
            };
            (text, outcome.usage.fuel_consumed)
        })
        .collect();
    assert_eq!(runs[0].0, "units=40 ready=false");
    assert!(runs.iter().all(|r| *r == runs[0]), "{runs:?}");
    assert_eq!(reply("timer:0,40"), "units=0 ready=true");
    // Blocking on a future timer is waiting for a time that never comes: the wall-time limit
    // ends it (tests `a_guest_blocked_inside_a_host_call_is_stopped_by_wall_time` too).
    assert!(matches!(
        limit(hostile_run(
            "sleep",
            &Limits::default().wall_time(Duration::from_millis(100))
        )),
        LimitExceeded::WallTime { .. }
    ));
}

#[test]
fn one_random_call_is_capped_before_any_byte_is_made() {
    // wasmtime-wasi's own cap is 64 MiB (about 350 ms of host CPU in one uninterruptible call).
    let cap = wasm_infer::MAX_RANDOM_BYTES_PER_CALL;
    assert_eq!(cap, 1 << 20);
    assert_eq!(reply(&format!("random:{cap}")), "got 1048576 bytes");
    let (code, message, _) = trap(hostile_run(
        &format!("random:{}", cap + 1),
        &Limits::default(),
    ));
    assert_eq!(code, None);
    assert_eq!(message, "requested len 1048577 exceeds limit 1048576");
    assert_host_unharmed();
}

#[test]
fn random_bytes_cost_fuel_by_the_byte_before_they_are_made() {
    // 100 per call + 16 per byte (docs/accelerator.md): 1 MiB made to cost 16,777,316
    // where it cost the guest's own few hundred instructions, against 356 for 16 bytes.
    let fuel = |n: u64| {
        hostile_run(&format!("random:{n}"), &Limits::default())
            .unwrap()
            .usage
            .fuel_consumed
    };
    let extra = fuel(1 << 20) - fuel(16);
    let charged = 16 * ((1 << 20) - 16);
    // What is left is the guest's own allocator and loop for the bigger buffer.
    assert!(
        (charged..charged + 20_000).contains(&extra),
        "{extra} against {charged}"
    );
    // A cap too small for the charge: out of fuel before any byte is made, however the
    // guest spent what came before.
    let limits = Limits::default().fuel(fuel(16) + charged / 2);
    assert!(matches!(
        limit(hostile_run("random:1048576", &limits)),
        LimitExceeded::Fuel { .. }
    ));
}

#[test]
fn a_write_over_the_check_write_permit_traps() {
    // WASI: writing more than `check-write` granted is an error. It was accepted (a 512 MiB
    // write went through for 23 fuel).
    assert_eq!(reply("write:65536"), "granted 65536, wrote: Ok(())");
    let (code, message, _) = trap(hostile_run("write:65537", &Limits::default()));
    assert_eq!(code, None);
    assert_eq!(
        message,
        "a write of 65537 bytes to stdout or stderr, over the 65536 bytes check-write permits"
    );
    assert_host_unharmed();
}

/// The fuel of one more call of `op:NAME,..,SHAPE` (the hostile guest's `op` command): the
/// run with two calls less the run with one.
fn one_more_call(op: &str, shape: &str) -> u64 {
    let fuel = |reps: u32| {
        let command = format!("op:{op},{reps}{shape}");
        let outcome = hostile_run(&command, &Limits::default()).expect(&command);
        let Output::Text(text) = outcome.output else {
            panic!("expected text")
        };
        assert_eq!(text, format!("{op} x{reps}"));
        outcome.usage.fuel_consumed
    };
    fuel(2) - fuel(1)
}

#[test]
fn stream_writes_and_reads_cost_fuel_by_the_byte() {
    use wasm_infer::wasi_cost::{stream, STREAM_PER_BYTE, WASI_CALL};
    assert_eq!((WASI_CALL, STREAM_PER_BYTE), (100, 1));
    assert_eq!(stream(65_536), 65_636);
    // One stdout `write` of 64 KiB against one of 1 byte: the guest passes a pointer and a
    // length either way, so what differs is the host's charge, 1 a byte: 65,535. It was 0
    // (a write cost the guest's own 23 instructions whatever its size).
    assert_eq!(
        one_more_call("write", ",65536") - one_more_call("write", ",1"),
        65_535
    );
    // A write of nothing still costs the floor; the floors cancel here, so the 1-byte write
    // is 1 more than the empty one.
    assert_eq!(
        one_more_call("write", ",1") - one_more_call("write", ",0"),
        1
    );
    // A stdin `read` is charged for what it asks (capped at 64 KiB per call), before it finds
    // stdin closed: 65,535 between 64 KiB and 1 byte, and nothing more for 1 GiB.
    let read = |len: u64| one_more_call("read", &format!(",{len}"));
    assert_eq!(read(65_536) - read(1), 65_535);
    assert_eq!(read(1 << 30), read(65_536));
    assert_eq!(wasm_infer::MAX_STREAM_BYTES_PER_CALL, 65_536);
}

#[test]
fn a_poll_costs_its_floor_and_100_a_pollable() {
    use wasm_infer::wasi_cost::{poll, POLL_PER_POLLABLE, WASI_CALL};
    assert_eq!(POLL_PER_POLLABLE, 100);
    assert_eq!(poll(1000), WASI_CALL + 100_000);
    // One `poll` of 1,000 entries against one of 1 (the guest's side of the call is the same,
    // and both answer [0]): 999 entries at 100 each. It was 0.
    assert_eq!(
        one_more_call("poll", ",1000") - one_more_call("poll", ",1"),
        99_900
    );
}

/// `poll`'s list is charged for before any entry of it is looked at: a list of 1,000 handles
/// that name nothing makes a run with the fuel for the charge trap on the first handle (the
/// list was lifted after the charge), and one with a unit less end out of fuel with no trap
/// (nothing of the list was lifted, so nothing copied or allocated for it). When wasmtime
/// lifted the list before the call (a `Vec` argument), the trap came first whatever the cap.
#[test]
fn a_polls_list_is_not_lifted_before_it_is_charged() {
    use wasm_infer::wasi_cost::poll;
    let command = "op:poll-invalid,1,1000";
    let lifted = hostile_run(command, &Limits::default()).unwrap_err();
    match &lifted.error {
        Error::Trap { message, .. } => {
            assert!(message.contains("unknown handle index"), "{message}")
        }
        other => panic!("expected the lift's trap, got {other}"),
    }
    // The charge was taken: 100 + 100 a handle, the only WASI call of the run.
    assert_eq!(lifted.usage.wasi_fuel, poll(1000));
    assert_eq!(poll(1000), 100_100);
    let needed = lifted.usage.fuel_consumed;
    // With exactly that much fuel the charge is taken and the list then lifted: the trap.
    let exact = hostile_run(command, &Limits::default().fuel(needed)).unwrap_err();
    assert!(matches!(exact.error, Error::Trap { .. }), "{}", exact.error);
    assert_eq!(exact.usage.fuel_consumed, needed);
    // One unit short, the charge is refused and not one handle is looked at.
    let short = hostile_run(command, &Limits::default().fuel(needed - 1));
    let short = short.unwrap_err();
    assert_eq!(
        short.error.limit(),
        Some(&LimitExceeded::Fuel {
            limit: needed - 1,
            consumed: needed
        }),
        "{}",
        short.error
    );
    assert_eq!(short.usage.wasi_fuel, 0);
}

/// `resolve-addresses` (name lookup is off) costs its floor and nothing by the name's length,
/// answers `permanent-resolver-failure` (error-code 20), and does not read the name: one of
/// 1 MiB costs what one of 1 byte does, and a name that is not UTF-8, which wasmtime-wasi's
/// implementation copied and then refused to decode (a trap before the call ran, so before
/// its floor was charged), gets the same answer at the same fuel. A cap one unit short of the
/// floor ends the run out of fuel.
#[test]
fn name_lookup_costs_its_floor_and_never_reads_the_name() {
    use wasm_infer::wasi_cost::WASI_CALL;
    let answer = |shape: &str| reply(&format!("op:resolve,1,{shape}"));
    for shape in ["1,0", "1048576,0", "1,1", "1048576,1"] {
        assert_eq!(answer(shape), "resolve x1: error-code 20", "{shape}");
    }
    let mut guest_side = None;
    for shape in [",1,0", ",1048576,0", ",1,1", ",1048576,1"] {
        let (all, wasi) = one_more_call_split("resolve", shape);
        assert_eq!(wasi, WASI_CALL, "{shape}");
        // The guest's own loop is a pointer and a length whatever the name.
        let guest = all - wasi;
        assert_eq!(*guest_side.get_or_insert(guest), guest, "{shape}");
    }
    // The floor is taken before anything else: a cap one unit short stops the run there.
    let run = |limits: &Limits| hostile_run("op:resolve,1,1048576,1", limits);
    let needed = run(&Limits::default()).unwrap().usage.fuel_consumed;
    assert_eq!(
        run(&Limits::default().fuel(needed))
            .unwrap()
            .usage
            .fuel_consumed,
        needed
    );
    assert!(matches!(
        limit(run(&Limits::default().fuel(needed - 1))),
        LimitExceeded::Fuel { .. }
    ));
}

/// Fuel of one more call of `op:NAME,..,SHAPE` as (all of it, the WASI calls' share: the
/// usage's `wasi_fuel`), each the run with two calls less the run with one.
fn one_more_call_split(op: &str, shape: &str) -> (u64, u64) {
    let usage = |reps: u32| {
        let command = format!("op:{op},{reps}{shape}");
        hostile_run(&command, &Limits::default())
            .expect(&command)
            .usage
    };
    let (one, two) = (usage(1), usage(2));
    (
        two.fuel_consumed - one.fuel_consumed,
        two.wasi_fuel - one.wasi_fuel,
    )
}

/// Every WASI call's charge is its formula exactly, worked out here from the figures of the
/// cost model (docs/cost-audit.md: 100 a call, 16 a random byte, 1 a byte a stream call asks
/// to move, capped at 64 KiB, 100 a pollable), separated from the guest's own instructions
/// by the usage's `wasi_fuel`. It asserted a range (the floors plus up to 100 of the guest's
/// loop) before the host reported its share.
#[test]
fn no_wasi_call_is_free() {
    use wasm_infer::wasi_cost::{poll, random, stream, WASI_CALL};
    assert_eq!(WASI_CALL, 100);
    let cases: &[(&str, &str, u64)] = &[
        // `get-stdout` and dropping the stream it returns: two calls to wasmtime-wasi's own
        // implementations, each charged the floor as it returns.
        ("stdout", "", 200),
        // One stdout `write`: 100 + 1 a byte.
        ("write", ",0", 100),
        ("write", ",1", 101),
        ("write", ",65536", 65_636),
        // One stdin `read` (closed): 100 + what it asks, capped at 65,536.
        ("read", ",1", 101),
        ("read", ",1073741824", 65_636),
        // Random bytes: 100 + 16 a byte.
        ("random", ",16", 356),
        ("random", ",1048576", 16_777_316),
        ("insecure-random", ",16", 356),
        // One `poll`: 100 + 100 a pollable.
        ("poll", ",1", 200),
        ("poll", ",1000", 100_100),
        // One `resolve-addresses` (refused: name lookup is off): the floor, whatever the name.
        ("resolve", ",1,0", 100),
        ("resolve", ",1048576,0", 100),
    ];
    let mut guest_side = std::collections::HashMap::new();
    for &(op, shape, figure) in cases {
        let (all, wasi) = one_more_call_split(op, shape);
        assert_eq!(wasi, figure, "{op}{shape}");
        // The same figure from the cost model's functions.
        let model = match op {
            "stdout" => 2 * WASI_CALL,
            "write" | "read" => stream(shape[1..].parse::<u64>().unwrap().min(65_536)),
            "random" | "insecure-random" => random(shape[1..].parse().unwrap()),
            "resolve" => WASI_CALL,
            _ => poll(shape[1..].parse().unwrap()),
        };
        assert_eq!(wasi, model, "{op}{shape}");
        // What is not the host's charge is the guest's own loop, which does not depend on
        // the size it asks for (a pointer and a length either way) except for random bytes,
        // whose buffer the guest allocates and drops.
        if !op.contains("random") {
            let guest = all - wasi;
            assert_eq!(*guest_side.entry(op).or_insert(guest), guest, "{op}{shape}");
        }
    }
    // And a cap one unit short of a run's fuel ends it out of fuel.
    let run = |limits: &Limits| hostile_run("op:stdout,1000", limits);
    let needed = run(&Limits::default()).unwrap();
    assert!(needed.usage.wasi_fuel >= 1000 * 200);
    let needed = needed.usage.fuel_consumed;
    let exact = Limits::default().fuel(needed);
    assert_eq!(run(&exact).unwrap().usage.fuel_consumed, needed);
    assert!(matches!(
        limit(run(&Limits::default().fuel(needed - 1))),
        LimitExceeded::Fuel { .. }
    ));
}

// --- concurrency --------------------------------------------------------------------------

#[test]
fn attacks_in_parallel_leave_good_runs_outputs_and_fuel_unchanged() {
    let names = ["plain", "emoji", "cyrillic"];
    let expected: Vec<(u64, Vec<u32>)> = names
        .iter()
        .map(|n| {
            let o = support::embed_case(n);
            let bits = o.output.embeddings().unwrap()[0]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (o.usage.fuel_consumed, bits)
        })
        .collect();
    std::thread::scope(|scope| {
        let short = Limits::default().wall_time(Duration::from_millis(500));
        let attacks: Vec<_> = [
            ("spin", short.clone()),
            ("host-loop", short.clone()),
            ("grow", Limits::default().memory(32 << 20)),
            ("recurse", Limits::default()),
            ("bytes:200000000", Limits::default()),
            ("print:20000", Limits::default()),
        ]
        .into_iter()
        .map(|(command, limits)| scope.spawn(move || hostile_run(command, &limits)))
        .collect();
        let good: Vec<_> = names
            .iter()
            .map(|n| scope.spawn(move || support::embed_case(n)))
            .collect();
        for ((name, handle), (fuel, bits)) in names.iter().zip(good).zip(&expected) {
            let outcome = handle.join().unwrap();
            assert_eq!(outcome.usage.fuel_consumed, *fuel, "{name}");
            let got: Vec<u32> = outcome.output.embeddings().unwrap()[0]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(&got, bits, "{name}");
        }
        for attack in attacks {
            let _ = attack.join().expect("an attack thread must not panic");
        }
    });
    assert_host_unharmed();
}

// --- bad inputs to a good model -----------------------------------------------------------

#[test]
fn an_empty_text_is_a_valid_input() {
    let empty = minilm().run(text(""), &Limits::default()).unwrap();
    assert_eq!(empty.output.embeddings().unwrap()[0].len(), 384);
}

#[test]
fn binary_input_to_a_text_model_is_a_model_error() {
    match minilm().run(Input::Bytes(vec![0xff, 0x00, 0xfe]), &Limits::default()) {
        Err(RunError {
            error: Error::Model { code, .. },
            usage,
        }) => {
            assert_eq!(code, wasm_infer::ModelErrorCode::UnsupportedInput);
            assert_eq!(usage.input_bytes, 3);
        }
        other => panic!("{other:?}"),
    }
    assert_host_unharmed();
}

#[test]
fn a_huge_input_is_refused_before_the_guest_sees_it() {
    let huge = "a".repeat(2 << 20);
    let failure = minilm().run(text(&huge), &Limits::default()).unwrap_err();
    assert_eq!(
        failure.error.limit(),
        Some(&LimitExceeded::Input {
            limit: 1 << 20,
            size: 2 << 20
        })
    );
    assert_eq!(failure.usage.fuel_consumed, 0);
}

#[test]
fn a_flood_of_empty_texts_is_refused_by_its_item_count_before_any_guest_work() {
    let flood = Input::Texts(vec![String::new(); 1_000_000]);
    let failure = minilm().run(flood, &Limits::default()).unwrap_err();
    assert_eq!(
        failure.error.limit(),
        Some(&LimitExceeded::Batch {
            limit: 1024,
            items: 1_000_000
        })
    );
    assert_eq!(failure.usage.fuel_consumed, 0);
    assert_eq!(failure.usage.wall_time, std::time::Duration::ZERO);
    // Raising the item cap alone does not let it through: each item costs 8 bytes of input.
    let flood = Input::Texts(vec![String::new(); 1_000_000]);
    let limits = Limits::default().max_batch(1_000_000);
    assert_eq!(
        limit(minilm().run(flood, &limits)),
        LimitExceeded::Input {
            limit: 1 << 20,
            size: 8_000_000
        }
    );
}

#[test]
fn a_batch_at_the_item_cap_runs_and_one_more_is_refused() {
    let limits = Limits::default().max_batch(64);
    let outcome = minilm()
        .run(Input::Texts(vec!["ok".to_string(); 64]), &limits)
        .unwrap();
    assert_eq!(outcome.output.embeddings().unwrap().len(), 64);
    assert_eq!(
        limit(minilm().run(Input::Texts(vec!["ok".to_string(); 65]), &limits)),
        LimitExceeded::Batch {
            limit: 64,
            items: 65
        }
    );
    assert_host_unharmed();
}
