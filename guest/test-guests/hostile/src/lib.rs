//! A test guest of the `model` world whose `infer` does what its text input commands, so each
//! limit and failure path can be driven from a test:
//!
//! | input            | behaviour                                                    |
//! |------------------|--------------------------------------------------------------|
//! | `echo:TEXT`      | returns `TEXT` (a well-behaved run)                          |
//! | `work:N`         | N iterations of a small loop, then returns N (exact fuel)    |
//! | `spin`           | loops forever without calling anything                       |
//! | `grow`           | allocates 1 MiB blocks forever (the allocator aborts on OOM) |
//! | `grow-pages:N`   | one `memory.grow` of N pages; returns the old size or -1     |
//! | `handled-grow:N` | a refused grow of N pages, a granted one of 1, then a panic  |
//! | `recurse`        | unbounded recursion (stack overflow)                         |
//! | `panic`          | panics with a message on stderr                              |
//! | `bytes:N`        | returns N bytes of output                                    |
//! | `empty-vectors:N`| returns N empty embedding vectors                            |
//! | `fill:MIB`       | `memory.fill`s a MIB-MiB buffer forever (bulk memory)        |
//! | `print:N`        | writes N lines to stdout, then returns                       |
//! | `sleep`          | sleeps for an hour in a host call                            |
//! | `host-loop`      | calls a cheap import (the monotonic clock) forever           |
//! | `clock:N`        | reads both clocks N times; reports what it saw               |
//! | `env`            | counts environment variables and arguments                   |
//! | `read-file:PATH` | tries to read PATH; reports the error                        |
//! | `list-dir:PATH`  | tries to list PATH; reports the error                        |
//! | `connect:ADDR`   | tries a TCP connection to ADDR; reports the error            |
//! | `resolve:HOST`   | tries a DNS lookup of HOST; reports the error                |
//! | `abort`          | `std::process::abort()`                                      |
//! | `stdin`          | reads stdin to the end; reports how much it got              |
//! | `accel-info`     | reports the accelerator's kind, budget and use               |
//! | `accel-loop:MIB` | uploads MIB-MiB tensors, keeping them, until refused         |
//! | `accel-huge`     | asks for a 16 GiB linear-layer result; reports the refusal   |
//! | `accel-unwrap`   | the same, but panics on the refusal (no fallback)            |
//! | `accel-linear:M,K,N` | a linear layer + GELU on the device vs in the sandbox    |
//! | `accel-handled`  | a refused device allocation, a granted one, then a panic     |
//! | `accel-hold:CMD` | holds 4 MiB on the device, then runs CMD                     |
//! | `accel-rank:N`   | uploads one value with an N-dimensional shape; reports       |
//! | `accel-overflow` | uploads a shape whose element count overflows; reports       |
//! | `accel-k0`       | a linear layer with k = 0; reports                           |
//! | `accel-handles`  | uploads one-value tensors, keeping them, forever             |
//! | `accel-forged`   | calls a method on a handle it never got                      |
//! | `accel-dropped`  | calls a method on a handle it already dropped                |
//! | `nans`           | makes NaNs (0/0, sqrt(-1), inf-inf, f32x4 ops on NaN payloads) and returns their raw bits |
//! | `accel-or-sandbox:N` | with a device: uploads N floats and panics if refused; with none (`--accel off`, or hidden from the run): sums N halves in the sandbox; reports which |
//! | `op:NAME,REPS,D1,..` | makes the operands once, then calls host op NAME REPS times at shape D1,..; for the cost audit and the cost-model tests (see `op`) |
//! | `chase:MIB,N`    | N steps of a pointer chase over a MIB-MiB random cycle (wasm's own worst case: a cache miss per step) |
//! | `accel-bind:RUN,COUNT,KIB` | binds COUNT fresh resident weights of KIB KiB (names `RUN.i`, content unique to RUN and i), keeping them; reports how many were bound and the refusal |
//! | `accel-resident:NAME,SEED` | binds a 4x4 resident weight NAME to `ramp(SEED)`, reports the data it got, then tries to download it and to rebind NAME to another shape |

