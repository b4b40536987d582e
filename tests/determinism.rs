//! The determinism promise (docs/determinism.md): fuel and output bits are the same across
//! runs, processes and x86-64 machines with different CPU features. Two machines are stood in
//! for by two compilations of the same component, one for this CPU's detected features (AVX2,
//! FMA, ...) and one for the baseline (`CpuFeatures::Baseline`, x86-64-v2), which pick different instructions and
//! library calls for the same wasm. What differs without NaN canonicalisation is pinned by a
//! guest that manufactures NaNs and returns their raw bits.

mod support;

use support::{assert_golden, bits, cache_dir, hostile_wasm, minilm_wasm, reference};
use wasm_infer::{AccelMode, CpuFeatures, Input, Limits, Model, Output, Runtime, RuntimeConfig};

fn runtime(nan_canonicalization: bool, cpu_features: CpuFeatures) -> Runtime {
    Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache_dir()),
        // The whole forward pass in the sandbox: the accelerator path computes on the host,
        // outside what the engine compiles.
        accel: AccelMode::Off,
        nan_canonicalization,
        cpu_features,
        ..RuntimeConfig::default()
    })
    .expect("creating the runtime")
}

/// Every reference text through `model`: (name, embedding bits, fuel) per text.
fn embed_all(model: &Model) -> Vec<(String, Vec<Vec<u32>>, u64)> {
    reference()
        .cases
        .iter()
        .map(|case| {
            let outcome = model
                .run(Input::Text(case.text.clone()), &Limits::default())
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            (
                case.name.clone(),
                bits(&outcome),
                outcome.usage.fuel_consumed,
            )
        })
        .collect()
}

/// The engine's compiled-code compatibility hash (target, CPU features, every codegen flag).
fn code_key(runtime: &Runtime) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    runtime
        .engine()
        .precompile_compatibility_hash()
        .hash(&mut hasher);
    hasher.finish()
}

#[test]
fn minilm_gives_the_same_bits_and_fuel_for_baseline_and_host_cpu_features() {
    let host = runtime(false, CpuFeatures::Host);
    let baseline = runtime(false, CpuFeatures::Baseline);
    // Two different compilations, not one cached twice.
    assert_ne!(code_key(&host), code_key(&baseline));
    let on_host = embed_all(&Model::load(&host, minilm_wasm()).expect("loading on host"));
    let on_baseline =
        embed_all(&Model::load(&baseline, minilm_wasm()).expect("loading on baseline"));
    assert_eq!(on_host.len(), reference().cases.len());
    for (h, b) in on_host.iter().zip(&on_baseline) {
        assert_eq!(h.0, b.0);
        assert_eq!(h.2, b.2, "{}: fuel, host vs baseline CPU features", h.0);
        assert!(h.1 == b.1, "{}: embedding bits, host vs baseline", h.0);
    }
    // And the figure both give is the one the other tests pin for this request.
    let short = on_baseline.iter().find(|r| r.0 == "short_bench").unwrap();
    assert_golden("minilm_in_sandbox_short_bench", short.2);
    // The other setting: canonicalisation changes nothing for this model, which never makes a
    // NaN (fuel counts wasm instructions, which the pass does not add to).
    let canonical = runtime(true, CpuFeatures::Host);
    let on_canonical = embed_all(&Model::load(&canonical, minilm_wasm()).expect("loading"));
    for (h, c) in on_host.iter().zip(&on_canonical) {
        assert_eq!(h.2, c.2, "{}: fuel, canonicalisation off vs on", h.0);
        assert!(
            h.1 == c.1,
            "{}: embedding bits, canonicalisation off vs on",
            h.0
        );
    }
}

/// The `nans` command's report under one engine setting.
fn nan_report(nan_canonicalization: bool, cpu_features: CpuFeatures) -> (String, u64) {
    let runtime = runtime(nan_canonicalization, cpu_features);
    let model = Model::load(&runtime, hostile_wasm()).expect("loading hostile.wasm");
    let outcome = model
        .run(Input::Text("nans".into()), &Limits::default())
        .expect("the nans command");
    match outcome.output {
        Output::Text(text) => (text, outcome.usage.fuel_consumed),
        other => panic!("expected text, got {other:?}"),
    }
}

