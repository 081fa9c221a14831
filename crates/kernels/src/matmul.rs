//! The driver: picks the loop nest (the outer-product GEMM of [`crate::gemm`] for many rows,
//! dot-product tiles for few), and for the tiles splits `y = x W^T` into blocks of weight rows
//! that stay in L2, hands the blocks to rayon's pool, and walks each block in small register
//! tiles computed by the ISA kernels. 8-bit weights on AVX-512 have one loop nest of their own
//! for every row count ([`crate::vnni`]), and on AMX the tiles of [`crate::q8_amx`] from 16 rows.

use crate::activations::Norm;
use crate::packed::{PackedWeight, Storage, WeightFormat, Q8_BLOCK};
use crate::shared::{SharedOut, Tile, MR_MAX, NR_MAX};
use crate::{avx2, avx512, scalar, Isa};
use half::bf16;
use rayon::prelude::*;

/// Rows of `x` from which the outer-product GEMM ([`crate::gemm`]) beats the dot-product tiles,
/// measured with `examples/gemm_vs_tiles.rs` on the language model's shapes: f32 weights, read
/// in place, win from 16 rows (1.2-1.3x); 8-bit and bf16 weights are widened first, which pays
/// from 32 rows (8-bit, 1.1-1.2x) and 64 (bf16, 0.96x at 32); at 512 rows the GEMM is 1.0-1.1x
/// (f32), 1.2-1.8x (bf16) and 1.1-1.35x (8-bit). On AVX-512 BF16 the bf16 GEMM
/// ([`crate::gemm512`]) reads its weights in place and wins from 32 rows (1.44x at 32; 1.1-1.6x
/// at 512 rows: 650-840 GFLOP/s on two Zen 5 cores), and with its 16-row panels from 9 (Zen 4,
/// 896 and 4,864 inputs: 1.04-1.27x at 9 rows, 1.2-1.4x at 10-16, 0.78-1.12x at 8). (bf16
/// weights packed as AMX tiles and 8-bit weights on AVX-512 take neither: see
/// [`crate::gemm_amx`] and [`crate::vnni`].)
fn gemm_min_rows(format: WeightFormat, isa: Isa) -> usize {
    match (format, isa) {
        (WeightFormat::F32, _) => 16,
        (WeightFormat::Q8, _) => 32,
        (WeightFormat::Bf16, Isa::Avx512Bf16 | Isa::Amx) => 9,
        (WeightFormat::Bf16, _) => 64,
    }
}

/// Bytes of weight rows one block keeps hot (half of a 512 KiB L2, leaving room for activations).
const BLOCK_BYTES: usize = 256 * 1024;

/// `out[m, n] = x[m, k] W^T + bias`, with the instruction set [`Isa::active`] picked.
pub fn matmul(x: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_using(Isa::active(), Kernel::Auto, x, m, w, bias, out)
}

/// Which loop nest computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The GEMM from [`gemm_min_rows`] rows on, the tiles below.
    Auto,
    /// Dot-product tiles of up to 4x4 (what one or two rows need).
    Tiles,
    /// The outer-product GEMM ([`crate::gemm`] on AVX2, [`crate::gemm512`] for bf16 weights on
    /// AVX-512 BF16, with [`crate::amx`] tiles on AMX); the tiles where neither exists (scalar).
    Gemm,
}

/// As [`matmul`], on a given instruction set (which must be one of [`Isa::available`]) and
/// with the loop nest chosen (for tests and benchmarks).
pub fn matmul_using(
    isa: Isa,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(out.len(), m * w.n, "out must be {m}x{}", w.n);
    // SAFETY: `out` holds the m x n values `product` writes.
    unsafe { product(isa, kernel, x, m, None, w, Epilogue::bias(bias), SharedOut(out.as_mut_ptr())) }
}

/// `x[m, k] W^T + bias` as a new `[m, n]` vector, on [`Isa::active`]. Its memory is never
/// zeroed first: every loop nest writes each output exactly once (a prefill step's outputs are
/// tens of megabytes per layer, and zeroing them cost as much as some of the products).
pub fn matmul_new(x: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>) -> Vec<f32> {
    matmul_new_then(x, m, w, bias, Activation::Identity)
}

/// What a product's outputs go through once summed (and the bias added).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// [`crate::gelu_tanh`] (SigLIP's MLP).
    GeluTanh,
}

