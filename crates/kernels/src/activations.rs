//! Elementwise activations and the row softmax over f32 slices, in place, on all cores: SiLU
//! times the up projection (Qwen2's MLP), the tanh GELU (SigLIP's MLP) and softmax (attention).
//! The AVX2 path computes `exp` with a polynomial eight lanes at a time (within 2 ulp of libm's
//! `expf`); libm's scalar `expf` had been 5-10% of a prefill or an image encode.

use crate::shared::SharedOut;
use crate::Isa;
use rayon::prelude::*;

/// Elements per parallel piece: large enough to amortise a task, small enough to share.
pub(crate) const CHUNK: usize = 16 * 1024;

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_CUBIC: f32 = 0.044_715;

/// Whether the AVX2 paths run (detected, and not lowered by `WEFT_KERNELS`).
fn avx2() -> bool {
    cfg!(target_arch = "x86_64") && Isa::active() >= Isa::Avx2
}

/// `gate[i] = silu(gate[i]) * up[i]`, with `silu(x) = x / (1 + e^-x)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up differ in length");
    gate.par_chunks_mut(CHUNK).zip(up.par_chunks(CHUNK)).for_each(|(g, u)| silu_mul_here(g, u));
}

/// [`silu_mul`] on the calling thread.
pub(crate) fn silu_mul_here(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx512Bf16 {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::silu_mul16(gate, up) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::silu_mul(gate, up) };
    }
    silu_mul_scalar(gate, up)
}

/// Qwen2's MLP activation from the fused gate and up projections: rows of `2 width` values
/// (the gate's, then the up projection's) to new rows of `width`, `silu(gate) * up`. The output
/// is written once, never zeroed first (8 MB a layer for a 750-token prompt on the 0.5b).
pub fn silu_mul_halves(fused: &[f32], width: usize) -> Vec<f32> {
    assert!(width > 0 && fused.len().is_multiple_of(2 * width), "{} values are not rows of 2 x {width}", fused.len());
    let len = fused.len() / 2;
    let mut out = Vec::with_capacity(len);
    let shared = SharedOut(out.as_mut_ptr());
    let rows_per_chunk = (CHUNK / width).max(1);
    fused.par_chunks(2 * width * rows_per_chunk).enumerate().for_each(|(chunk, rows)| {
        for (r, row) in rows.chunks_exact(2 * width).enumerate() {
            let at = (chunk * rows_per_chunk + r) * width;
            // SAFETY: the row lies inside the capacity and no other row writes it; once the
            // gate's values are copied in it is initialised, and only this closure holds it.
            let gate = unsafe {
                shared.write_row(at, &row[..width]);
                std::slice::from_raw_parts_mut(shared.0.add(at), width)
            };
            silu_mul_here(gate, &row[width..]);
        }
    });
    // SAFETY: every row was written above.
    unsafe { out.set_len(len) };
    out
}

/// `x[i] = gelu_tanh(x[i]) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed as
/// `x / (1 + e^(-2u))`, the same value without tanh's cancellation for large negative x.
pub fn gelu_tanh(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(gelu_tanh_here);
}

/// [`gelu_tanh`] on the calling thread (a GEMM's epilogue, on values still in cache).
pub(crate) fn gelu_tanh_here(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx512Bf16 {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::gelu_tanh16(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::gelu_tanh(x) };
    }
    gelu_tanh_scalar(x)
}

/// [`gelu_tanh_here`] on `rows` rows of `width` values, `stride` apart from `at`: one call for a
/// GEMM's block of outputs (32 values a call, row by row, took twice the time of the same
/// values in rows of 96).
///
/// # Safety
/// `at` points to `rows` rows of `width` writable values `stride` apart, which nothing else
/// accesses during the call.
pub(crate) unsafe fn gelu_tanh_rows_here(at: *mut f32, rows: usize, width: usize, stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx512Bf16 {
        // SAFETY: AVX-512F was detected; the rows are the caller's.
        return unsafe { x86::gelu_tanh16_rows(at, rows, width, stride) };
    }
    for r in 0..rows {
        // SAFETY: as the caller promises.
        gelu_tanh_here(unsafe { std::slice::from_raw_parts_mut(at.add(r * stride), width) });
    }
}

