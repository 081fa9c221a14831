//! 8-bit products on AMX-INT8 tiles (`tdpbsud`) for q8_0 weights at prefill: one instruction
//! multiplies 16 activation rows by 16 weight columns over one block of 32 inputs (8,192
//! byte products, 128 `vpdpbusd`s' worth), and each block's exact 32-bit sums are stored and
//! scaled outside the tile, as llama.cpp's AMX backend does: q8_0 has a scale per block of 32,
//! so the tile cannot sum across blocks.
//!
//! The operands are the VNNI path's ([`crate::vnni`]): the activations quantized by the same
//! code, read in place (16 rows of a block's 32 bytes, `kp` apart); the weights' panels, whose
//! block of 16 columns is already a tile's second operand (8 rows of 16 columns' 4 consecutive
//! bytes), unsigned (stored plus 128), hence `tdpbsud` (signed by unsigned) and the same
//! starting value per row and block, `-128 * sum(q)`. Every block's sum is thus the same
//! integer, and it is scaled and added in the same operations and order as on VNNI
//! (`fma(float(S_b), w_scale * x_scale, y)`, then the bias): a sequence gets bit-identical
//! logits whichever path its rows took, so the model stays batch-invariant.

use crate::amx;
use crate::gemm_amx::TilesBorrowed;
use crate::packed::{PackedWeight, Q8Panels, PANEL, Q8_BLOCK, Q8_PANEL_BLOCK_BYTES as BLOCK_BYTES};
use crate::shared::SharedOut;
use crate::vnni::{quantize_rows, Target, Tile};
use rayon::prelude::*;

/// Activation rows per tile.
const ROWS: usize = 16;
/// Accumulator tiles (tmm0-3), each with a slot of [`Stored`].
const ROUND: usize = 4;
/// Weights a parallel block keeps in L2 while every group of 16 activation rows passes over them.
const L2_WEIGHT_BYTES: usize = 512 * 1024;

/// Rows from which the tiles beat [`crate::vnni`] (measured with `examples/gemm_vs_tiles.rs`).
pub(crate) const MIN_ROWS: usize = 16;

/// `out[m, n] = x[m, k] W^T + bias` for q8_0 weights in panels, on AMX-INT8 tiles.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512BW, AMX-TILE and AMX-INT8, and this process may use the tiles.
pub(crate) unsafe fn matmul_q8(
    x: &[f32],
    m: usize,
    packed: &PackedWeight,
    w: &Q8Panels,
    bias: Option<&[f32]>,
    out: SharedOut,
) {
    let (n, k, kp) = (packed.n, packed.k, packed.kp);
    let blocks = kp / Q8_BLOCK;
    // The last group of rows is padded with zero rows (scales zero), whose sums are never stored.
    // SAFETY: the caller vouches for the CPU.
    let act = unsafe { quantize_rows(x, k, kp, m.div_ceil(ROWS) * ROWS) };
    let (starts, scales) = (&by_block(&act.starts, blocks), &by_block(&act.scales, blocks));
    let panels = n.div_ceil(PANEL);
    let block = block_panels(panels, kp);
    let act = &act;
    (0..panels.div_ceil(block)).into_par_iter().for_each(|blk| {
        let (p0, p1) = (blk * block, ((blk + 1) * block).min(panels));
        // SAFETY: the caller vouches for the CPU and the permission.
        let _tiles = unsafe { TilesBorrowed::new(&amx::INT8_CONFIG) };
        let mut stored = Stored([0; ROUND * ROWS * PANEL]);
        for i in (0..m).step_by(ROWS) {
            for p in p0..p1 {
                let tile = Tile {
                    w: w.values[p * blocks * BLOCK_BYTES..].as_ptr(),
                    w_scales: w.scales[p * blocks * PANEL..].as_ptr(),
                    x: act.q[i * kp..].as_ptr(),
                    x_scales: scales[i * blocks..].as_ptr(),
                    x_starts: starts[i * blocks..].as_ptr(),
                    kp,
                    blocks,
                };
                let cols = (n - p * PANEL).min(PANEL);
                let bias = bias.map(|b| &b[p * PANEL..]);
                let target = Target { out, row: i, rows: ROWS.min(m - i), col: p * PANEL, n, cols, bias };
                // SAFETY: the caller vouches for the CPU, the tiles are configured; the tile reads
                // 16 quantized rows (padded) and one panel, and writes only its own outputs.
                unsafe { x86::tile(&tile, &target, &mut stored) };
            }
        }
    });
}