/// With canonicalisation, every NaN an arithmetic operation produces, scalar or f32x4, is the
/// one pattern 0x7fc00000 (f64: 0x7ff8000000000000), whatever the inputs' payloads and the
/// CPU features. Non-arithmetic operations (neg, abs, copysign) are bit operations: they keep
/// the payload they were given, under either setting.
const CANONICAL: &str = "\
0/0=7fc00000
sqrt(-1)=7fc00000
inf-inf=7fc00000
0*inf=7fc00000
snan+1=7fc00000
1+snan=7fc00000
-qnan*1=7fc00000
snan+-qnan=7fc00000
-qnan+snan=7fc00000
qnan*-qnan=7fc00000
f64 0/0=7ff80000
x4 add=7fc00000,00000000,7fc00000,7fc00000
x4 mul=7fc00000,00000000,ff800000,7fc00000
x4 div=7fc00000,7fc00000,7fc00000,7fc00000
x4 sqrt=7fc00000,7fc00000,7fc00000,3f800000
-snan=ffa00001
abs(-qnan)=7fc00002
copysign(snan,-1)=ffa00001
";

/// Without it, the CPU's rules: an invalid operation (0/0, sqrt(-1), inf-inf, 0*inf) gives
/// x86's default NaN 0xffc00000 (sign set; aarch64 would give 0x7fc00000); a NaN operand
/// propagates with its quiet bit set (0x7fa00001 -> 0x7fe00001); with two NaN operands, the
/// first operand's payload wins (Cranelift keeps wasm's operand order on x86-64, so
/// `snan+-qnan` and `-qnan+snan` differ). These are x86-64 rules that SSE2 and AVX encodings
/// share, which is why the two compilations agree; another architecture, or a compiler that
/// swapped the operands of a commutative op, could give other bits, which is what the
/// promise without canonicalisation leaves out.
const X86_64: &str = "\
0/0=ffc00000
sqrt(-1)=ffc00000
inf-inf=ffc00000
0*inf=ffc00000
snan+1=7fe00001
1+snan=7fe00001
-qnan*1=ffc00002
snan+-qnan=7fe00001
-qnan+snan=ffc00002
qnan*-qnan=7fc00003
f64 0/0=fff80000
x4 add=7fe00001,00000000,ffc00000,ffc00002
x4 mul=7fe00001,00000000,ff800000,ffc00002
x4 div=7fe00001,ffc00000,ffc00000,ffc00002
x4 sqrt=ffc00000,7fe00001,ffc00002,3f800000
-snan=ffa00001
abs(-qnan)=7fc00002
copysign(snan,-1)=ffa00001
";

#[test]
fn canonicalised_nans_have_one_bit_pattern_on_every_cpu() {
    let (host, host_fuel) = nan_report(true, CpuFeatures::Host);
    let (baseline, baseline_fuel) = nan_report(true, CpuFeatures::Baseline);
    assert_eq!(host, CANONICAL);
    assert_eq!(baseline, CANONICAL);
    assert_eq!(host_fuel, baseline_fuel);
}

#[test]
fn without_canonicalisation_nans_carry_the_x86_64_payloads() {
    let (host, host_fuel) = nan_report(false, CpuFeatures::Host);
    let (baseline, baseline_fuel) = nan_report(false, CpuFeatures::Baseline);
    assert_eq!(host, X86_64);
    assert_eq!(baseline, X86_64);
    // The same wasm instructions run under either setting: the fuel is the same too.
    assert_eq!(host_fuel, baseline_fuel);
    assert_eq!(host_fuel, nan_report(true, CpuFeatures::Host).1);
}

