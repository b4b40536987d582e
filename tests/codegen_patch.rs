//! What the vendored code-generation patch (vendor/README.md) must preserve. The patch calls
//! the out-of-fuel and new-epoch builtins at every loop header through `PreserveAll`
//! trampolines, so vector registers stay live across those calls instead of being spilled:
//! exactly the code where a wrong register-save would corrupt a guest's values. Each test runs
//! a loop that keeps eight v128 accumulators (plus a multiplier) live across its header, in
//! exact integer arithmetic, so one clobbered lane on one trip changes the result.
//!
//! - slow paths taken on every trip (a fuel yield at every header, an epoch callback at every
//!   header) give the same bits as a run with fuel metering and epochs compiled out;
//! - out-of-fuel and epoch-interrupt traps inside the loop are the right traps, with a
//!   backtrace naming the function;
//! - after a new epoch the deadline is reloaded (a stale deadline would call the callback on
//!   every later trip, not once per tick).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasm_infer::{CpuFeatures, EngineSettings};
use wasmtime::{Config, Engine, Instance, Module, Store, Trap, UpdateDeadline, WasmBacktrace};

/// `accumulate(n)`: eight i32x4 accumulators, each `a[i] = a[i] * k + a[i+1]` per trip, for
/// `n` trips; the accumulators are stored at byte 256. Inputs come from memory (data segment),
/// so Cranelift cannot fold them at compile time.
const WAT: &str = r#"(module
  (memory (export "memory") 1)
  (data (i32.const 0)
    "\03\00\00\00\05\00\00\00\07\00\00\00\0b\00\00\00"
    "\01\00\00\00\02\00\00\00\03\00\00\00\04\00\00\00"
    "\05\00\00\00\06\00\00\00\07\00\00\00\08\00\00\00"
    "\09\00\00\00\0a\00\00\00\0b\00\00\00\0c\00\00\00"
    "\0d\00\00\00\0e\00\00\00\0f\00\00\00\10\00\00\00"
    "\11\00\00\00\12\00\00\00\13\00\00\00\14\00\00\00"
    "\15\00\00\00\16\00\00\00\17\00\00\00\18\00\00\00"
    "\19\00\00\00\1a\00\00\00\1b\00\00\00\1c\00\00\00"
    "\1d\00\00\00\1e\00\00\00\1f\00\00\00\20\00\00\00")
  (func $accumulate (export "accumulate") (param $n i32)
    (local $k v128) (local $a0 v128) (local $a1 v128) (local $a2 v128) (local $a3 v128)
    (local $a4 v128) (local $a5 v128) (local $a6 v128) (local $a7 v128)
    (local.set $k (v128.load (i32.const 0)))
    (local.set $a0 (v128.load (i32.const 16)))
    (local.set $a1 (v128.load (i32.const 32)))
    (local.set $a2 (v128.load (i32.const 48)))
    (local.set $a3 (v128.load (i32.const 64)))
    (local.set $a4 (v128.load (i32.const 80)))
    (local.set $a5 (v128.load (i32.const 96)))
    (local.set $a6 (v128.load (i32.const 112)))
    (local.set $a7 (v128.load (i32.const 128)))
    (loop $trip
      (local.set $a0 (i32x4.add (i32x4.mul (local.get $a0) (local.get $k)) (local.get $a1)))
      (local.set $a1 (i32x4.add (i32x4.mul (local.get $a1) (local.get $k)) (local.get $a2)))
      (local.set $a2 (i32x4.add (i32x4.mul (local.get $a2) (local.get $k)) (local.get $a3)))
      (local.set $a3 (i32x4.add (i32x4.mul (local.get $a3) (local.get $k)) (local.get $a4)))
      (local.set $a4 (i32x4.add (i32x4.mul (local.get $a4) (local.get $k)) (local.get $a5)))
      (local.set $a5 (i32x4.add (i32x4.mul (local.get $a5) (local.get $k)) (local.get $a6)))
      (local.set $a6 (i32x4.add (i32x4.mul (local.get $a6) (local.get $k)) (local.get $a7)))
      (local.set $a7 (i32x4.add (i32x4.mul (local.get $a7) (local.get $k)) (local.get $a0)))
      (br_if $trip (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
    (v128.store (i32.const 256) (local.get $a0))
    (v128.store (i32.const 272) (local.get $a1))
    (v128.store (i32.const 288) (local.get $a2))
    (v128.store (i32.const 304) (local.get $a3))
    (v128.store (i32.const 320) (local.get $a4))
    (v128.store (i32.const 336) (local.get $a5))
    (v128.store (i32.const 352) (local.get $a6))
    (v128.store (i32.const 368) (local.get $a7))))"#;

const TRIPS: i32 = 5_000;

/// The project's engine configuration (fuel and epochs on, this CPU's features).
fn project_config() -> Config {
    EngineSettings {
        meter_fuel: true,
        pool: None,
        nan_canonicalization: false,
        cpu_features: CpuFeatures::Host,
    }
    .config()
    .unwrap()
}

/// The accumulators after `TRIPS` trips, computed with plain Rust wrapping arithmetic: the
/// independent reference.
fn reference() -> Vec<u8> {
    let k = [3u32, 5, 7, 11];
    let mut a: Vec<[u32; 4]> = (0..8)
        .map(|i| std::array::from_fn(|lane| (i * 4 + lane + 1) as u32))
        .collect();
    for _ in 0..TRIPS {
        for i in 0..8 {
            let next = a[(i + 1) % 8];
            for lane in 0..4 {
                a[i][lane] = a[i][lane].wrapping_mul(k[lane]).wrapping_add(next[lane]);
            }
        }
    }
    a.iter()
        .flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes()))
        .collect()
}

