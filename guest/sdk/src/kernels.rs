//! The guest's own compute kernels for the in-sandbox forward: a packed-weight matmul for the
//! linear layers, register-blocked, with a fused multiply-add.
//!
//! Why not candle's matmul (gemm 0.19) in the sandbox: its wasm kernels multiply then add, 4
//! lanes, with no fused multiply-add, and re-pack the weight on every call. Here the weight is
//! packed once, when the model is loaded (so a pre-initialised snapshot already holds it and a
//! run never pays for it), and the wasm micro-kernel uses relaxed-SIMD `f32x4.relaxed_madd`,
//! which the host's engine makes a real, single-rounding FMA on every CPU
//! (`relaxed_simd_deterministic`): the same bits on every machine, at twice the arithmetic per
//! instruction of mul-then-add.
//!
//! The same packing and blocking run natively with a portable scalar micro-kernel (one `mul_add`
//! per product, the very rounding of the wasm FMA), so the native tests check the layout and the
//! math of what the sandbox runs.

/// Outputs per packed panel: two f32x4 accumulators wide.
const PANEL: usize = 8;
/// Tokens per micro-kernel call: 4 rows x 2 vectors = 8 accumulators, plus 2 weight vectors and
/// a broadcast input, fit the 16 vector registers of x86-64 without spills.
const ROWS: usize = 4;

/// The weight [out, in] and bias [out] of a linear layer, packed for [`PackedLinear::forward`]:
/// panel `p` holds, for each input `i`, the 8 weights `W[8p..8p+8, i]` side by side, so the
/// micro-kernel streams one panel front to back. The last panel is padded with zeros.
pub struct PackedLinear {
    in_dim: usize,
    out_dim: usize,
    /// `ceil(out / 8)` panels of `in * 8` weights.
    panels: Vec<f32>,
    /// The bias, zero-padded to a multiple of 8.
    bias: Vec<f32>,
}