/// As [`matmul_new`], each output then through `activation`: on AMX tiles as each block of
/// outputs is finished, while it is in cache (a separate pass over the vision tower's MLP
/// outputs, 12.5 MB a layer, cost a tenth of its products); after the product elsewhere.
pub fn matmul_new_then(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    activation: Activation,
) -> Vec<f32> {
    product_new(x, m, None, w, Epilogue { activation, ..Epilogue::bias(bias) })
}

/// `x[m, k] W^T + bias + residual` (`[m, n]`) as a new vector: a residual connection in the
/// product. On AMX tiles the sums start from the residual and the bias, read once (a separate
/// addition read both `[m, n]` arrays and wrote a third); elsewhere it is added after.
pub fn matmul_new_adding(x: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, residual: &[f32]) -> Vec<f32> {
    assert_eq!(residual.len(), m * w.n, "the residual must be {m}x{}", w.n);
    product_new(x, m, None, w, Epilogue { residual: Some(residual), ..Epilogue::bias(bias) })
}

/// `norm(x)[m, k] W^T + bias` as a new `[m, n]` vector: on AMX tiles each row is normalised as
/// it is rounded into the product's panels (the norm's output never written out in f32);
/// elsewhere [`crate::norm_rows`] runs first. Both give the same bits.
pub fn matmul_new_normed(x: &[f32], m: usize, norm: &Norm, w: &PackedWeight, bias: Option<&[f32]>) -> Vec<f32> {
    product_new(x, m, Some(norm), w, Epilogue::bias(bias))
}

/// What an MLP's hidden activations go through between its two products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpActivation {
    /// [`crate::gelu_tanh`] of every output of the first product (SigLIP).
    GeluTanh,
    /// `silu(gate) * up`, the first product's outputs being the gate's then the up
    /// projection's, half each (Qwen2): [`crate::silu_mul_halves`].
    SiluGated,
}

/// A two-layer MLP: `down(activation(x up^T + up_bias)) + down_bias`.
#[derive(Debug, Clone, Copy)]
pub struct Mlp<'a> {
    pub up: &'a PackedWeight,
    pub up_bias: Option<&'a [f32]>,
    pub activation: MlpActivation,
    pub down: &'a PackedWeight,
    pub down_bias: Option<&'a [f32]>,
}

/// `residual + mlp(norm(x))` for `x` of `[m, mlp.up.k]` (`norm` where there is one), as a new
/// `[m, mlp.down.n]` vector. On AMX tiles, for as many rows as prefill and the vision tower run,
/// the norm is applied as the input is rounded into the first product's panels and the hidden
/// activations go from the first product to the second as bf16 panels ([`crate::mlp_amx`]);
/// elsewhere each step runs apart (as [`matmul_new_normed`], [`matmul_new_then`],
/// [`crate::silu_mul_halves`], [`matmul_new_adding`]). Both give the same bits.
pub fn mlp_new_adding(x: &[f32], m: usize, norm: Option<&Norm>, mlp: &Mlp, residual: &[f32]) -> Vec<f32> {
    let Mlp { up, up_bias, activation, down, down_bias } = *mlp;
    let hidden = match activation {
        MlpActivation::GeluTanh => up.n,
        MlpActivation::SiluGated => up.n / 2,
    };
    assert!(activation == MlpActivation::GeluTanh || up.n.is_multiple_of(2), "gated halves of {}", up.n);
    assert_eq!(down.k, hidden, "the down projection takes {} inputs, not {hidden}", down.k);
    assert_eq!(x.len(), m * up.k, "x must be {m}x{}", up.k);
    assert!(norm.is_none_or(|norm| norm.width() == up.k), "a norm for {} inputs", up.k);
    assert_eq!(residual.len(), m * down.n, "the residual must be {m}x{}", down.n);
    assert!(up_bias.is_none_or(|b| b.len() == up.n) && down_bias.is_none_or(|b| b.len() == down.n), "biases");
    #[cfg(target_arch = "x86_64")]
    if Isa::active() == Isa::Amx && m > 0 {
        let mut out = Vec::with_capacity(m * down.n);
        // SAFETY: AMX is active (detected, with the permission); the capacity holds the m x n
        // values written through the pointer when it returns true...
        if unsafe { crate::mlp_amx::mlp_bf16(x, m, norm, mlp, residual, SharedOut(out.as_mut_ptr())) } {
            // ...all of them (the second product writes every output once).
            unsafe { out.set_len(m * down.n) };
            return out;
        }
    }
    let hidden = match activation {
        MlpActivation::GeluTanh => {
            product_new(x, m, norm, up, Epilogue { activation: Activation::GeluTanh, ..Epilogue::bias(up_bias) })
        }
        MlpActivation::SiluGated => {
            crate::silu_mul_halves(&product_new(x, m, norm, up, Epilogue::bias(up_bias)), hidden)
        }
    };
    matmul_new_adding(&hidden, m, down, down_bias, residual)
}