/// Instantiates the loop in `store` and runs `accumulate(trips)`; the accumulators' bytes, or
/// the error.
fn run<T: Send>(store: &mut Store<T>, trips: i32) -> wasmtime::Result<Vec<u8>> {
    let module = Module::new(store.engine(), WAT)?;
    futures::executor::block_on(async {
        let instance = Instance::new_async(&mut *store, &module, &[]).await?;
        let accumulate = instance.get_typed_func::<i32, ()>(&mut *store, "accumulate")?;
        accumulate.call_async(&mut *store, trips).await?;
        let memory = instance.get_memory(&mut *store, "memory").unwrap();
        Ok(memory.data(&*store)[256..384].to_vec())
    })
}

#[test]
fn fuel_yields_at_every_loop_header_keep_every_vector_register() {
    // The reference run: fuel metering and epochs compiled out (no slow path at all).
    let mut plain = project_config();
    plain.consume_fuel(false).epoch_interruption(false);
    let mut store = Store::new(&Engine::new(&plain).unwrap(), ());
    let without_checks = run(&mut store, TRIPS).unwrap();
    assert_eq!(without_checks, reference());

    // Fuel on, yielding to the executor whenever one unit is used: the out-of-fuel slow path
    // runs on every trip through the loop header.
    let engine = Engine::new(&project_config()).unwrap();
    let mut store = Store::new(&engine, ());
    store.set_fuel(u64::MAX / 2).unwrap();
    store.fuel_async_yield_interval(Some(1)).unwrap();
    store.set_epoch_deadline(u64::MAX / 2);
    let with_fuel_yields = run(&mut store, TRIPS).unwrap();
    assert!(
        with_fuel_yields == without_checks,
        "fuel yields changed the result"
    );
}

/// A store on the project's engine with fuel to spare whose epoch callback counts its calls
/// and answers `then()`.
fn counting_store(then: fn() -> UpdateDeadline) -> (Store<()>, Arc<AtomicU64>) {
    let engine = Engine::new(&project_config()).unwrap();
    let mut store = Store::new(&engine, ());
    store.set_fuel(u64::MAX / 2).unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    store.epoch_deadline_callback(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
        Ok(then())
    });
    (store, calls)
}

#[test]
fn epoch_callbacks_at_every_loop_header_keep_every_vector_register() {
    // A deadline of "now" after every callback: the new-epoch slow path on every header.
    let (mut store, calls) = counting_store(|| UpdateDeadline::Yield(0));
    store.set_epoch_deadline(0);
    let with_epoch_yields = run(&mut store, TRIPS).unwrap();
    assert!(
        with_epoch_yields == reference(),
        "epoch yields changed the result"
    );
    // One call per loop header (TRIPS) plus the function entry, at least.
    assert!(calls.load(Ordering::Relaxed) > TRIPS as u64);
}

/// Fuel the epoch callback charges at each call (as the host charges a WASI call's floor in
/// a call hook, which also runs inside the new-epoch builtin).
const CHARGE: u64 = 100;