/// Each group of 16 rows' values (`[row][block]`) block by block (`[block][row]`): a block's 16
/// scales or starting values are then at fixed offsets from one pointer.
fn by_block<T: Copy + Default>(values: &[T], blocks: usize) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    for (group_out, group) in out.chunks_exact_mut(ROWS * blocks).zip(values.chunks_exact(ROWS * blocks)) {
        for (r, row) in group.chunks_exact(blocks).enumerate() {
            for (b, &v) in row.iter().enumerate() {
                group_out[b * ROWS + r] = v;
            }
        }
    }
    out
}

/// Panels per parallel block: as many as fit [`L2_WEIGHT_BYTES`], but at least four blocks per
/// thread.
fn block_panels(panels: usize, kp: usize) -> usize {
    let by_cache = L2_WEIGHT_BYTES / (kp * PANEL).max(1);
    let by_threads = panels.div_ceil(rayon::current_num_threads() * 4);
    by_cache.min(by_threads).max(1)
}

/// The 32-bit sums of the last [`ROUND`] blocks as the tiles store them, 16 rows of 16 each.
#[repr(C, align(64))]
struct Stored([i32; ROUND * ROWS * PANEL]);

mod x86 {
    use super::{Stored, Target, Tile, BLOCK_BYTES, PANEL, ROUND, ROWS};
    use crate::packed::Q8_BLOCK;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Blocks ahead whose weights a tile product asks for: the weight tiles' loads were where
    /// the products waited (prefetching took them from 1.05-1.17x the VNNI loop nest to
    /// 1.14-1.28x; 3 to 16 blocks ahead measured alike; prefetching the activations too was
    /// slower).
    const PREFETCH_BLOCKS: usize = 6;