/// What becomes of a product's sums: the bias added, then the activation, or the residual
/// (never both).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) activation: Activation,
    /// `[m, n]` values added to the product (a residual connection).
    pub(crate) residual: Option<&'a [f32]>,
}

impl<'a> Epilogue<'a> {
    fn bias(bias: Option<&'a [f32]>) -> Self {
        Epilogue { bias, activation: Activation::Identity, residual: None }
    }
}

/// [`product`] into a new `[m, n]` vector, on [`Isa::active`].
fn product_new(x: &[f32], m: usize, norm: Option<&Norm>, w: &PackedWeight, epilogue: Epilogue) -> Vec<f32> {
    let len = m * w.n;
    let mut out = Vec::with_capacity(len);
    // SAFETY: the capacity holds the m x n values `product` writes, through the pointer (no
    // reference to the uninitialised memory is made)...
    unsafe { product(Isa::active(), Kernel::Auto, x, m, norm, w, epilogue, SharedOut(out.as_mut_ptr())) };
    // ...and all of them are written (`every_path_matches_the_naive_product` checks each
    // path on an output filled with NaN).
    unsafe { out.set_len(len) };
    out
}

/// Writes all of `out[m, n] = activation(norm(x) W^T + bias) + residual`, as `norm` (where
/// there is one) and `epilogue` say.
///
/// # Safety
/// `out` points to `m * n` writable `f32` that nothing else accesses during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    isa: Isa,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    norm: Option<&Norm>,
    w: &PackedWeight,
    epilogue: Epilogue,
    out: SharedOut,
) {
    let Epilogue { bias, activation, residual } = epilogue;
    assert_eq!(x.len(), m * w.k, "x must be {m}x{}", w.k);
    assert!(norm.is_none_or(|norm| norm.width() == w.k), "a norm for {} inputs", w.k);
    assert!(bias.is_none_or(|b| b.len() == w.n), "bias must have {} values", w.n);
    assert!(residual.is_none() || activation == Activation::Identity, "an activation and a residual");
    assert!(isa <= Isa::detected(), "{} is not supported by this CPU", isa.name());
    if m == 0 || w.n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Amx, Storage::Bf16Tiles(tiles)) = (isa, &w.storage) {
        // Every row count: the tiles are this layout's only loop nest (the module says why).
        // A norm is applied as each row is rounded into the panels.
        let order = crate::gemm_amx::Order::for_product(m, w.n, w.kp);
        // SAFETY: AVX-512F, AVX-512 BF16 and the AMX tiles are available (isa <= detected).
        unsafe { crate::gemm_amx::gemm_bf16(order, x, m, norm, w, tiles.tiles(), epilogue, out) };
        return;
    }
    let normed = norm.map(|norm| crate::norm_rows_new(x, norm));
    let x = normed.as_deref().unwrap_or(x);
    // SAFETY: as the caller promises.
    unsafe { product_then_identity(isa, kernel, x, m, w, bias, out) };
    // SAFETY: every value was written; the caller gives this call the output alone.
    let written = unsafe { std::slice::from_raw_parts_mut(out.0, m * w.n) };
    if activation == Activation::GeluTanh {
        crate::gelu_tanh(written);
    }
    if let Some(residual) = residual {
        written.par_chunks_mut(crate::activations::CHUNK).zip(residual.par_chunks(crate::activations::CHUNK)).for_each(
            |(out, residual)| {
                out.iter_mut().zip(residual).for_each(|(o, r)| *o += r);
            },
        );
    }
}