/// `spin(n)`: a loop of `n` trips, a call (which flushes the function's fuel counter to the
/// store part-way through the active fuel), then another loop of `n` trips.
const SPIN: &str = r#"(module
  (func $flush)
  (func (export "spin") (param $n i32)
    (local $i i32)
    (local.set $i (local.get $n))
    (loop $first (br_if $first (local.tee $i (i32.sub (local.get $i) (i32.const 1)))))
    (call $flush)
    (loop $second (br_if $second (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))))"#;

/// Runs `spin(TRIPS)` on the project's engine with the host's fuel yield interval, with an
/// epoch callback at every loop header when `charging` that takes [`CHARGE`] fuel through
/// `get_fuel`/`set_fuel`: the fuel the run used and the number of callbacks.
fn fuel_used(charging: bool) -> (u64, u64) {
    let engine = Engine::new(&project_config()).unwrap();
    let mut store = Store::new(&engine, 0u64);
    const BUDGET: u64 = 1 << 40;
    store.set_fuel(BUDGET).unwrap();
    store.fuel_async_yield_interval(Some(10_000_000)).unwrap();
    store.epoch_deadline_callback(|mut ctx| {
        *ctx.data_mut() += 1;
        let left = ctx.get_fuel()?;
        ctx.set_fuel(left - CHARGE)?;
        Ok(UpdateDeadline::Yield(0))
    });
    store.set_epoch_deadline(if charging { 0 } else { u64::MAX / 2 });
    let module = Module::new(&engine, SPIN).unwrap();
    futures::executor::block_on(async {
        let instance = Instance::new_async(&mut store, &module, &[]).await?;
        let spin = instance.get_typed_func::<i32, ()>(&mut store, "spin")?;
        spin.call_async(&mut store, TRIPS).await
    })
    .unwrap();
    (BUDGET - store.get_fuel().unwrap(), *store.data())
}

#[test]
fn fuel_an_epoch_callback_charges_is_charged_exactly() {
    // The new-epoch slow path flushes the loop's fuel counter before the callback and reloads
    // it after, as the out-of-fuel path does. Without that, a callback after the call saw the
    // count as the call left it, and its `set_fuel` re-split that stale count between the
    // active counter and the reserve: the first loop's fuel was counted twice.
    let (plain, none) = fuel_used(false);
    assert_eq!(none, 0);
    let (charged, calls) = fuel_used(true);
    assert!(calls > 2 * TRIPS as u64, "{calls} callbacks");
    assert_eq!(charged, plain + calls * CHARGE);
}

/// The frames of a trap's backtrace, by function name.
fn frames(error: &wasmtime::Error) -> Vec<String> {
    error
        .downcast_ref::<WasmBacktrace>()
        .expect("a wasm backtrace")
        .frames()
        .iter()
        .map(|f| f.func_name().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn running_out_of_fuel_inside_the_loop_traps_with_a_backtrace() {
    let engine = Engine::new(&project_config()).unwrap();
    let mut store = Store::new(&engine, ());
    store.set_epoch_deadline(u64::MAX / 2);
    store.set_fuel(10_000).unwrap();
    let error = run(&mut store, i32::MAX).unwrap_err();
    assert_eq!(error.downcast_ref::<Trap>(), Some(&Trap::OutOfFuel));
    assert_eq!(frames(&error), ["accumulate"]);
    assert_eq!(store.get_fuel().unwrap(), 0);
}

#[test]
fn an_epoch_interrupt_inside_the_loop_traps_with_a_backtrace() {
    let engine = Engine::new(&project_config()).unwrap();
    let mut store = Store::new(&engine, ());
    store.set_fuel(u64::MAX / 2).unwrap();
    store.epoch_deadline_trap();
    store.set_epoch_deadline(1);
    let ticker = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            engine.increment_epoch();
        })
    };
    let error = run(&mut store, i32::MAX).unwrap_err();
    ticker.join().unwrap();
    assert_eq!(error.downcast_ref::<Trap>(), Some(&Trap::Interrupt));
    assert_eq!(frames(&error), ["accumulate"]);
}