    /// 16 rows by 16 columns over every block: each block's product runs on its own accumulator
    /// tile (tmm0-3 in turn) three blocks ahead of the one being scaled, and its sums are stored
    /// two blocks ahead, so that the tiles work while the vector registers scale (measured:
    /// 1.05-1.17x the VNNI loop nest, against 0.92-1.04x with one round of four products, stored,
    /// then scaled).
    ///
    /// # Safety
    /// The CPU has AVX-512F and AMX-INT8 and [`crate::amx::INT8_CONFIG`] is loaded; `tile` reads
    /// 16 rows and one panel; `target` is this tile's alone.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(t: &Tile, target: &Target, stored: &mut Stored) {
        let mut sums = [_mm512_setzero_ps(); ROWS];
        let blocks = t.blocks;
        let base = stored.0.as_mut_ptr();
        let slot = |b: usize| base.add(b % ROUND * ROWS * PANEL);
        let issue = |b: usize| {
            let (x, w) = (t.x.add(b * Q8_BLOCK), t.w.add(b * BLOCK_BYTES));
            let ahead = w.wrapping_add(PREFETCH_BLOCKS * BLOCK_BYTES);
            for line in 0..BLOCK_BYTES / 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64) as *const i8);
            }
            match b % ROUND {
                0 => issue_0(x, w, t.kp),
                1 => issue_1(x, w, t.kp),
                2 => issue_2(x, w, t.kp),
                _ => issue_3(x, w, t.kp),
            }
        };
        let store = |b: usize| match b % ROUND {
            0 => store_0(slot(b)),
            1 => store_1(slot(b)),
            2 => store_2(slot(b)),
            _ => store_3(slot(b)),
        };
        for b in 0..3.min(blocks) {
            issue(b);
        }
        for b in 0..2.min(blocks) {
            store(b);
        }
        for b in 0..blocks {
            if b + 3 < blocks {
                issue(b + 3);
            }
            if b + 2 < blocks {
                store(b + 2);
            }
            let w_scale = _mm512_loadu_ps(t.w_scales.add(b * PANEL));
            let block_sums = slot(b) as *const i32;
            for (row, sum) in sums.iter_mut().enumerate() {
                let at = b * ROWS + row;
                let exact = _mm512_add_epi32(
                    _mm512_load_si512(block_sums.add(row * PANEL) as *const __m512i),
                    _mm512_set1_epi32(*t.x_starts.add(at)),
                );
                let scale = _mm512_mul_ps(w_scale, _mm512_set1_ps(*t.x_scales.add(at)));
                *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, *sum);
            }
        }
        let mask = ((1u32 << target.cols) - 1) as __mmask16;
        let bias = match target.bias {
            Some(bias) => _mm512_maskz_loadu_ps(mask, bias.as_ptr()),
            None => _mm512_setzero_ps(),
        };
        for (r, sum) in sums.iter().enumerate().take(target.rows) {
            let at = (target.row + r) * target.n + target.col;
            _mm512_mask_storeu_ps(target.out.0.add(at), mask, _mm512_add_ps(*sum, bias));
        }
    }

    /// One block's product on one accumulator tile (`issue_*`), and storing its 16 x 16 sums
    /// (`store_*`): the tile's name is part of the instruction, so there is one pair per tile.
    macro_rules! tile_pair {
        ($issue:ident, $store:ident, $c:literal, $a:literal, $b:literal) => {
            #[inline(always)]
            unsafe fn $issue(x: *const i8, w: *const u8, kp: usize) {
                asm!(
                    concat!("tilezero ", $c),
                    concat!("tileloadd ", $a, ", [{x} + {kp}*1]"),
                    concat!("tileloadd ", $b, ", [{w} + {line}*1]"),
                    concat!("tdpbsud ", $c, ", ", $a, ", ", $b),
                    x = in(reg) x, w = in(reg) w, kp = in(reg) kp, line = in(reg) 64usize,
                    options(nostack, readonly, preserves_flags)
                );
            }

            #[inline(always)]
            unsafe fn $store(stored: *mut i32) {
                asm!(
                    concat!("tilestored [{s} + {line}*1], ", $c),
                    s = in(reg) stored, line = in(reg) 64usize,
                    options(nostack, preserves_flags)
                );
            }
        };
    }
    tile_pair!(issue_0, store_0, "tmm0", "tmm4", "tmm6");
    tile_pair!(issue_1, store_1, "tmm1", "tmm5", "tmm7");
    tile_pair!(issue_2, store_2, "tmm2", "tmm4", "tmm6");
    tile_pair!(issue_3, store_3, "tmm3", "tmm5", "tmm7");
}

#[cfg(test)]
mod tests {
    use crate::{matmul_using, Isa, Kernel, PackedWeight, WeightFormat};

    /// The tiles give the VNNI loop nest's bits: no inputs, every row count around the tile's 16 (padded
    /// groups), ragged inputs and columns, with and without bias, inputs past four blocks' rounds.
    #[test]
    fn the_tiles_give_the_vnni_bits() {
        if !crate::amx_int8() {
            println!("skipped: no AMX-INT8 here");
            return;
        }
        let shapes =
            [(1, 32, 16), (15, 64, 17), (16, 96, 33), (17, 40, 50), (33, 1000, 70), (70, 896, 300), (48, 4304, 40)];
        for (m, k, n) in shapes {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0 * (1 + i % 7) as f32).collect();
            let values: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / n as f32 - 0.5).collect();
            let w = PackedWeight::from_f32_for(Isa::Amx, &values, n, k, WeightFormat::Q8);
            for bias in [None, Some(&bias[..])] {
                let mut want = vec![f32::NAN; m * n];
                let mut got = vec![f32::NAN; m * n];
                matmul_using(Isa::Amx, Kernel::Tiles, &x, m, &w, bias, &mut want);
                matmul_using(Isa::Amx, Kernel::Gemm, &x, m, &w, bias, &mut got);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), e.to_bits(), "{m}x{k}x{n} [{i}]: {g} vs {e}");
                }
            }
        }
    }
}