/// Writes all of `out[m, n] = x W^T + bias`, each value once, never reading `out`, for the
/// products [`product`] has checked (non-empty) and does not run on AMX tiles.
///
/// # Safety
/// As [`product`].
unsafe fn product_then_identity(
    isa: Isa,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: SharedOut,
) {
    let (n, k, kp) = (w.n, w.k, w.kp);
    let gemm = match kernel {
        Kernel::Auto => m >= gemm_min_rows(w.format(), isa),
        Kernel::Tiles => false,
        Kernel::Gemm => true,
    };
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512Bf16 | Isa::Amx, Storage::Q8Panels(panels)) = (isa, &w.storage) {
        // AMX-INT8 tiles for many rows where there are any, one VNNI loop nest otherwise; both
        // give the same bits (`crate::q8_amx` says how).
        let tiles = isa == Isa::Amx
            && crate::amx_int8()
            && match kernel {
                Kernel::Auto => m >= crate::q8_amx::MIN_ROWS,
                Kernel::Tiles => false,
                Kernel::Gemm => true,
            };
        // SAFETY: AVX-512F, BW and VNNI are available (isa <= detected), and AMX-INT8 with the
        // tile permission where `tiles` (Isa::Amx is detected only with the permission).
        match tiles {
            true => unsafe { crate::q8_amx::matmul_q8(x, m, w, panels, bias, out) },
            false => unsafe { crate::vnni::matmul_q8(x, m, w, panels, bias, out) },
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (true, Isa::Avx512Bf16 | Isa::Amx, Storage::Bf16(wb)) = (gemm, isa, &w.storage) {
        // SAFETY: AVX-512F and AVX-512 BF16 are available (isa <= detected).
        unsafe { crate::gemm512::gemm_bf16(x, m, w, wb, bias, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (true, Isa::Avx512Bf16 | Isa::Amx, Storage::F32(values)) = (gemm, isa, &w.storage) {
        // SAFETY: AVX-512F is available (isa <= detected).
        unsafe { crate::gemm512::gemm_f32(x, m, w, values, bias, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if gemm && isa >= Isa::Avx2 && matches!(w.storage, Storage::F32(_) | Storage::Q8 { .. }) {
        // SAFETY: AVX2 and FMA are available (isa <= detected).
        unsafe { crate::gemm::gemm_avx2(x, m, w, bias, out) };
        return;
    }
    let job = Job { m, n, kp, bias, out };
    // SAFETY (every kernel closure below): `isa <= detected` (asserted above) gives each kernel
    // the instructions it needs; `job.run` passes `mr` rows of `kp` padded activations, and
    // `rows` the kernel's `nr` weight rows of `kp`, as the kernels' contracts ask.
    match (&w.storage, isa) {
        (Storage::Bf16(wb), Isa::Avx512Bf16 | Isa::Amx) => {
            let xb = pad(x, m, k, kp, 0u16, |v| bf16::from_f32(v).to_bits());
            job.run(&xb, 2, |xs, mr, j, nr, acc| unsafe {
                avx512::tile_bf16(xs, mr, rows(wb, j, nr, kp), nr, kp, acc)
            });
        }
        (Storage::Bf16(wb), Isa::Avx2) => {
            let xp = pad_evens_then_odds(x, m, k, kp);
            job.run(&xp, 2, |xs, mr, j, nr, acc| unsafe { avx2::tile_bf16(xs, mr, rows(wb, j, nr, kp), nr, kp, acc) });
        }
        (Storage::F32(wf), Isa::Avx2 | Isa::Avx512Bf16 | Isa::Amx) => {
            let xp = pad_f32(x, m, k, kp);
            job.run(&xp, 4, |xs, mr, j, nr, acc| unsafe { avx2::tile_f32(xs, mr, rows(wf, j, nr, kp), nr, kp, acc) });
        }
        (Storage::Q8 { values, scales }, Isa::Avx2 | Isa::Avx512Bf16 | Isa::Amx) => {
            let xp = pad_f32(x, m, k, kp);
            let per_row = kp / Q8_BLOCK;
            job.run(&xp, 1, |xs, mr, j, nr, acc| unsafe {
                avx2::tile_q8(xs, mr, rows(values, j, nr, kp), rows(scales, j, nr, per_row), nr, kp, acc)
            });
        }
        // Scalar code, and 8-bit panels or AMX tiles on a set below the one they were packed for.
        (_, Isa::Scalar) | (Storage::Q8Panels(_) | Storage::Bf16Tiles(_), _) => {
            let xp = pad_f32(x, m, k, kp);
            job.run(&xp, 4, |xs, mr, j, nr, acc| scalar::tile(xs, mr, nr, kp, acc, |c, p| w.get(j + c, p)));
        }
    }
}

/// Activations padded to `kp` and, within every run of 16 values, reordered to the 8 at even
/// positions then the 8 at odd ones (the order in which the AVX2 bf16 kernel unpacks weight
/// pairs), in one pass: this runs on every decode step.
fn pad_evens_then_odds(x: &[f32], m: usize, k: usize, kp: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * kp];
    if k > 0 {
        for (dst, src) in out.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
            for (p, &v) in src.iter().enumerate() {
                let (run, j) = (p / 16, p % 16);
                dst[run * 16 + if j % 2 == 0 { j / 2 } else { 8 + j / 2 }] = v;
            }
        }
    }
    out
}

/// Rows `j..j + nr` of a row-major matrix with rows of `len`.
fn rows<T>(matrix: &[T], j: usize, nr: usize, len: usize) -> &[T] {
    &matrix[j * len..(j + nr) * len]
}

/// Activations with rows padded to `kp` (borrowed as they are when no padding is needed).
fn pad_f32(x: &[f32], m: usize, k: usize, kp: usize) -> std::borrow::Cow<'_, [f32]> {
    if k == kp {
        std::borrow::Cow::Borrowed(x)
    } else {
        std::borrow::Cow::Owned(pad(x, m, k, kp, 0.0, |v| v))
    }
}

fn pad<T: Copy>(x: &[f32], m: usize, k: usize, kp: usize, zero: T, convert: impl Fn(f32) -> T) -> Vec<T> {
    let mut out = vec![zero; m * kp];
    if k > 0 {
        for (dst, src) in out.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = convert(s);
            }
        }
    }
    out
}

struct Job<'a> {
    m: usize,
    n: usize,
    kp: usize,
    bias: Option<&'a [f32]>,
    out: SharedOut,
}

impl Job<'_> {
    /// Runs `kernel(x_rows, mr, first_weight_row, nr, acc)` over every tile, blocks of weight
    /// rows in parallel; `weight_bytes` per element sizes the blocks.
    fn run<X: Sync>(&self, x: &[X], weight_bytes: usize, kernel: impl Fn(&[X], usize, usize, usize, &mut Tile) + Sync) {
        let (m, n, kp) = (self.m, self.n, self.kp);
        let block = block_rows(n, kp * weight_bytes);
        // Few rows (decode) are bound by reading the weights. f32 streams best four rows at a
        // time; bf16 and 8-bit rows are short, and one row at a time (one sequential stream per
        // core) reads them fastest: measured 13.9 vs 10.3 tok/s (bf16) and 18.2 vs 13.1 (q8_0)
        // at batch 1 on the real 0.5b geometry, while f32 drops from 9.1 to 7.2.
        let few_rows_tile = if weight_bytes >= 4 { NR_MAX } else { 1 };
        let out = self.out;
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
            let (n0, n1) = (b * block, ((b + 1) * block).min(n));
            let mut i = 0;
            while i < m {
                let mr = MR_MAX.min(m - i);
                let nr_main = if mr <= 2 { few_rows_tile } else { 3 };
                let mut j = n0;
                while j < n1 {
                    let nr = nr_main.min(n1 - j);
                    let mut acc: Tile = [[0.0; NR_MAX]; MR_MAX];
                    kernel(&x[i * kp..(i + mr) * kp], mr, j, nr, &mut acc);
                    for (r, row) in acc.iter().enumerate().take(mr) {
                        for (c, &v) in row.iter().enumerate().take(nr) {
                            let b = self.bias.map_or(0.0, |b| b[j + c]);
                            // SAFETY: (i + r, j + c) is inside `out`, and only this block writes column j + c.
                            unsafe { out.write((i + r) * n + j + c, v + b) };
                        }
                    }
                    j += nr;
                }
                i += mr;
            }
        });
    }
}

/// Weight rows per block: as many as fit [`BLOCK_BYTES`], but small enough that every thread
/// gets several blocks; a multiple of 12 so 3- and 4-row tiles divide it.
fn block_rows(n: usize, row_bytes: usize) -> usize {
    let by_cache = BLOCK_BYTES / row_bytes.max(1);
    let by_threads = n.div_ceil(rayon::current_num_threads() * 4);
    (by_cache.min(by_threads).div_ceil(12) * 12).max(12)
}