/// One core module that computes every NaN-producing (and NaN-consuming) float instruction of
/// WebAssembly, scalar, SIMD and relaxed SIMD, over every combination of a set of operands with
/// NaN payloads (quiet and signalling, both signs) and ordinary values, and stores the raw
/// results. Inputs are read from memory, so nothing is folded at compile time. Returns the WAT
/// and, per instruction, the byte range its results occupy.
fn every_nan_instruction() -> (String, Vec<(String, std::ops::Range<usize>)>) {
    const F32: [u32; 10] = [
        0x7fc1_2345, // quiet NaN with a payload
        0x7fa0_0001, // signalling NaN
        0xffc0_0002, // negative quiet NaN
        0xff81_2345, // negative signalling NaN
        0x3f80_0000, // 1
        0x0000_0000, // 0
        0x7f80_0000, // inf
        0xff80_0000, // -inf
        0xbf80_0000, // -1
        0x8000_0000, // -0
    ];
    const F64: [u64; 8] = [
        0x7ff8_0000_1234_5678,
        0x7ff0_0000_0000_0001,
        0xfff8_0000_0000_0002,
        0x3ff0_0000_0000_0000,
        0x0000_0000_0000_0000,
        0x7ff0_0000_0000_0000,
        0xfff0_0000_0000_0000,
        0xbff0_0000_0000_0000,
    ];
    // Each table twice in a row, so a v128 load at any element's offset stays inside it.
    let f32_base = 0;
    let f64_base = 2 * F32.len() * 4;
    let mut data = String::new();
    for v in F32.iter().chain(&F32) {
        data.extend(v.to_le_bytes().iter().map(|b| format!("\\{b:02x}")));
    }
    for v in F64.iter().chain(&F64) {
        data.extend(v.to_le_bytes().iter().map(|b| format!("\\{b:02x}")));
    }
    let out_base = 4096;
    let mut body = String::new();
    let mut ranges = Vec::new();
    let mut at = out_base;
    let mut emit = |name: &str, store: &str, width: usize, exprs: Vec<String>| {
        let start = at;
        for e in exprs {
            body.push_str(&format!("({store} (i32.const {at}) {e})\n"));
            at += width;
        }
        ranges.push((name.to_string(), start - out_base..at - out_base));
    };
    let s32 = |i: usize| format!("(f32.load (i32.const {}))", f32_base + 4 * i);
    let s64 = |i: usize| format!("(f64.load (i32.const {}))", f64_base + 8 * i);
    let v32 = |i: usize| format!("(v128.load (i32.const {}))", f32_base + 4 * i);
    let v64 = |i: usize| format!("(v128.load (i32.const {}))", f64_base + 8 * i);
    let (n32, n64) = (F32.len(), F64.len());
    let pairs = |n: usize| (0..n).flat_map(move |i| (0..n).map(move |j| (i, j)));
    let triples = |n: usize| {
        (0..n).flat_map(move |i| (0..n).flat_map(move |j| (0..n).map(move |k| (i, j, k))))
    };
    for op in ["add", "sub", "mul", "div", "min", "max", "copysign"] {
        let e = pairs(n32).map(|(i, j)| format!("(f32.{op} {} {})", s32(i), s32(j)));
        emit(&format!("f32.{op}"), "f32.store", 4, e.collect());
        let e = pairs(n64).map(|(i, j)| format!("(f64.{op} {} {})", s64(i), s64(j)));
        emit(&format!("f64.{op}"), "f64.store", 8, e.collect());
    }
    for op in ["sqrt", "ceil", "floor", "trunc", "nearest", "neg", "abs"] {
        let e = (0..n32).map(|i| format!("(f32.{op} {})", s32(i)));
        emit(&format!("f32.{op}"), "f32.store", 4, e.collect());
        let e = (0..n64).map(|i| format!("(f64.{op} {})", s64(i)));
        emit(&format!("f64.{op}"), "f64.store", 8, e.collect());
    }
    let e = (0..n32).map(|i| format!("(f64.promote_f32 {})", s32(i)));
    emit("f64.promote_f32", "f64.store", 8, e.collect());
    let e = (0..n64).map(|i| format!("(f32.demote_f64 {})", s64(i)));
    emit("f32.demote_f64", "f32.store", 4, e.collect());
    for op in ["i32.trunc_sat_f32_s", "i32.trunc_sat_f32_u"] {
        let e = (0..n32).map(|i| format!("({op} {})", s32(i)));
        emit(op, "i32.store", 4, e.collect());
    }
    let binary32 = [
        "f32x4.add",
        "f32x4.sub",
        "f32x4.mul",
        "f32x4.div",
        "f32x4.min",
        "f32x4.max",
        "f32x4.pmin",
        "f32x4.pmax",
        "f32x4.relaxed_min",
        "f32x4.relaxed_max",
    ];
    for op in binary32 {
        let e = pairs(n32).map(|(i, j)| format!("({op} {} {})", v32(i), v32(j)));
        emit(op, "v128.store", 16, e.collect());
    }
    let binary64 = [
        "f64x2.add",
        "f64x2.sub",
        "f64x2.mul",
        "f64x2.div",
        "f64x2.min",
        "f64x2.max",
        "f64x2.pmin",
        "f64x2.pmax",
        "f64x2.relaxed_min",
        "f64x2.relaxed_max",
    ];
    for op in binary64 {
        let e = pairs(n64).map(|(i, j)| format!("({op} {} {})", v64(i), v64(j)));
        emit(op, "v128.store", 16, e.collect());
    }
    let unary32 = [
        "f32x4.sqrt",
        "f32x4.ceil",
        "f32x4.floor",
        "f32x4.trunc",
        "f32x4.nearest",
        "f32x4.neg",
        "f32x4.abs",
        "f64x2.promote_low_f32x4",
        "i32x4.trunc_sat_f32x4_s",
        "i32x4.trunc_sat_f32x4_u",
        "i32x4.relaxed_trunc_f32x4_s",
        "i32x4.relaxed_trunc_f32x4_u",
    ];
    for op in unary32 {
        let e = (0..n32).map(|i| format!("({op} {})", v32(i)));
        emit(op, "v128.store", 16, e.collect());
    }
    let unary64 = [
        "f64x2.sqrt",
        "f64x2.ceil",
        "f64x2.floor",
        "f64x2.trunc",
        "f64x2.nearest",
        "f64x2.neg",
        "f64x2.abs",
        "f32x4.demote_f64x2_zero",
        "i32x4.trunc_sat_f64x2_s_zero",
        "i32x4.trunc_sat_f64x2_u_zero",
        "i32x4.relaxed_trunc_f64x2_s_zero",
        "i32x4.relaxed_trunc_f64x2_u_zero",
    ];
    for op in unary64 {
        let e = (0..n64).map(|i| format!("({op} {})", v64(i)));
        emit(op, "v128.store", 16, e.collect());
    }
    for op in ["f32x4.relaxed_madd", "f32x4.relaxed_nmadd"] {
        let e = triples(n32).map(|(i, j, k)| format!("({op} {} {} {})", v32(i), v32(j), v32(k)));
        emit(op, "v128.store", 16, e.collect());
    }
    for op in ["f64x2.relaxed_madd", "f64x2.relaxed_nmadd"] {
        let e = triples(n64).map(|(i, j, k)| format!("({op} {} {} {})", v64(i), v64(j), v64(k)));
        emit(op, "v128.store", 16, e.collect());
    }
    let pages = at.div_ceil(65536);
    let wat = format!(
        "(module (memory (export \"memory\") {pages}) (data (i32.const 0) \"{data}\")\n\
         (func (export \"run\")\n{body}))"
    );
    (wat, ranges)
}

