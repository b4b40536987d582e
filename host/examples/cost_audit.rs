//! `just cost-audit`: host CPU time per fuel unit for every host call a guest can make (each
//! `accel` operation at MiniLM's shapes and at adversarial ones, the linked WASI calls that do
//! work in proportion to their arguments, the result copy-out), against plain wasm loops.
//!
//! Each row runs the `hostile` guest's `op:NAME,REPS,SHAPE` (or another command) twice, with a
//! few repetitions and with many more, and divides the difference in the process's CPU time
//! (user + system, every thread: candle's CPU backend is multi-threaded) by the difference in
//! fuel, so fixed costs (instantiation, making the operands) cancel out. Each figure is the
//! median of three such pairs. `ratio` is that figure over the typical wasm loop's (`work:N`).
//!
//! Usage: `cargo run --release --example cost_audit -- HOSTILE_WASM [ONLY]` (ONLY keeps the
//! rows whose name contains it). Prints a Markdown table. `... HOSTILE_WASM overshoot` measures
//! instead how far past a wall-time limit runs of long host calls go (docs/cost-audit.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use wasm_infer::{AccelMode, Input, Limits, LoadOptions, Model, Runtime, RuntimeConfig};

/// CPU time this process has used (every thread), in nanoseconds.
fn cpu_ns() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e9 + tv.tv_usec as f64 * 1e3;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// (CPU ns, fuel) of one run of `command`.
fn measure(model: &Model, limits: &Limits, command: &str) -> (f64, u64) {
    let start = cpu_ns();
    let outcome = model
        .run(Input::Text(command.into()), limits)
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    let cpu = cpu_ns() - start;
    if let wasm_infer::Output::Text(text) = &outcome.output {
        assert!(!text.starts_with("error"), "{command}: {text}");
    }
    (cpu, outcome.usage.fuel_consumed)
}