/// A normalisation of each row, as a product's input may go through it on the way in.
#[derive(Debug, Clone, Copy)]
pub enum Norm<'a> {
    /// LayerNorm (SigLIP): `(x - mean) / sqrt(var + eps) * weight + bias`.
    Layer { weight: &'a [f32], bias: &'a [f32], eps: f32 },
    /// RMSNorm (Qwen2): `x / sqrt(mean(x^2) + eps) * weight`.
    Rms { weight: &'a [f32], eps: f32 },
}

impl Norm<'_> {
    /// Values per row.
    pub fn width(&self) -> usize {
        match self {
            Norm::Layer { weight, .. } | Norm::Rms { weight, .. } => weight.len(),
        }
    }

    /// One row into `out`, the sums in f64 (exact enough to match any summation order in f32).
    pub(crate) fn row(&self, row: &[f32], out: &mut [f32]) {
        let bias_covers = match self {
            Norm::Layer { bias, .. } => bias.len() >= row.len(),
            Norm::Rms { .. } => true,
        };
        assert!(out.len() >= row.len() && self.width() >= row.len() && bias_covers, "a row of {}", row.len());
        #[cfg(target_arch = "x86_64")]
        if Isa::active() >= Isa::Avx512Bf16 {
            // SAFETY: AVX-512F was detected; `out`, the weight and the bias hold the row's length.
            return unsafe { x86::norm_row16(self, row, out) };
        }
        let d = row.len() as f64;
        match *self {
            Norm::Layer { weight, bias, eps } => {
                let mean = sum_f64(row, |v| v) / d;
                let variance = sum_f64(row, |v| (v - mean) * (v - mean)) / d;
                let inverse = 1.0 / (variance as f32 + eps).sqrt();
                let mean = mean as f32;
                for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                    *o = (v - mean) * inverse * w + b;
                }
            }
            Norm::Rms { weight, eps } => {
                let inverse = 1.0 / ((sum_f64(row, |v| v * v) / d) as f32 + eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
                    *o = v * inverse * w;
                }
            }
        }
    }
}

/// `norm` of every row of `x` (rows of [`Norm::width`] values) into `out`, rows in parallel
/// (candle's LayerNorm took one thread, its RMSNorm seven passes).
pub fn norm_rows(x: &[f32], norm: &Norm, out: &mut [f32]) {
    let d = norm.width();
    if let Norm::Layer { bias, .. } = norm {
        assert_eq!(bias.len(), d, "weight and bias differ in length");
    }
    assert!(d > 0 && x.len() == out.len() && x.len().is_multiple_of(d), "{} values are not rows of {d}", x.len());
    let rows_per_chunk = (CHUNK / d).max(1);
    out.par_chunks_mut(rows_per_chunk * d).zip(x.par_chunks(rows_per_chunk * d)).for_each(|(out, x)| {
        for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            norm.row(row, o);
        }
    });
}

/// [`norm_rows`] into a new vector.
pub fn norm_rows_new(x: &[f32], norm: &Norm) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    norm_rows(x, norm, &mut out);
    out
}

/// The sum of `f(v)` over `values` in f64, on eight independent chains (one chain waits on
/// each addition's latency: it made LayerNorm slower than candle's f32).
fn sum_f64(values: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let whole = values.len() / 8 * 8;
    for chunk in values[..whole].chunks_exact(8) {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v as f64);
        }
    }
    lanes.iter().sum::<f64>() + values[whole..].iter().map(|&v| f(v as f64)).sum::<f64>()
}

/// Softmax of every row of `row_len` values, in place.
pub fn softmax_rows(x: &mut [f32], row_len: usize) {
    assert!(row_len > 0 && x.len().is_multiple_of(row_len), "{} values are not rows of {row_len}", x.len());
    let rows_per_chunk = (CHUNK / row_len).max(1);
    x.par_chunks_mut(rows_per_chunk * row_len).for_each(|rows| {
        rows.chunks_exact_mut(row_len).for_each(softmax_row);
    });
}

/// Softmax of one row, in place, on the calling thread.
fn softmax_row(row: &mut [f32]) {
    let inverse = exp_row(row);
    row.iter_mut().for_each(|v| *v *= inverse);
}