/// Runs the module of [`every_nan_instruction`] on an engine with these settings, at the
/// project's defaults otherwise: the results' bytes and the fuel the run used.
fn every_nan_results(wat: &str, cpu_features: CpuFeatures, nan: bool) -> (Vec<u8>, u64) {
    use wasmtime::{Engine, Instance, Module, Store};
    let settings = wasm_infer::EngineSettings {
        meter_fuel: true,
        pool: None,
        nan_canonicalization: nan,
        cpu_features,
    };
    let engine = Engine::new(&settings.config().unwrap()).unwrap();
    let module = Module::new(&engine, wat).unwrap();
    let mut store = Store::new(&engine, ());
    store.set_fuel(1 << 40).unwrap();
    store.set_epoch_deadline(1 << 40);
    futures::executor::block_on(async {
        let instance = Instance::new_async(&mut store, &module, &[]).await.unwrap();
        let run = instance
            .get_typed_func::<(), ()>(&mut store, "run")
            .unwrap();
        run.call_async(&mut store, ()).await.unwrap();
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        let fuel = (1 << 40) - store.get_fuel().unwrap();
        (memory.data(&store)[4096..].to_vec(), fuel)
    })
}

#[test]
fn every_nan_producing_instruction_gives_the_same_bits_on_host_and_baseline_cpu_features() {
    let (wat, ranges) = every_nan_instruction();
    // docs/determinism.md counts the instructions covered.
    assert_eq!(ranges.len(), 80);
    for nan_canonicalization in [false, true] {
        let (host, host_fuel) = every_nan_results(&wat, CpuFeatures::Host, nan_canonicalization);
        let (baseline, baseline_fuel) =
            every_nan_results(&wat, CpuFeatures::Baseline, nan_canonicalization);
        let differing: Vec<&str> = ranges
            .iter()
            .filter(|(_, r)| host[r.clone()] != baseline[r.clone()])
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(
            differing.is_empty(),
            "canonicalisation {nan_canonicalization}: host and baseline differ in {differing:?}"
        );
        assert_eq!(host_fuel, baseline_fuel);
        // Not vacuous: the operands' NaNs reached the results. x86's rule, which both
        // compilations follow: a quiet NaN operand comes out unchanged, a signalling one with
        // its quiet bit set (0x7fa00001 -> 0x7fe00001); canonicalisation makes both 0x7fc00000.
        let word = |name: &str, index: usize| {
            let r = &ranges.iter().find(|(n, _)| n == name).unwrap().1;
            let at = r.start + 4 * index;
            u32::from_le_bytes(host[at..at + 4].try_into().unwrap())
        };
        let (ceil_qnan, ceil_snan, add_snan_1) = (
            word("f32.ceil", 0),
            word("f32.ceil", 1),
            word("f32.add", 14), // operands 1 (the signalling NaN) and 4 (1.0)
        );
        if nan_canonicalization {
            assert_eq!(
                (ceil_qnan, ceil_snan, add_snan_1),
                (0x7fc0_0000, 0x7fc0_0000, 0x7fc0_0000)
            );
        } else {
            assert_eq!(
                (ceil_qnan, ceil_snan, add_snan_1),
                (0x7fc1_2345, 0x7fe0_0001, 0x7fe0_0001)
            );
        }
    }
}