/// Host ns per fuel unit of the part of `command(reps)` that grows with `reps`.
fn ns_per_fuel(
    model: &Model,
    limits: &Limits,
    command: &dyn Fn(u64) -> String,
    max_reps: u64,
) -> f64 {
    // Size the repetitions so the difference is about 150 ms of CPU.
    let (one, _) = measure(model, limits, &command(1));
    let (two, _) = measure(model, limits, &command(2));
    let per = (two - one).max(20_000.0);
    let reps = ((150e6 / per) as u64).clamp(4, max_reps);
    let mut samples: Vec<f64> = (0..3)
        .map(|_| {
            let (c1, f1) = measure(model, limits, &command(1));
            let (c2, f2) = measure(model, limits, &command(1 + reps));
            (c2 - c1).max(0.0) / (f2 - f1) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[1]
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: cost_audit HOSTILE_WASM");
    let runtime = Runtime::with_config(RuntimeConfig {
        accel: AccelMode::Cpu,
        device_memory: 16 << 30,
        ..RuntimeConfig::default()
    })
    .unwrap();
    // The resident row binds a new name each time (the same content, one copy): every name
    // counts against the model's resident budget, so the audit's model has no cap on them.
    let options = LoadOptions {
        resident_memory: u64::MAX,
        ..LoadOptions::default()
    };
    let model = Model::load_with(&runtime, &path, &options).unwrap();
    let limits = Limits::default()
        .fuel(u64::MAX / 4)
        .memory(2 << 30)
        .device_memory(8 << 30)
        .max_output(512 << 20)
        .wall_time(Duration::from_secs(600));

    let op = |spec: &'static str| {
        move |reps: u64| {
            let (name, shape) = spec.split_once(',').unwrap_or((spec, ""));
            if shape.is_empty() {
                format!("op:{name},{reps}")
            } else {
                format!("op:{name},{reps},{shape}")
            }
        }
    };
    type Row = (&'static str, &'static str, Box<dyn Fn(u64) -> String>);
    let rows: Vec<Row> = vec![
        (
            "wasm: typical loop",
            "work:N",
            Box::new(|n| format!("work:{}", n * 10_000)),
        ),
        (
            "wasm: pointer chase",
            "64 MiB cycle",
            Box::new(|n| format!("chase:64,{}", n * 100_000)),
        ),
        (
            "accel linear",
            "MiniLM 128x384·384",
            Box::new(op("linear,128,384,384")),
        ),
        (
            "accel linear",
            "MiniLM 128x384·1536",
            Box::new(op("linear,128,384,1536")),
        ),
        (
            "accel linear",
            "MiniLM 128x1536·384",
            Box::new(op("linear,128,1536,384")),
        ),
        (
            "accel linear",
            "k=1: 2048x1·2048",
            Box::new(op("linear,2048,1,2048")),
        ),
        (
            "accel linear",
            "n=1: 65536x64·1",
            Box::new(op("linear,65536,64,1")),
        ),
        (
            "accel linear",
            "dot: 1x1048576·1",
            Box::new(op("linear,1,1048576,1")),
        ),
        ("accel linear", "1x1·1", Box::new(op("linear,1,1,1"))),
        (
            "accel attention",
            "MiniLM 128x384, 12 heads",
            Box::new(op("attention,128,384,12")),
        ),
        (
            "accel attention",
            "head size 1: 256x256, 256 heads",
            Box::new(op("attention,256,256,256")),
        ),
        (
            "accel attention",
            "1 head: 2048x1",
            Box::new(op("attention,2048,1,1")),
        ),
        (
            "accel attention",
            "1x1, 1 head",
            Box::new(op("attention,1,1,1")),
        ),
        (
            "accel layer-norm",
            "MiniLM 128x384",
            Box::new(op("layer-norm,128,384")),
        ),
        (
            "accel layer-norm",
            "rows of 1: 1048576x1",
            Box::new(op("layer-norm,1048576,1")),
        ),
        (
            "accel layer-norm",
            "one row: 1x1048576",
            Box::new(op("layer-norm,1,1048576")),
        ),
        ("accel gelu", "MiniLM 128x1536", Box::new(op("gelu,196608"))),
        ("accel gelu", "1 element", Box::new(op("gelu,1"))),
        (
            "accel upload",
            "1 Mi floats",
            Box::new(op("upload,1048576")),
        ),
        ("accel upload", "1 float", Box::new(op("upload,1"))),
        (
            "accel download",
            "1 Mi floats",
            Box::new(op("download,1048576")),
        ),
        ("accel download", "1 float", Box::new(op("download,1"))),
        (
            "accel resident",
            "1 Mi floats (hashed)",
            Box::new(|reps| {
                // A model's names outlive its runs: a fresh prefix keeps every bind new.
                static PREFIX: AtomicU64 = AtomicU64::new(0);
                let prefix = PREFIX.fetch_add(1, Ordering::Relaxed);
                format!("op:resident,{reps},1048576,{prefix}")
            }),
        ),
        ("accel tensor.shape", "-", Box::new(op("shape"))),
        (
            "wasi get-random-bytes",
            "1 MiB",
            Box::new(op("random,1048576")),
        ),
        ("wasi get-random-bytes", "16 B", Box::new(op("random,16"))),
        (
            "wasi get-insecure-random-bytes",
            "1 MiB",
            Box::new(op("insecure-random,1048576")),
        ),
        (
            "wasi output-stream.write",
            "64 KiB",
            Box::new(op("write,65536")),
        ),
        ("wasi output-stream.write", "1 B", Box::new(op("write,1"))),
        (
            "wasi input-stream.read",
            "64 KiB (stdin closed)",
            Box::new(op("read,65536")),
        ),
        ("wasi poll", "1,000 pollables", Box::new(op("poll,1000"))),
        ("wasi poll", "1 pollable", Box::new(op("poll,1"))),
        ("wasi get-stdout + drop", "2 calls", Box::new(op("stdout"))),
        (
            "wasi resolve-addresses",
            "1 MiB name (refused)",
            Box::new(op("resolve,1048576,0")),
        ),
        (
            "result copy-out",
            "bytes:N (1 MiB steps)",
            Box::new(|n| format!("bytes:{}", n << 20)),
        ),
    ];
    if std::env::args().nth(2).as_deref() == Some("overshoot") {
        overshoot(&model, &limits);
        return;
    }
    // An optional second argument keeps only the rows whose name contains it (and the typical
    // loop, the unit of the ratios).
    let only = std::env::args().nth(2);
    let mut typical = None;
    println!("| host call | shape | ns per fuel | ratio to the typical wasm loop |");
    println!("|---|---|---:|---:|");
    for (name, shape, command) in &rows {
        if typical.is_some() && only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        // Output past 64 MiB would need more memory than the audit is worth.
        let max_reps = if name.starts_with("result") {
            63
        } else {
            200_000
        };
        let ns = ns_per_fuel(&model, &limits, command.as_ref(), max_reps);
        let base = *typical.get_or_insert(ns);
        println!("| {name} | {shape} | {ns:.3} | {:.1}x |", ns / base);
    }
}

/// `cost_audit HOSTILE_WASM overshoot`: how far past a 100 ms wall-time limit a run goes when
/// the deadline falls inside long host calls, against how long one such call takes (what a
/// call that does not check the deadline as it goes could add). Medians and maxima of 5 runs.
fn overshoot(model: &Model, limits: &Limits) {
    let wall = Duration::from_millis(100);
    let limited = limits.clone().wall_time(wall);
    let cases = [
        (
            "attention, 1 head 2048x1024 (2^33 MACs)",
            "attention",
            "2048,1024,1",
        ),
        (
            "linear 2048x1024·2048 (2^32 MACs)",
            "linear",
            "2048,1024,2048",
        ),
        ("get-random-bytes 1 MiB", "random", "1048576"),
        ("output-stream.write 64 KiB", "write", "65536"),
    ];
    println!("| calls in a loop | one call (ms) | past a 100 ms limit: median (ms) | max (ms) |");
    println!("|---|---:|---:|---:|");
    for (label, name, shape) in cases {
        let wall_of = |reps: u64| {
            let outcome = model
                .run(Input::Text(format!("op:{name},{reps},{shape}")), limits)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            outcome.usage.wall_time.as_secs_f64() * 1e3
        };
        let mut one: Vec<f64> = (0..3).map(|_| wall_of(2) - wall_of(1)).collect();
        one.sort_by(f64::total_cmp);
        let mut past: Vec<f64> = (0..5)
            .map(|_| {
                let command = format!("op:{name},1000000,{shape}");
                match model.run(Input::Text(command), &limited) {
                    Err(e) => match e.error.limit() {
                        Some(&wasm_infer::LimitExceeded::WallTime { elapsed, .. }) => {
                            (elapsed - wall).as_secs_f64() * 1e3
                        }
                        _ => panic!("{name}: {}", e.error),
                    },
                    Ok(_) => panic!("{name}: finished inside the limit"),
                }
            })
            .collect();
        past.sort_by(f64::total_cmp);
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} |",
            one[1], past[2], past[4]
        );
    }
}