wit_bindgen::generate!({
    world: "model",
    path: "../../../wit",
});

use std::hint::black_box;

use wasm_infer::model::accel::{self, AccelError, Tensor};
use wasm_infer::model::types::{DataKind, ErrorCode};

struct Hostile;

fn refusal(e: &AccelError) -> String {
    match e {
        AccelError::BudgetExceeded(r) => format!("{} {} {}", r.requested, r.used, r.budget),
        other => format!("{other:?}"),
    }
}

fn upload_mib(mib: usize) -> Result<Tensor, AccelError> {
    let n = mib << 18; // f32s in `mib` MiB
    accel::upload(&[n as u32], &vec![0.5f32; n])
}

/// Deterministic test data: small exact values, so results compare closely.
fn ramp(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7 + seed) % 13) as f32 - 6.0) / 8.0)
        .collect()
}

fn erf(x: f64) -> f64 {
    // The Maclaurin series, exact to ~1e-9 in f64 for |x| < 4; beyond, erf is ±1 to 1.6e-8.
    if x.abs() >= 4.0 {
        return x.signum();
    }
    let mut sum = 0.0;
    let mut term = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// `gelu(x · wᵀ + b)` on the device and in the sandbox; reports the largest difference.
fn accel_linear(m: usize, k: usize, n: usize) -> Result<String, AccelError> {
    let (x, w, b) = (ramp(m * k, 1), ramp(n * k, 2), ramp(n, 3));
    let dx = accel::upload(&[m as u32, k as u32], &x)?;
    let dw = accel::upload(&[n as u32, k as u32], &w)?;
    let db = accel::upload(&[n as u32], &b)?;
    let y = accel::linear(&dx, &dw, Some(&db))?;
    let g = accel::gelu(&y)?;
    assert_eq!(g.shape(), vec![m as u32, n as u32]);
    let device = g.download()?;
    let mut max_diff = 0f64;
    for i in 0..m {
        for j in 0..n {
            let mut acc = b[j] as f64;
            for t in 0..k {
                acc += x[i * k + t] as f64 * w[j * k + t] as f64;
            }
            let expected = 0.5 * acc * (1.0 + erf(acc / std::f64::consts::SQRT_2));
            max_diff = max_diff.max((expected - device[i * n + j] as f64).abs());
        }
    }
    Ok(format!("max_diff_ok={}", max_diff < 1e-4))
}

/// A NaN with a non-canonical payload: signalling (quiet bit clear), payload 1.
const SNAN: u32 = 0x7fa0_0001;
/// A negative quiet NaN with payload 2.
const NEG_QNAN: u32 = 0xffc0_0002;
/// A positive quiet NaN with payload 3.
const QNAN: u32 = 0x7fc0_0003;

fn f(bits: u32) -> f32 {
    black_box(f32::from_bits(bits))
}

/// `name=bits` (hex) for every NaN-producing operation, in a fixed order. Inputs pass through
/// `black_box` so that the compiler cannot fold them: each is a real wasm instruction at run
/// time. Scalar first, then the same cases lane-wise in f32x4, then what non-arithmetic
/// operations (neg, abs, copysign) do to a payload.
#[allow(clippy::eq_op)] // 0/0 and inf-inf are the point: NaN-producing operations
fn nan_report() -> String {
    use core::arch::wasm32::*;
    let zero = black_box(0.0f32);
    let one = black_box(1.0f32);
    let inf = black_box(f32::INFINITY);
    let scalar = [
        ("0/0", (zero / zero).to_bits()),
        ("sqrt(-1)", (-one).sqrt().to_bits()),
        ("inf-inf", (inf - inf).to_bits()),
        ("0*inf", (zero * inf).to_bits()),
        ("snan+1", (f(SNAN) + one).to_bits()),
        ("1+snan", (one + f(SNAN)).to_bits()),
        ("-qnan*1", (f(NEG_QNAN) * one).to_bits()),
        ("snan+-qnan", (f(SNAN) + f(NEG_QNAN)).to_bits()),
        ("-qnan+snan", (f(NEG_QNAN) + f(SNAN)).to_bits()),
        ("qnan*-qnan", (f(QNAN) * f(NEG_QNAN)).to_bits()),
        (
            "f64 0/0",
            ((black_box(0.0f64) / black_box(0.0f64)).to_bits() >> 32) as u32,
        ),
    ];
    let a = f32x4(f(SNAN), zero, inf, f(NEG_QNAN));
    let b = f32x4(one, zero, -inf, f(QNAN));
    let lanes = |v: v128| {
        [
            f32x4_extract_lane::<0>(v).to_bits(),
            f32x4_extract_lane::<1>(v).to_bits(),
            f32x4_extract_lane::<2>(v).to_bits(),
            f32x4_extract_lane::<3>(v).to_bits(),
        ]
    };
    let vector = [
        ("x4 add", lanes(f32x4_add(black_box(a), black_box(b)))),
        ("x4 mul", lanes(f32x4_mul(black_box(a), black_box(b)))),
        ("x4 div", lanes(f32x4_div(black_box(a), black_box(b)))),
        (
            "x4 sqrt",
            lanes(f32x4_sqrt(black_box(f32x4(
                -one,
                f(SNAN),
                f(NEG_QNAN),
                one,
            )))),
        ),
    ];
    let mut text = String::new();
    for (name, bits) in scalar {
        text.push_str(&format!("{name}={bits:08x}\n"));
    }
    for (name, bits) in vector {
        text.push_str(&format!(
            "{name}={:08x},{:08x},{:08x},{:08x}\n",
            bits[0], bits[1], bits[2], bits[3]
        ));
    }
    for (name, bits) in [
        ("-snan", (-f(SNAN)).to_bits()),
        ("abs(-qnan)", f(NEG_QNAN).abs().to_bits()),
        ("copysign(snan,-1)", f(SNAN).copysign(-one).to_bits()),
    ] {
        text.push_str(&format!("{name}={bits:08x}\n"));
    }
    text
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Binds the 4x4 resident `name` to `ramp(16, seed)`; reports which ramp it is really bound to
/// (read through a linear layer, `I · wᵀ`), and the answers to a download and a rebinding.
fn accel_resident(name: &str, seed: usize) -> Result<String, AccelError> {
    let w = accel::resident(name, &[4, 4], &le_bytes(&ramp(16, seed)))?;
    let identity: Vec<f32> = (0..16).map(|i| f32::from(i % 5 == 0)).collect();
    let x = accel::upload(&[4, 4], &identity)?;
    let transposed = accel::linear(&x, &w, None)?.download()?;
    let values: Vec<f32> = (0..16).map(|i| transposed[(i % 4) * 4 + i / 4]).collect();
    let bound = (0..13)
        .find(|&s| ramp(16, s) == values)
        .map_or("none".to_string(), |s| s.to_string());
    let download = match w.download() {
        Ok(values) => format!("downloaded {} values", values.len()),
        Err(e) => refusal(&e),
    };
    let rebind = match accel::resident(name, &[16], &le_bytes(&ramp(16, seed))) {
        Ok(_) => "rebound".to_string(),
        Err(e) => refusal(&e),
    };
    Ok(format!("bound={bound} download={download} rebind={rebind}"))
}

/// `accel-bind:RUN,COUNT,KIB`: binds COUNT resident weights of KIB KiB each under the names
/// `RUN.i`, each with data no other (RUN, i) has (so each is a new physical copy), keeping them
/// until the run ends; reports `bound N` and, if a bind was refused, its answer.
fn accel_bind(arg: &str) -> String {
    let parts: Vec<u64> = arg.split(',').map(number).collect();
    let (run, count, kib) = (parts[0], parts[1], parts[2] as usize);
    let mut values = ramp(kib << 8, 0);
    let mut held = Vec::new();
    for i in 0..count {
        values[0] = (run * count + i) as f32;
        let name = format!("{run}.{i}");
        match accel::resident(&name, &[values.len() as u32], &le_bytes(&values)) {
            Ok(w) => held.push(w),
            Err(e) => return format!("bound {} refused {}", held.len(), refusal(&e)),
        }
    }
    format!("bound {}", held.len())
}

/// `timer:NANOS,UNITS`: subscribes to a timer of NANOS and does up to UNITS units of work,
/// polling the timer between them; reports how many units ran before it was ready. On real
/// time the count depends on the host's speed; on the sandbox's frozen clock it cannot.
fn poll_timer(arg: &str) -> String {
    let (nanos, units) = arg.split_once(',').expect("NANOS,UNITS");
    let timer = wasip2::clocks::monotonic_clock::subscribe_duration(number(nanos));
    let mut done = 0;
    let mut acc = 0u64;
    while done < number(units) && !timer.ready() {
        for i in 0..100_000u64 {
            acc = black_box(acc.wrapping_mul(31).wrapping_add(i));
        }
        done += 1;
    }
    format!("units={done} ready={}", timer.ready())
}

/// `op:NAME,REPS,DIMS`: the operands of host call NAME at shape DIMS are made once, then the
/// call is made REPS times (results dropped), so that the difference between two REPS counts
/// is REPS times one call's host work and fuel. Shapes per NAME:
/// `upload,R,N` (N floats), `download,R,N`, `shape,R`, `linear,R,ROWS,K,N` (with a bias),
/// `gelu,R,N`, `attention,R,TOKENS,HIDDEN,HEADS`, `layer-norm,R,ROWS,N` (with a residual),
/// `resident,R,N,P` (binds N floats under a new name `P.i` each time: a model's names outlive
/// its runs, so P keeps them new; the content is hashed each time, copied once),
/// `random,R,BYTES`, `insecure-random,R,BYTES`, `write,R,BYTES` (one stdout `write`),
/// `read,R,BYTES` (one stdin `read`, which is closed), `stdout,R` (`get-stdout` and the
/// handle's drop), `poll,R,N` (one `poll` of N pollables, see [`raw_poll`]),
/// `poll-invalid,R,N` (one `poll` of N handles that name nothing: a trap),
/// `resolve,R,BYTES,NOT_UTF8` (one `resolve-addresses` of a BYTES-byte name, 0xff bytes if
/// NOT_UTF8 is 1; answers the error code, see [`raw_resolve`]).
fn op(arg: &str) -> Result<String, AccelError> {
    let mut parts = arg.split(',');
    let name = parts.next().expect("NAME");
    let reps = number(parts.next().expect("REPS"));
    let d: Vec<u32> = parts.map(|p| number(p) as u32).collect();
    let up = |dims: &[u32]| {
        let n: u32 = dims.iter().product();
        accel::upload(dims, &ramp(n as usize, 1))
    };
    match name {
        "upload" => {
            let data = ramp(d[0] as usize, 1);
            for _ in 0..reps {
                drop(accel::upload(&[d[0]], &data)?);
            }
        }
        "download" => {
            let t = up(&[d[0]])?;
            for _ in 0..reps {
                black_box(t.download()?);
            }
        }
        "shape" => {
            let t = up(&[1])?;
            for _ in 0..reps {
                black_box(t.shape());
            }
        }
        "linear" => {
            let (x, w, b) = (up(&[d[0], d[1]])?, up(&[d[2], d[1]])?, up(&[d[2]])?);
            for _ in 0..reps {
                drop(accel::linear(&x, &w, Some(&b))?);
            }
        }
        "gelu" => {
            let x = up(&[d[0]])?;
            for _ in 0..reps {
                drop(accel::gelu(&x)?);
            }
        }
        "attention" => {
            let q = up(&[d[0], d[1]])?;
            for _ in 0..reps {
                drop(accel::attention(&q, &q, &q, d[2])?);
            }
        }
        "layer-norm" => {
            let (x, s) = (up(&[d[0], d[1]])?, up(&[d[1]])?);
            for _ in 0..reps {
                drop(accel::layer_norm(&x, Some(&x), &s, &s, 1e-12)?);
            }
        }
        "resident" => {
            let data = le_bytes(&ramp(d[0] as usize, 1));
            for i in 0..reps {
                drop(accel::resident(&format!("{}.{i}", d[1]), &[d[0]], &data)?);
            }
        }
        "random" => {
            for _ in 0..reps {
                black_box(wasip2::random::random::get_random_bytes(u64::from(d[0])));
            }
        }
        "insecure-random" => {
            for _ in 0..reps {
                black_box(wasip2::random::insecure::get_insecure_random_bytes(
                    u64::from(d[0]),
                ));
            }
        }
        "write" => {
            let stdout = wasip2::cli::stdout::get_stdout();
            let bytes = vec![b'x'; d[0] as usize];
            for _ in 0..reps {
                stdout.write(&bytes).expect("write");
            }
        }
        "read" => {
            let stdin = wasip2::cli::stdin::get_stdin();
            for _ in 0..reps {
                black_box(stdin.read(u64::from(d[0])).err());
            }
        }
        "stdout" => {
            for _ in 0..reps {
                drop(black_box(wasip2::cli::stdout::get_stdout()));
            }
        }
        "poll" => {
            // The first entry is ready, the other N - 1 never are: every poll answers [0],
            // so the guest's side of each call is the same whatever N.
            use wasip2::clocks::monotonic_clock::subscribe_duration;
            let (ready, never) = (subscribe_duration(0), subscribe_duration(1));
            let mut handles = vec![never.handle(); d[0] as usize];
            handles[0] = ready.handle();
            for _ in 0..reps {
                assert_eq!(raw_poll(&handles), [0]);
            }
        }
        "poll-invalid" => {
            // N handles that name nothing: the host must charge the list before it looks at
            // (copies, lifts) any entry, and then traps on the first.
            let handles = vec![u32::MAX - 1; d[0] as usize];
            for _ in 0..reps {
                raw_poll(&handles);
            }
        }
        "resolve" => {
            // A name of N bytes, all 'a' (D2 = 0) or all 0xff (D2 = 1, not UTF-8): the host
            // charges the call's floor and refuses it without reading the name.
            let network = wasip2::sockets::instance_network::instance_network();
            let byte = if d.get(1) == Some(&1) { 0xff } else { b'a' };
            let host = vec![byte; d[0] as usize];
            let mut answer = String::new();
            for _ in 0..reps {
                answer = match raw_resolve(network.handle(), &host) {
                    Ok(_) => "resolved".to_string(),
                    Err(code) => format!("error-code {code}"),
                };
            }
            return Ok(format!("{name} x{reps}: {answer}"));
        }
        other => panic!("unknown op {other:?}"),
    }
    Ok(format!("{name} x{reps}"))
}

/// `wasi:sockets/ip-name-lookup.resolve-addresses` called with any bytes as the name (the
/// binding takes a `&str`): `Ok(stream handle)` or `Err(error-code's discriminant)`.
fn raw_resolve(network: u32, name: &[u8]) -> Result<u32, u8> {
    #[link(wasm_import_module = "wasi:sockets/ip-name-lookup@0.2.12")]
    unsafe extern "C" {
        #[link_name = "resolve-addresses"]
        fn resolve(network: u32, name: *const u8, len: usize, ret: *mut u8);
    }
    let mut ret = [0u32; 2];
    // SAFETY: the canonical ABI of `resolve-addresses(borrow<network>, string) ->
    // result<resolve-address-stream, error-code>`: a live borrow, a pointer and a length into
    // this memory, and an 8-byte return area (the case at 0, the payload at 4).
    unsafe { resolve(network, name.as_ptr(), name.len(), ret.as_mut_ptr().cast()) };
    match ret[0] & 0xff {
        0 => Ok(ret[1]),
        _ => Err(ret[1] as u8),
    }
}

/// `wasi:io/poll.poll` called on a list of handles made once, so that a call's guest-side
/// work does not grow with the list (wasip2's binding copies the list on every call).
fn raw_poll(handles: &[u32]) -> Vec<u32> {
    #[link(wasm_import_module = "wasi:io/poll@0.2.12")]
    unsafe extern "C" {
        #[link_name = "poll"]
        fn poll(list: *const u32, len: usize, ret: *mut usize);
    }
    let mut ret = [0usize; 2];
    // SAFETY: the canonical ABI of `poll(list<borrow<pollable>>) -> list<u32>`: the handles
    // are live borrows, and the host writes the pointer and length of a list it allocated with
    // the guest's allocator (align 4), which the Vec takes over.
    unsafe {
        poll(handles.as_ptr(), handles.len(), ret.as_mut_ptr());
        Vec::from_raw_parts(ret[0] as *mut u32, ret[1], ret[1])
    }
}

/// `chase:MIB,N`: N dependent loads over a random single cycle through MIB MiB of u32s.
fn chase(arg: &str) -> String {
    let (mib, steps) = arg.split_once(',').expect("MIB,N");
    let n = (number(mib) as usize) << 18;
    // Sattolo's shuffle (a single cycle) with a fixed xorshift: deterministic.
    let mut next: Vec<u32> = (0..n as u32).collect();
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let j = (s % i as u64) as usize;
        next.swap(i, j);
    }
    let mut at = 0u32;
    for _ in 0..number(steps) {
        at = next[at as usize];
    }
    format!("at={}", black_box(at))
}

fn number(arg: &str) -> u64 {
    arg.parse().expect("numeric argument")
}

#[allow(unconditional_recursion)] // the point: it never returns, the stack overflows
fn recurse(depth: u64) -> u64 {
    // black_box keeps this a real call chain rather than a loop.
    black_box(depth) + recurse(black_box(depth + 1))
}

impl Guest for Hostile {
    fn info() -> ModelInfo {
        ModelInfo {
            name: "hostile".into(),
            version: "0".into(),
            description: "misbehaves on command, for tests".into(),
            inputs: vec![DataKind::Text],
            output: DataKind::Text,
            output_dimension: 0,
            max_input_tokens: 0,
        }
    }

    fn infer(input: Input) -> Result<Output, ModelError> {
        let Input::Text(command) = input else {
            return Err(ModelError {
                code: ErrorCode::UnsupportedInput,
                message: "hostile takes one text".into(),
            });
        };
        let (verb, arg) = command.split_once(':').unwrap_or((&command, ""));
        match verb {
            "echo" => Ok(Output::Text(arg.to_string())),
            "work" => {
                let mut acc = 0u64;
                for i in 0..number(arg) {
                    acc = black_box(acc.wrapping_mul(31).wrapping_add(i));
                }
                Ok(Output::Text(format!("{} {acc}", number(arg))))
            }
            "spin" => loop {
                black_box(());
            },
            "grow" => {
                let mut blocks = Vec::new();
                loop {
                    blocks.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "grow-pages" => {
                let old = core::arch::wasm32::memory_grow(0, number(arg) as usize);
                Ok(Output::Text(format!("{}", old as isize)))
            }
            "handled-grow" => {
                // The guest sees the refusal, carries on (a small grow is granted), and then
                // fails for an unrelated reason: a trap, not a memory-limit trip.
                let refused = core::arch::wasm32::memory_grow(0, number(arg) as usize);
                assert_eq!(refused, usize::MAX, "the big grow should be refused");
                let granted = core::arch::wasm32::memory_grow(0, 1);
                assert_ne!(granted, usize::MAX, "the small grow should be granted");
                panic!("unrelated failure after a handled refusal")
            }
            "recurse" => Ok(Output::Text(recurse(0).to_string())),
            "empty-vectors" => Ok(Output::Embeddings(vec![Vec::new(); number(arg) as usize])),
            "fill" => {
                let mut buffer = vec![0u8; (number(arg) as usize) << 20];
                let mut byte = 0u8;
                loop {
                    // One `memory.fill` over the whole buffer per iteration.
                    buffer.fill(black_box(byte));
                    byte = byte.wrapping_add(1);
                }
            }
            "panic" => panic!("hostile guest panicked on purpose"),
            "bytes" => Ok(Output::Bytes(vec![7u8; number(arg) as usize])),
            "print" => {
                for i in 0..number(arg) {
                    println!("line {i} of guest output");
                }
                Ok(Output::Text("printed".into()))
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(Output::Text("woke".into()))
            }
            "host-loop" => loop {
                black_box(std::time::Instant::now());
            },
            "clock" => {
                let wall = std::time::SystemTime::now();
                let start = std::time::Instant::now();
                let mut advanced = false;
                for _ in 0..number(arg) {
                    advanced |= black_box(std::time::Instant::now()) != start;
                }
                let secs = wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Ok(Output::Text(format!(
                    "wall={secs} monotonic_advanced={advanced}"
                )))
            }
            "env" => Ok(Output::Text(format!(
                "vars={} args={} cwd={:?}",
                std::env::vars_os().count(),
                std::env::args_os().count(),
                std::env::current_dir().ok()
            ))),
            "read-file" => Ok(Output::Text(match std::fs::read(arg) {
                Ok(bytes) => format!("read {} bytes", bytes.len()),
                Err(e) => format!("denied: {:?}", e.kind()),
            })),
            "list-dir" => Ok(Output::Text(match std::fs::read_dir(arg) {
                Ok(entries) => format!("listed {} entries", entries.count()),
                Err(e) => format!("denied: {:?}", e.kind()),
            })),
            "connect" => Ok(Output::Text(match std::net::TcpStream::connect(arg) {
                Ok(_) => "connected".to_string(),
                Err(e) => format!("denied: {:?}", e.kind()),
            })),
            "resolve" => Ok(Output::Text(
                match std::net::ToSocketAddrs::to_socket_addrs(&(arg, 80)) {
                    Ok(addrs) => format!("resolved {} addresses", addrs.count()),
                    Err(e) => format!("denied: {:?}", e.kind()),
                },
            )),
            "abort" => std::process::abort(),
            "stdin" => {
                let mut buf = Vec::new();
                let result = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf);
                Ok(Output::Text(format!(
                    "stdin: {} bytes, {:?}",
                    buf.len(),
                    result.is_ok()
                )))
            }
            "accel-info" => {
                let info = accel::info();
                Ok(Output::Text(format!(
                    "kind={:?} budget={} used={}",
                    info.kind, info.budget, info.used
                )))
            }
            "accel-loop" => {
                let mut held = Vec::new();
                loop {
                    match upload_mib(number(arg) as usize) {
                        Ok(t) => held.push(t),
                        Err(e) => {
                            return Ok(Output::Text(format!("{} {}", held.len(), refusal(&e))))
                        }
                    }
                }
            }
            "accel-huge" | "accel-unwrap" => {
                // [32768, 1] · [32768, 1]ᵀ: a 4 GiB result from 256 KiB of inputs.
                let x = accel::upload(&[32768, 1], &vec![1.0; 32768]).unwrap();
                let w = accel::upload(&[32768, 1], &vec![1.0; 32768]).unwrap();
                let result = accel::linear(&x, &w, None);
                if verb == "accel-unwrap" {
                    result.expect("no fallback: the device refused");
                    unreachable!();
                }
                Ok(Output::Text(match result {
                    Ok(_) => "allocated".into(),
                    Err(e) => refusal(&e),
                }))
            }
            "accel-handled" => {
                let x = accel::upload(&[32768, 1], &vec![1.0; 32768]).unwrap();
                let refused = accel::linear(&x, &x, None);
                assert!(refused.is_err(), "the 4 GiB result should be refused");
                let _small = accel::upload(&[1], &[1.0]).expect("a small upload is granted");
                panic!("unrelated failure after a handled device refusal")
            }
            "accel-linear" => {
                let dims: Vec<usize> = arg.split(',').map(|d| d.parse().unwrap()).collect();
                Ok(Output::Text(
                    match accel_linear(dims[0], dims[1], dims[2]) {
                        Ok(text) => text,
                        Err(e) => format!("error: {e:?}"),
                    },
                ))
            }
            "accel-hold" => {
                let held: Vec<Tensor> = (0..4).map(|_| upload_mib(1).unwrap()).collect();
                let result = Self::infer(Input::Text(arg.to_string()));
                drop(held);
                result
            }
            "accel-or-sandbox" => {
                let n = number(arg) as usize;
                if matches!(accel::info().kind, accel::DeviceKind::None) {
                    let sum: f32 = black_box(vec![0.5f32; n]).iter().sum();
                    Ok(Output::Text(format!("sandbox {sum}")))
                } else {
                    let t = accel::upload(&[n as u32], &vec![0.5f32; n])
                        .expect("no in-sandbox path once a device is offered: the device refused");
                    drop(t);
                    Ok(Output::Text(format!("device {n}")))
                }
            }
            "accel-rank" => {
                let shape = vec![1u32; number(arg) as usize];
                Ok(Output::Text(match accel::upload(&shape, &[1.0]) {
                    Ok(_) => "uploaded".into(),
                    Err(e) => refusal(&e),
                }))
            }
            "accel-overflow" => Ok(Output::Text(
                match accel::upload(&[65536, 65536, 65536, 65536], &[]) {
                    Ok(_) => "uploaded".into(),
                    Err(e) => refusal(&e),
                },
            )),
            "accel-k0" => {
                let x = accel::upload(&[2, 0], &[]).unwrap();
                let w = accel::upload(&[3, 0], &[]).unwrap();
                Ok(Output::Text(match accel::linear(&x, &w, None) {
                    Ok(_) => "computed".into(),
                    Err(e) => refusal(&e),
                }))
            }
            "accel-handles" => {
                let mut held = Vec::new();
                loop {
                    held.push(accel::upload(&[1], &[1.0]).expect("a one-value upload"));
                }
            }
            "accel-bind" => Ok(Output::Text(accel_bind(arg))),
            "accel-resident" => {
                let (name, seed) = arg.split_once(',').expect("NAME,SEED");
                Ok(Output::Text(
                    match accel_resident(name, number(seed) as usize) {
                        Ok(text) => text,
                        Err(e) => format!("error: {}", refusal(&e)),
                    },
                ))
            }
            "accel-forged" => {
                let forged = unsafe { Tensor::from_handle(12345) };
                Ok(Output::Text(format!("{:?}", forged.shape())))
            }
            "accel-dropped" => {
                let t = upload_mib(1).unwrap();
                let handle = t.take_handle();
                drop(unsafe { Tensor::from_handle(handle) });
                let stale = unsafe { Tensor::from_handle(handle) };
                Ok(Output::Text(format!("{:?}", stale.shape())))
            }
            "nans" => Ok(Output::Text(nan_report())),
            "op" => Ok(Output::Text(
                op(arg).unwrap_or_else(|e| format!("error: {}", refusal(&e))),
            )),
            "chase" => Ok(Output::Text(chase(arg))),
            "timer" => Ok(Output::Text(poll_timer(arg))),
            "random" => {
                let bytes = wasip2::random::random::get_random_bytes(number(arg));
                Ok(Output::Text(format!("got {} bytes", bytes.len())))
            }
            "write" => {
                // One `write` call (not Rust's std, which chunks), as a guest bypassing
                // `check-write` would make it.
                let stdout = wasip2::cli::stdout::get_stdout();
                let granted = stdout.check_write().expect("check-write");
                let result = stdout.write(&vec![b'x'; number(arg) as usize]);
                Ok(Output::Text(format!(
                    "granted {granted}, wrote: {result:?}"
                )))
            }
            _ => Err(ModelError {
                code: ErrorCode::InvalidInput,
                message: format!("unknown command {verb:?}"),
            }),
        }
    }
}

export!(Hostile);