/// The first half of a softmax: `row[i] = e^(row[i] - max)`, returning what to multiply them
/// by (one over their sum), for callers that fold the multiplication into their next pass.
pub(crate) fn exp_row(row: &mut [f32]) -> f32 {
    let max = row_max(row);
    if max == f32::NEG_INFINITY {
        // Nothing visible: match candle (NaN from 0/0) rather than invent a distribution.
        row.iter_mut().for_each(|v| *v = f32::NAN);
        return f32::NAN;
    }
    1.0 / exp_shifted(row, max)
}

/// The largest value of `row` (negative infinity for an empty row). Eight lanes at a time: a
/// scalar maximum is a chain of dependent comparisons and took longer than the exponentials.
fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { x86::row_max(row) };
    }
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `row[i] = e^(row[i] - max)`, returning the sum.
fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx512Bf16 {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::exp_shifted16(row, max) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::exp_shifted(row, max) };
    }
    exp_shifted_scalar(row, max)
}

// The scalar loops: the fallback, and the AVX2 paths' tails.

fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn gelu_tanh_scalar(x: &mut [f32]) {
    for v in x.iter_mut() {
        let u = GELU_SCALE * (*v + GELU_CUBIC * *v * *v * *v);
        *v /= 1.0 + (-2.0 * u).exp();
    }
}