impl PackedLinear {
    /// Packs `weight` [out, in] (row-major) and `bias` [out].
    pub fn pack(weight: &[f32], bias: &[f32], out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "weight is [out, in]");
        assert_eq!(bias.len(), out_dim, "bias is [out]");
        let mut packed = Self::from_fn(out_dim, in_dim, |o, i| weight[o * in_dim + i]);
        packed.bias[..out_dim].copy_from_slice(bias);
        packed
    }

    /// Packs the weight `W[o, i] = weight(o, i)`, with a zero bias.
    fn from_fn(out_dim: usize, in_dim: usize, weight: impl Fn(usize, usize) -> f32) -> Self {
        let panel_count = out_dim.div_ceil(PANEL);
        let mut panels = vec![0.0; panel_count * in_dim * PANEL];
        for (p, panel) in panels.chunks_exact_mut(in_dim * PANEL).enumerate() {
            for lane in 0..PANEL.min(out_dim - p * PANEL) {
                for i in 0..in_dim {
                    panel[i * PANEL + lane] = weight(p * PANEL + lane, i);
                }
            }
        }
        Self {
            in_dim,
            out_dim,
            panels,
            bias: vec![0.0; panel_count * PANEL],
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x · Wᵀ + b` for `x` [tokens, in] (row-major), as [tokens, out] (row-major).
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.run::<false>(x)
    }

    /// `gelu(x · Wᵀ + b)` (BERT's erf form, [`gelu`]), the activation applied to each tile
    /// while it is still in registers.
    pub fn forward_gelu(&self, x: &[f32]) -> Vec<f32> {
        self.run::<true>(x)
    }

    fn run<const GELU: bool>(&self, x: &[f32]) -> Vec<f32> {
        let (k, n) = (self.in_dim, self.out_dim);
        assert_eq!(x.len() % k, 0, "x is [tokens, in]");
        let tokens = x.len() / k;
        let mut y = vec![0.0; tokens * n];
        self.run_into::<GELU>(Strided::rows(x, k), tokens, &mut y, n);
        y
    }

    /// `y[t, o] = b[o] + Σ_i x[t, i] · W[o, i]` (then GELU) for `tokens` rows of `x`, written to
    /// `y[t * y_stride + o]`.
    fn run_into<const GELU: bool>(
        &self,
        x: Strided,
        tokens: usize,
        y: &mut [f32],
        y_stride: usize,
    ) {
        let (k, n) = (self.in_dim, self.out_dim);
        assert!(tokens == 0 || x.values.len() >= (tokens - 1) * x.stride + k);
        // Panels outermost: one panel (8 x in weights, 12-48 KiB) stays in L1 while every
        // token block streams past it.
        for (p, panel) in self.panels.chunks_exact(k * PANEL).enumerate() {
            let bias: &[f32; PANEL] = self.bias[p * PANEL..][..PANEL].try_into().unwrap();
            let cols = (n - p * PANEL).min(PANEL);
            let mut t = 0;
            while t < tokens {
                let rows = (tokens - t).min(ROWS);
                let mut tile = [[0.0f32; PANEL]; ROWS];
                let xs = &x.values[t * x.stride..(t + rows - 1) * x.stride + k];
                let stride = x.stride;
                match rows {
                    4 => micro::<4, GELU>(xs, stride, k, panel, bias, &mut tile),
                    3 => micro::<3, GELU>(xs, stride, k, panel, bias, &mut tile),
                    2 => micro::<2, GELU>(xs, stride, k, panel, bias, &mut tile),
                    _ => micro::<1, GELU>(xs, stride, k, panel, bias, &mut tile),
                }
                for (r, out) in tile.iter().take(rows).enumerate() {
                    let at = (t + r) * y_stride + p * PANEL;
                    y[at..at + cols].copy_from_slice(&out[..cols]);
                }
                t += rows;
            }
        }
    }
}

/// Rows of a row-major matrix that may be a column band of a wider one: row `t` starts at
/// `values[t * stride]`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    values: &'a [f32],
    stride: usize,
}

impl<'a> Strided<'a> {
    fn rows(values: &'a [f32], stride: usize) -> Self {
        Self { values, stride }
    }
}

/// Multi-head self-attention without a mask, from the projections `q`, `k`, `v` [tokens,
/// heads * head_size] (row-major) to the context [tokens, heads * head_size]: per head,
/// `softmax(q_h · k_hᵀ / √head_size) · v_h`, both products with the packed matmul (each head's
/// `k_h` and `v_h` packed as it comes: O(tokens · head_size), against O(tokens² · head_size)
/// arithmetic), with no per-head copies or transposes of the inputs.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], heads: usize, head_size: usize) -> Vec<f32> {
    let hidden = heads * head_size;
    assert!(q.len() == k.len() && k.len() == v.len() && q.len().is_multiple_of(hidden));
    let tokens = q.len() / hidden;
    let scale = 1.0 / (head_size as f32).sqrt();
    let mut context = vec![0.0; tokens * hidden];
    let mut scores = vec![0.0; tokens * tokens];
    for h in 0..heads {
        let band = h * head_size;
        // Scores: "weight" [out = tokens, in = head_size] is k_h itself.
        let keys = PackedLinear::from_fn(tokens, head_size, |o, i| k[o * hidden + band + i]);
        keys.run_into::<false>(
            Strided::rows(&q[band..], hidden),
            tokens,
            &mut scores,
            tokens,
        );
        for s in scores.iter_mut() {
            *s *= scale;
        }
        softmax_rows(&mut scores, tokens);
        // Context: "weight" [out = head_size, in = tokens] is v_hᵀ.
        let values = PackedLinear::from_fn(head_size, tokens, |o, i| v[i * hidden + band + o]);
        values.run_into::<false>(
            Strided::rows(&scores, tokens),
            tokens,
            &mut context[band..],
            hidden,
        );
    }
    context
}

/// `tile[r] = bias + Σ_i xs[r * stride + i] · panel[i]` for `R` rows of `k` inputs, then
/// [`gelu`] if `GELU`.
#[inline(always)]
fn micro<const R: usize, const GELU: bool>(
    xs: &[f32],
    stride: usize,
    k: usize,
    panel: &[f32],
    bias: &[f32; PANEL],
    tile: &mut [[f32; PANEL]; ROWS],
) {
    assert!(R <= ROWS && xs.len() == (R - 1) * stride + k && panel.len() == k * PANEL);
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the assert above bounds every read (rows < R, i < k); the component is built
    // with simd128 and the engine enables relaxed SIMD.
    unsafe {
        micro_wasm::<R, GELU>(xs.as_ptr(), stride, k, panel.as_ptr(), bias, tile)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        micro_portable::<R>(xs, stride, k, panel, bias, tile);
        if GELU {
            for v in tile.iter_mut().take(R).flatten() {
                *v = gelu(*v);
            }
        }
    }
}

/// The wasm micro-kernel: `R` x 2 f32x4 accumulators, one FMA per product.
#[cfg(target_arch = "wasm32")]
#[target_feature(enable = "simd128,relaxed-simd")]
unsafe fn micro_wasm<const R: usize, const GELU: bool>(
    xs: *const f32,
    stride: usize,
    k: usize,
    panel: *const f32,
    bias: &[f32; PANEL],
    tile: &mut [[f32; PANEL]; ROWS],
) {
    use core::arch::wasm32::{
        f32x4_relaxed_madd, i32x4_shuffle, i32x4_splat, v128, v128_load, v128_load32_splat,
        v128_store,
    };
    let b0 = v128_load(bias.as_ptr() as *const v128);
    let b1 = v128_load(bias.as_ptr().add(4) as *const v128);
    let mut acc = [[b0, b1]; R];
    macro_rules! step {
        ($i:expr) => {{
            let i = $i;
            let w = panel.add(i * PANEL);
            let w0 = v128_load(w as *const v128);
            let w1 = v128_load(w.add(4) as *const v128);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = v128_load32_splat(xs.add(r * stride + i) as *const u32);
                acc[0] = f32x4_relaxed_madd(x, w0, acc[0]);
                acc[1] = f32x4_relaxed_madd(x, w1, acc[1]);
            }
        }};
    }
    // Four inputs per loop trip: the loop's own cost (counter, branch, and the engine's fuel
    // and epoch checks at every loop header) is paid once per 32 FMAs instead of per 8, and
    // each row's four inputs are read with one v128 load and broadcast by `i32x4_shuffle`
    // (one `pshufd` each) instead of a `load32_splat` per product (a scalar load, a move to a
    // vector register and a broadcast on x86-64): 12 loads and 16 shuffles per 32 FMAs instead
    // of 24 loads and 32 moves and broadcasts. The same products in the same order as `step!`,
    // so the same bits. This loop needs the engine's `PreserveAll` loop checks
    // (vendor/README.md): without them, the 8 accumulators live across a possible call at
    // the loop header are spilled to the stack on every trip.
    let mut i = 0;
    macro_rules! lane {
        ($xv:expr, $j:literal, $i:expr) => {{
            let w = panel.add(($i + $j) * PANEL);
            let w0 = v128_load(w as *const v128);
            let w1 = v128_load(w.add(4) as *const v128);
            for (acc, xv) in acc.iter_mut().zip($xv.iter()) {
                let x = i32x4_shuffle::<$j, $j, $j, $j>(*xv, *xv);
                acc[0] = f32x4_relaxed_madd(x, w0, acc[0]);
                acc[1] = f32x4_relaxed_madd(x, w1, acc[1]);
            }
        }};
    }
    while i + 4 <= k {
        let mut xv = [i32x4_splat(0); R];
        for (r, xv) in xv.iter_mut().enumerate() {
            *xv = v128_load(xs.add(r * stride + i) as *const v128);
        }
        lane!(xv, 0, i);
        lane!(xv, 1, i);
        lane!(xv, 2, i);
        lane!(xv, 3, i);
        i += 4;
    }
    while i < k {
        step!(i);
        i += 1;
    }
    if GELU {
        for acc in acc.iter_mut().flatten() {
            *acc = gelu_wasm(*acc);
        }
    }
    for (out, acc) in tile.iter_mut().zip(&acc) {
        v128_store(out.as_mut_ptr() as *mut v128, acc[0]);
        v128_store(out.as_mut_ptr().add(4) as *mut v128, acc[1]);
    }
}

/// The same sums natively, in the same order, with the same single rounding per product.
#[cfg(not(target_arch = "wasm32"))]
fn micro_portable<const R: usize>(
    xs: &[f32],
    stride: usize,
    k: usize,
    panel: &[f32],
    bias: &[f32; PANEL],
    tile: &mut [[f32; PANEL]; ROWS],
) {
    for (r, out) in tile.iter_mut().take(R).enumerate() {
        *out = *bias;
        let row = &xs[r * stride..r * stride + k];
        for (&x, w) in row.iter().zip(panel.chunks_exact(PANEL)) {
            for (acc, &w) in out.iter_mut().zip(w) {
                *acc = x.mul_add(w, *acc);
            }
        }
    }
}

/// `erf(x)` as a rational function on x clamped to [-4, 4] (odd numerator of degree 13, even
/// denominator of degree 8; the coefficients Eigen and XLA use for f32): within 9e-8 of erf in
/// exact arithmetic, branch-free, so it vectorises. Horner steps are FMAs, natively as in wasm.
const ERF_CLAMP: f32 = 4.0;
const ERF_NUMERATOR: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_6e-3,
    -1.609_603_3e-2,
];
const ERF_DENOMINATOR: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329e-3,
    -1.426_474e-2,
];

/// BERT's GELU, `0.5 · v · (1 + erf(v / √2))`, with the erf above. The wasm build uses
/// [`gelu_wasm`], the same operations on four lanes.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub fn gelu(v: f32) -> f32 {
    let x = (v * std::f32::consts::FRAC_1_SQRT_2).clamp(-ERF_CLAMP, ERF_CLAMP);
    let x2 = x * x;
    let p = ERF_NUMERATOR[1..]
        .iter()
        .fold(ERF_NUMERATOR[0], |p, &c| x2.mul_add(p, c));
    let q = ERF_DENOMINATOR[1..]
        .iter()
        .fold(ERF_DENOMINATOR[0], |q, &c| x2.mul_add(q, c));
    let erf = x * p / q;
    (0.5 * v) * (1.0 + erf)
}

/// [`gelu`] on four lanes, the same operations in the same order.
#[cfg(target_arch = "wasm32")]
#[target_feature(enable = "simd128,relaxed-simd")]
unsafe fn gelu_wasm(v: core::arch::wasm32::v128) -> core::arch::wasm32::v128 {
    use core::arch::wasm32::*;
    let x = f32x4_mul(v, f32x4_splat(std::f32::consts::FRAC_1_SQRT_2));
    // pmax/pmin: `clamp` for every non-NaN lane, and NaN stays NaN.
    let x = f32x4_pmin(
        f32x4_pmax(x, f32x4_splat(-ERF_CLAMP)),
        f32x4_splat(ERF_CLAMP),
    );
    let x2 = f32x4_mul(x, x);
    let mut p = f32x4_splat(ERF_NUMERATOR[0]);
    for &c in &ERF_NUMERATOR[1..] {
        p = f32x4_relaxed_madd(x2, p, f32x4_splat(c));
    }
    let mut q = f32x4_splat(ERF_DENOMINATOR[0]);
    for &c in &ERF_DENOMINATOR[1..] {
        q = f32x4_relaxed_madd(x2, q, f32x4_splat(c));
    }
    let erf = f32x4_div(f32x4_mul(x, p), q);
    f32x4_mul(
        f32x4_mul(f32x4_splat(0.5), v),
        f32x4_add(f32x4_splat(1.0), erf),
    )
}

/// `exp` for softmax: x clamped below at ln(f32::MIN_POSITIVE) (no subnormals), split as
/// `n·ln2 + r` with |r| <= ln2/2 (ln2 in two parts, FMAs), Cephes' degree-6 polynomial for
/// `exp(r)`, then `n` added to the exponent bits. Within 2 ulp of exp on the range softmax
/// uses (x <= 0); branch-free.
const EXP_MIN: f32 = -87.336_54;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// Softmax of every row of `x` [rows, len] in place: `exp(x - max) / Σ exp(x - max)`.
pub fn softmax_rows(x: &mut [f32], len: usize) {
    for row in x.chunks_exact_mut(len) {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: reads and writes stay within `row`; simd128 is on in the component.
        unsafe {
            softmax_wasm(row)
        }
        #[cfg(not(target_arch = "wasm32"))]
        softmax_portable(row)
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn exp_portable(x: f32) -> f32 {
    let x = x.max(EXP_MIN);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let p = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |p, &c| p.mul_add(r, c));
    let e = p.mul_add(r * r, r) + 1.0;
    f32::from_bits((e.to_bits() as i32).wrapping_add((n as i32) << 23) as u32)
}

#[cfg(not(target_arch = "wasm32"))]
fn softmax_portable(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = exp_portable(*v - max);
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

#[cfg(target_arch = "wasm32")]
#[target_feature(enable = "simd128,relaxed-simd")]
unsafe fn exp_wasm(x: core::arch::wasm32::v128) -> core::arch::wasm32::v128 {
    use core::arch::wasm32::*;
    let x = f32x4_pmax(x, f32x4_splat(EXP_MIN));
    let n = f32x4_nearest(f32x4_mul(x, f32x4_splat(std::f32::consts::LOG2_E)));
    let r = f32x4_relaxed_madd(n, f32x4_splat(-LN2_HI), x);
    let r = f32x4_relaxed_madd(n, f32x4_splat(-LN2_LO), r);
    let mut p = f32x4_splat(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = f32x4_relaxed_madd(p, r, f32x4_splat(c));
    }
    let e = f32x4_add(f32x4_relaxed_madd(p, f32x4_mul(r, r), r), f32x4_splat(1.0));
    i32x4_add(e, i32x4_shl(i32x4_trunc_sat_f32x4(n), 23))
}

#[cfg(target_arch = "wasm32")]
#[target_feature(enable = "simd128,relaxed-simd")]
unsafe fn softmax_wasm(row: &mut [f32]) {
    use core::arch::wasm32::*;
    let len = row.len();
    let whole = len / 4 * 4;
    let at = |i: usize| row.as_ptr().add(i) as *const v128;
    let mut max4 = f32x4_splat(f32::NEG_INFINITY);
    for i in (0..whole).step_by(4) {
        max4 = f32x4_pmax(max4, v128_load(at(i)));
    }
    let mut max = f32x4_extract_lane::<0>(max4)
        .max(f32x4_extract_lane::<1>(max4))
        .max(f32x4_extract_lane::<2>(max4))
        .max(f32x4_extract_lane::<3>(max4));
    for &v in &row[whole..] {
        max = max.max(v);
    }
    let max4 = f32x4_splat(max);
    let mut sum4 = f32x4_splat(0.0);
    let p = row.as_mut_ptr();
    for i in (0..whole).step_by(4) {
        let e = exp_wasm(f32x4_sub(v128_load(p.add(i) as *const v128), max4));
        v128_store(p.add(i) as *mut v128, e);
        sum4 = f32x4_add(sum4, e);
    }
    let mut tail = [f32::NEG_INFINITY; 4];
    tail[..len - whole].copy_from_slice(&row[whole..]);
    let e = exp_wasm(f32x4_sub(v128_load(tail.as_ptr() as *const v128), max4));
    // exp(-inf - max) clamps to exp(EXP_MIN), not 0: keep only the real tail lanes.
    v128_store(tail.as_mut_ptr() as *mut v128, e);
    row[whole..].copy_from_slice(&tail[..len - whole]);
    let mut sum = (f32x4_extract_lane::<0>(sum4) + f32x4_extract_lane::<1>(sum4))
        + (f32x4_extract_lane::<2>(sum4) + f32x4_extract_lane::<3>(sum4));
    for &v in &row[whole..] {
        sum += v;
    }
    let sum4 = f32x4_splat(sum);
    for i in (0..whole).step_by(4) {
        v128_store(
            p.add(i) as *mut v128,
            f32x4_div(v128_load(p.add(i) as *const v128), sum4),
        );
    }
    for v in &mut row[whole..] {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small integers: every product and partial sum is exact in f32, so any layout or
    /// blocking mistake shows as an exact mismatch.
    fn value(seed: usize) -> f32 {
        ((seed * 7919 + 13) % 17) as f32 - 8.0
    }

    fn naive(x: &[f32], w: &[f32], b: &[f32], tokens: usize, out: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; tokens * out];
        for t in 0..tokens {
            for o in 0..out {
                y[t * out + o] = b[o] + (0..k).map(|i| x[t * k + i] * w[o * k + i]).sum::<f32>();
            }
        }
        y
    }

    #[test]
    fn gelu_is_within_1_5e_6_of_the_libm_erf_form() {
        let mut worst = 0.0f64;
        for step in -100_000..=100_000 {
            let v = step as f32 * 1e-4; // [-10, 10]
            let exact = 0.5 * v as f64 * (1.0 + libm::erf(v as f64 / std::f64::consts::SQRT_2));
            worst = worst.max((gelu(v) as f64 - exact).abs() / (1.0 + exact.abs()));
        }
        // Measured: 1.24e-6 (f32 evaluation; the f64 rational function is within 9e-8 of erf).
        assert!(worst < 1.5e-6, "worst relative error {worst:e}");
    }

    #[test]
    fn packed_forward_gelu_is_gelu_of_the_forward() {
        let (tokens, out, k) = (5, 11, 7);
        let x: Vec<f32> = (0..tokens * k).map(|s| value(s) * 0.25).collect();
        let w: Vec<f32> = (0..out * k).map(|s| value(s + 3) * 0.125).collect();
        let b: Vec<f32> = (0..out).map(|s| value(s + 9) * 0.5).collect();
        let packed = PackedLinear::pack(&w, &b, out, k);
        let expected: Vec<f32> = packed.forward(&x).into_iter().map(gelu).collect();
        assert_eq!(packed.forward_gelu(&x), expected);
    }

    #[test]
    fn exp_is_within_2_ulp_on_the_softmax_range() {
        let mut worst = 0.0f64;
        for step in 0..=870_000 {
            let x = -(step as f32) * 1e-4; // [-87, 0]
            let exact = (x as f64).exp();
            worst = worst.max((exp_portable(x) as f64 - exact).abs() / exact);
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_f64_softmax() {
        let len = 7;
        let mut x: Vec<f32> = (0..3 * len).map(|s| value(s) * 0.7).collect();
        let expected: Vec<f64> = x
            .chunks(len)
            .flat_map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(move |v| v / sum)
            })
            .collect();
        softmax_rows(&mut x, len);
        for (got, want) in x.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn attention_equals_the_per_head_f64_computation() {
        let (tokens, heads, head_size) = (5, 3, 4);
        let hidden = heads * head_size;
        let q: Vec<f32> = (0..tokens * hidden).map(|s| value(s) * 0.1).collect();
        let k: Vec<f32> = (0..tokens * hidden).map(|s| value(s + 5) * 0.1).collect();
        let v: Vec<f32> = (0..tokens * hidden).map(|s| value(s + 11) * 0.1).collect();
        let got = attention(&q, &k, &v, heads, head_size);
        for h in 0..heads {
            for t in 0..tokens {
                let at = |m: &[f32], t: usize, d: usize| m[t * hidden + h * head_size + d] as f64;
                let scores: Vec<f64> = (0..tokens)
                    .map(|u| {
                        (0..head_size)
                            .map(|d| at(&q, t, d) * at(&k, u, d))
                            .sum::<f64>()
                            / (head_size as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..head_size {
                    let want: f64 = (0..tokens)
                        .map(|u| (scores[u] - max).exp() / sum * at(&v, u, d))
                        .sum();
                    let have = got[t * hidden + h * head_size + d] as f64;
                    assert!((have - want).abs() < 1e-6, "head {h} token {t} dim {d}");
                }
            }
        }
    }

    #[test]
    fn packed_forward_equals_the_naive_matmul_for_every_tail_shape() {
        // Tokens 1..=9 cover full 4-row blocks and every remainder; outputs 1..=17 cover
        // full panels and every padded last panel.
        for tokens in 1..=9 {
            for out in [1, 3, 8, 9, 16, 17] {
                for k in [1, 5, 32] {
                    let x: Vec<f32> = (0..tokens * k).map(value).collect();
                    let w: Vec<f32> = (0..out * k).map(|s| value(s + 1000)).collect();
                    let b: Vec<f32> = (0..out).map(|s| value(s + 77)).collect();
                    let packed = PackedLinear::pack(&w, &b, out, k);
                    assert_eq!(
                        packed.forward(&x),
                        naive(&x, &w, &b, tokens, out, k),
                        "tokens {tokens}, out {out}, in {k}"
                    );
                }
            }
        }
    }
}