#[test]
fn the_epoch_deadline_is_reloaded_after_each_new_epoch() {
    // Each tick moves the deadline one epoch on, so each tick costs one callback. Had the
    // patched slow path not reloaded the deadline the callback stored, the loop would keep the
    // stale one and call back on every later trip (millions of calls).
    let (mut store, calls) = counting_store(|| UpdateDeadline::Continue(1));
    let engine = store.engine().clone();
    store.set_epoch_deadline(1);
    const TICKS: u64 = 5;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (engine, done) = (engine.clone(), done.clone());
        std::thread::spawn(move || {
            let mut ticks = 0;
            while ticks < TICKS && !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                engine.increment_epoch();
                ticks += 1;
            }
            ticks
        })
    };
    // Long enough to see several ticks (a few hundred milliseconds here).
    run(&mut store, 40_000_000).unwrap();
    done.store(true, Ordering::Relaxed);
    let ticks = ticker.join().unwrap();
    let calls = calls.load(Ordering::Relaxed);
    assert!(calls >= 1, "no tick landed inside the loop");
    assert!(calls <= ticks, "{calls} callbacks for {ticks} ticks");
}

/// `scripts/vendor.sh check` on a copy of the vendored tree: whether it passed, and its stderr.
fn vendor_check(tree: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new("bash")
        .arg(support::workspace_root().join("scripts/vendor.sh"))
        .arg("check")
        .env("WASM_INFER_VENDORED", tree)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vendor_check_refuses_a_vendored_tree_missing_one_line_of_the_patch() {
    let root = support::workspace_root();
    let scratch = tempdir("vendor-check");
    let copy = scratch.join("wasmtime-internal-cranelift");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(root.join("vendor/wasmtime-internal-cranelift"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    // The untouched copy is the registry crate plus the patch.
    let (ok, stderr) = vendor_check(&copy);
    assert!(ok, "{stderr}");
    // One line of the patch gone (the out-of-fuel block marked cold).
    let file = copy.join("src/func_environ.rs");
    let text = std::fs::read_to_string(&file).unwrap();
    let line = "        builder.set_cold_block(out_of_gas_block);\n";
    assert_eq!(text.matches(line).count(), 1);
    std::fs::write(&file, text.replacen(line, "", 1)).unwrap();
    let (ok, stderr) = vendor_check(&copy);
    assert!(!ok);
    assert!(
        stderr.contains("differs from the registry crate 48.0.8 plus"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[path = "../host/build/lockfile.rs"]
mod lockfile;
mod support;

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = support::target_dir().join(format!("tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The lockfile cargo writes for a workspace that patches `wasmtime-internal-cranelift` with
/// the vendored tree (as this one does) and pins it at `version`.
fn lockfile_pinning(version: &str) -> String {
    let root = support::workspace_root();
    let dir = tempdir(&format!("pin-{version}"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), "").unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"pin\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             [dependencies]\nwasmtime-internal-cranelift = {{ version = \"={version}\", \
             default-features = false }}\n[patch.crates-io]\nwasmtime-internal-cranelift = \
             {{ path = \"{}\" }}\n[workspace]\n",
            root.join("vendor/wasmtime-internal-cranelift").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("cargo")
        .arg("generate-lockfile")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lock = std::fs::read_to_string(dir.join("Cargo.lock")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    lock
}

#[test]
fn a_pin_the_vendored_crate_does_not_match_fails_the_build() {
    // What build.rs decides from a real lockfile: the vendored version is used; another pin
    // leaves the [patch] unused, which fails this workspace's build (with what to run).
    let ours = std::fs::read_to_string(support::workspace_root().join("Cargo.lock")).unwrap();
    assert_eq!(lockfile::unpatched(&ours), None);
    assert_eq!(lockfile::unpatched(&lockfile_pinning("48.0.8")), None);
    assert_eq!(
        lockfile::unpatched(&lockfile_pinning("48.0.7")),
        Some("records an unused [patch]")
    );
    // And the crate from the registry (no [patch] at all) is caught too.
    let registry = ours.replace(
        "[[package]]\nname = \"wasmtime-internal-cranelift\"\nversion = \"48.0.8\"\n",
        "[[package]]\nname = \"wasmtime-internal-cranelift\"\nversion = \"48.0.8\"\n\
         source = \"registry+https://github.com/rust-lang/crates.io-index\"\n",
    );
    assert_ne!(registry, ours);
    assert_eq!(
        lockfile::unpatched(&registry),
        Some("resolves wasmtime-internal-cranelift from the registry")
    );
}