fn exp_shifted_scalar(row: &mut [f32], max: f32) -> f32 {
    row.iter_mut().fold(0.0, |sum, v| {
        *v = (*v - max).exp();
        sum + *v
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{exp_shifted_scalar, silu_mul_scalar, Norm, GELU_CUBIC, GELU_SCALE};
    use std::arch::x86_64::*;

    /// Below this `e^x` is 0 (f32 would go subnormal); above the other bound it would overflow.
    const EXP_LOW: f32 = -87.336_55;
    const EXP_HIGH: f32 = 88.0;
    /// ln 2 split in two, so `x - n ln2` keeps its low bits (Cephes).
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    /// Cephes' degree-6 polynomial for `(e^r - 1 - r) / r^2`, highest power first.
    const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

    /// `e^x` in eight lanes: `x = n ln2 + r`, `e^r` by Cephes' degree-6 polynomial, `2^n` in the
    /// exponent bits. Inputs are clamped to where f32 neither overflows nor goes subnormal, and
    /// below that range the result is 0 (so a masked score of -inf weighs exactly nothing).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn exp8(input: __m256) -> __m256 {
        let low = _mm256_set1_ps(EXP_LOW);
        let visible = _mm256_cmp_ps::<_CMP_GE_OQ>(input, low);
        let x = _mm256_min_ps(_mm256_max_ps(input, low), _mm256_set1_ps(EXP_HIGH));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let e_r = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_and_ps(_mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n)), visible)
    }

    /// [`exp8`] in sixteen lanes: the same operations on each lane, so the same values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp16(input: __m512) -> __m512 {
        let low = _mm512_set1_ps(EXP_LOW);
        let visible = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(input, low);
        let x = _mm512_min_ps(_mm512_max_ps(input, low), _mm512_set1_ps(EXP_HIGH));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let e_r = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_maskz_mul_ps(visible, e_r, _mm512_castsi512_ps(two_n))
    }

    /// [`exp_shifted`] sixteen lanes at a time, the tail on eight and then one.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn exp_shifted16(row: &mut [f32], max: f32) -> f32 {
        let main = row.len() / 16 * 16;
        let shift = _mm512_set1_ps(max);
        let mut sums = _mm512_setzero_ps();
        for i in (0..main).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.as_ptr().add(i)), shift));
            _mm512_storeu_ps(row.as_mut_ptr().add(i), e);
            sums = _mm512_add_ps(sums, e);
        }
        _mm512_reduce_add_ps(sums) + exp_shifted(&mut row[main..], max)
    }

    /// `v / (1 + e^(-k v))` for the lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn over_one_plus_exp(v: __m256, neg_exponent: __m256) -> __m256 {
        _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0), exp8(neg_exponent)))
    }

    /// [`silu_mul`] sixteen lanes at a time (the same operations per lane, so the same values).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn silu_mul16(gate: &mut [f32], up: &[f32]) {
        let main = gate.len() / 16 * 16;
        for i in (0..main).step_by(16) {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(silu, u));
        }
        silu_mul(&mut gate[main..], &up[main..]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let main = gate.len() / 8 * 8;
        for i in (0..main).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let neg = _mm256_sub_ps(_mm256_setzero_ps(), g);
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(over_one_plus_exp(g, neg), u));
        }
        silu_mul_scalar(&mut gate[main..], &up[main..]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_tanh(x: &mut [f32]) {
        let main = x.len() / 8 * 8;
        for i in (0..main).step_by(8) {
            gelu8(x.as_mut_ptr().add(i));
        }
        // The tail through the same lanes (not the scalar code, whose last bits differ), so
        // that a value's result does not depend on where it sits: a GEMM's epilogue applies
        // this to rows of one block at a time.
        let mut tail = [0.0f32; 8];
        let rest = x.len() - main;
        tail[..rest].copy_from_slice(&x[main..]);
        gelu8(tail.as_mut_ptr());
        x[main..].copy_from_slice(&tail[..rest]);
    }

    /// [`gelu_tanh`] sixteen lanes at a time: the same operations on each lane (as [`exp16`]
    /// is [`exp8`]'s), so the same values.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gelu_tanh16(x: &mut [f32]) {
        gelu_tanh16_rows(x.as_mut_ptr(), 1, x.len(), x.len());
    }

    /// [`Norm::row`] sixteen values at a time: the sums in f64 over eight lanes, then the same
    /// f32 operations per value as the scalar path (a multiply, a multiply and an add: no fused
    /// multiply-add, so the same values from the same mean and scale). On this compiler's
    /// baseline target the scalar sums ran two f64 lanes at a time, 2.5% of a first token.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out`, the norm's weight and bias hold at least `row.len()` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn norm_row16(norm: &Norm, row: &[f32], out: &mut [f32]) {
        let d = row.len();
        let lanes = |p: usize| ((1u32 << (d - p).min(16)) - 1) as __mmask16;
        let load = |at: *const f32, p: usize| _mm512_maskz_loadu_ps(lanes(p), at.add(p));
        // Sums of `f(v)` in f64, two sets of eight lanes (the same as sixteen in any order,
        // exactly enough).
        let sum = |f: &dyn Fn(__m512d) -> __m512d| {
            let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for p in (0..d).step_by(16) {
                let (v, mask) = (load(row.as_ptr(), p), lanes(p));
                // (Lanes past the row's end add nothing: f(0) is not zero for the variance.)
                let (lo_mask, hi_mask) = (mask as __mmask8, (mask >> 8) as __mmask8);
                let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                lo = _mm512_mask_add_pd(lo, lo_mask, lo, f(_mm512_cvtps_pd(_mm512_castps512_ps256(v))));
                hi = _mm512_mask_add_pd(hi, hi_mask, hi, f(_mm512_cvtps_pd(high)));
            }
            _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))
        };
        match *norm {
            Norm::Layer { weight, bias, eps } => {
                let mean = sum(&|v| v) / d as f64;
                let centre = _mm512_set1_pd(mean);
                let variance = sum(&|v| {
                    let c = _mm512_sub_pd(v, centre);
                    _mm512_mul_pd(c, c)
                }) / d as f64;
                let (inverse, mean) =
                    (_mm512_set1_ps(1.0 / (variance as f32 + eps).sqrt()), _mm512_set1_ps(mean as f32));
                for p in (0..d).step_by(16) {
                    let scaled = _mm512_mul_ps(_mm512_sub_ps(load(row.as_ptr(), p), mean), inverse);
                    let o = _mm512_add_ps(_mm512_mul_ps(scaled, load(weight.as_ptr(), p)), load(bias.as_ptr(), p));
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(p), lanes(p), o);
                }
            }
            Norm::Rms { weight, eps } => {
                let squares = sum(&|v| _mm512_mul_pd(v, v));
                let inverse = _mm512_set1_ps(1.0 / ((squares / d as f64) as f32 + eps).sqrt());
                for p in (0..d).step_by(16) {
                    let o = _mm512_mul_ps(_mm512_mul_ps(load(row.as_ptr(), p), inverse), load(weight.as_ptr(), p));
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(p), lanes(p), o);
                }
            }
        }
    }

    /// [`gelu_tanh16`] on `rows` rows of `width` values `stride` apart from `at`, in one call.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gelu_tanh16_rows(at: *mut f32, rows: usize, width: usize, stride: usize) {
        let main = width / 16 * 16;
        for r in 0..rows {
            let row = at.add(r * stride);
            for i in (0..main).step_by(16) {
                gelu16(row.add(i));
            }
            if main < width {
                gelu_tanh(std::slice::from_raw_parts_mut(row.add(main), width - main));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn gelu16(at: *mut f32) {
        let v = _mm512_loadu_ps(at);
        let cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
        let u = _mm512_mul_ps(_mm512_set1_ps(GELU_SCALE), _mm512_fmadd_ps(_mm512_set1_ps(GELU_CUBIC), cube, v));
        let e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0), u));
        _mm512_storeu_ps(at, _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0), e)));
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn gelu8(at: *mut f32) {
        let v = _mm256_loadu_ps(at);
        let cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
        let u = _mm256_mul_ps(_mm256_set1_ps(GELU_SCALE), _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBIC), cube, v));
        let neg = _mm256_mul_ps(_mm256_set1_ps(-2.0), u);
        _mm256_storeu_ps(at, over_one_plus_exp(v, neg));
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_max(row: &[f32]) -> f32 {
        // Four independent chains: one waits on each comparison's latency (the maximum is the
        // same whatever the order).
        let main = row.len() / 32 * 32;
        let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        for i in (0..main).step_by(32) {
            for (c, m) in m.iter_mut().enumerate() {
                *m = _mm256_max_ps(*m, _mm256_loadu_ps(row.as_ptr().add(i + 8 * c)));
            }
        }
        let mut m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let eights = row.len() / 8 * 8;
        for i in (main..eights).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(row.as_ptr().add(i)));
        }
        let main = eights;
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes.iter().chain(&row[main..]).copied().fold(f32::NEG_INFINITY, f32::max)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
        let main = row.len() / 8 * 8;
        let shift = _mm256_set1_ps(max);
        let mut sums = _mm256_setzero_ps();
        for i in (0..main).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row.as_ptr().add(i)), shift));
            _mm256_storeu_ps(row.as_mut_ptr().add(i), e);
            sums = _mm256_add_ps(sums, e);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
        lanes.iter().sum::<f32>() + exp_shifted_scalar(&mut row[main..], max)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// Sixteen lanes and eight give the same GELU bits, tails included (the fused epilogue and
    /// the separate pass may take either, depending on `WEFT_KERNELS`).
    #[test]
    fn gelu_in_sixteen_lanes_equals_eight() {
        if crate::Isa::detected() < crate::Isa::Avx512Bf16 {
            println!("skipped: no AVX-512 here");
            return;
        }
        let values: Vec<f32> = (0..1037).map(|i| (i as f32 - 520.0) / 37.0).collect();
        let (mut sixteen, mut eight) = (values.clone(), values);
        // SAFETY: AVX-512F (and so AVX2 and FMA) was detected.
        unsafe {
            super::x86::gelu_tanh16(&mut sixteen);
            super::x86::gelu_tanh(&mut eight);
        }
        assert_eq!(
            sixteen.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            eight.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    /// The same for SiLU times the up projection.
    #[test]
    fn silu_in_sixteen_lanes_equals_eight() {
        if crate::Isa::detected() < crate::Isa::Avx512Bf16 {
            println!("skipped: no AVX-512 here");
            return;
        }
        let gate: Vec<f32> = (0..1037).map(|i| (i as f32 - 520.0) / 37.0).collect();
        let up: Vec<f32> = (0..1037).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let (mut sixteen, mut eight) = (gate.clone(), gate);
        // SAFETY: AVX-512F (and so AVX2 and FMA) was detected.
        unsafe {
            super::x86::silu_mul16(&mut sixteen, &up);
            super::x86::silu_mul(&mut eight, &up);
        }
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&sixteen), bits(&eight));
    }
}
