//! The determinism promise (README, "Determinism"): fuel and output bits are the same across
//! runs, processes and x86-64 machines with different CPU features. Two machines are stood in
//! for by two compilations of the same component, one for this CPU's detected features (AVX2,
//! FMA, ...) and one for the x86-64 baseline (SSE2), which pick different instructions and
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
