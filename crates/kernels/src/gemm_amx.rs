//! bf16 products on AMX tiles ([`crate::amx`]) at every row count, on Sapphire Rapids and later
//! Xeons: prefill, the vision tower, and decode (where one row streams the weights through the
//! tiles as fast as memory brings them).
//!
//! Both operands are contiguous 1 KiB tiles, so every tile load reads 16 consecutive cache lines
//! (a weight row read in place is `kp * 2` bytes from the next, and at 1,024 inputs those lines
//! share two L1 sets). The weights are packed once, when loaded (`packed.rs`): groups of 32
//! columns, pair-interleaved, the last group zero-padded so that every product runs on the
//! tiles. The activations are rounded to bf16 once per call, as the other bf16 paths round
//! them, and laid out panel by panel (32 rows). Every output is the same sum in the same order
//! whatever the number of rows, so a sequence gets the same logits alone and in a batch.

use crate::amx;
use crate::matmul::Activation;
use crate::packed::{group_len, PackedWeight, COLS, STEP_UNITS};
use crate::shared::SharedOut;
use rayon::prelude::*;
pub(crate) use x86::round_into_steps;

/// Weight columns per parallel block at most: 96 columns of 4,864 inputs are 912 KiB of tiles,
/// which stay in a 2 MiB L2 next to one activation panel (304 KiB).
const MAX_BLOCK_COLS: usize = 96;
/// Inputs from which a block runs in chunks of [`CHUNK_INPUTS`]: past this, one activation panel
/// (1.2 MB at the 7b's 18,944) and a block's weights (3.6 MB) do not stay in a 2 MiB L2 while
/// every panel passes over the block. Chunks of 2,048 took that product from 883 to 1,270
/// GFLOP/s; on the 0.5b's 2,816- and 4,864-input products they measured 5-15% slower.
const LONG_INPUTS: usize = 8192;
/// Inputs per chunk: a panel's chunk is 128 KiB, a block's 384 KiB.
const CHUNK_INPUTS: usize = 2048;

/// `out[m, n] = x[m, k] W^T + bias` for the bf16 weights of `w`, packed as `tiles`.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512 BF16, AMX-TILE and AMX-BF16, and this process may use the
/// tiles (what [`crate::Isa::Amx`] means).
pub(crate) unsafe fn gemm_bf16(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    tiles: &[u16],
    bias: Option<&[f32]>,
    activation: Activation,
    out: SharedOut,
) {
    // The panels' buffer is the calling thread's, kept from call to call (as large as its
    // largest product's activations in bf16): packing into a fresh zeroed one per call took
    // 0.19 ms of a 1.15 ms prefill product, into the kept one 0.10. Taken out while in use, so
    // that a product nested in this one's parallel loop on the same thread allocates its own.
    let mut storage = PANELS.with_borrow_mut(std::mem::take);
    // SAFETY: the caller vouches for the CPU.
    let panels = unsafe { pack_activations(x, m, w.k, w.kp, &mut storage) };
    // SAFETY (both closures): the caller vouches for the CPU and the permission; the tiles are
    // configured while a block holds its `TilesBorrowed`.
    let borrow_tiles = || unsafe { TilesBorrowed::new(&amx::CONFIG) };
    let tile = |call: TileCall| unsafe {
        let TileCall { x, w, inputs, out, ldo, rows, adding } = call;
        match (adding, rows <= 16) {
            (true, _) => amx::tile_adding(x, w, inputs, out, ldo),
            (false, true) => amx::tile_16_rows(x, w, inputs, out, ldo),
            (false, false) => amx::tile(x, w, inputs, out, ldo),
        }
    };
    by_tiles(m, w.n, w.kp, panels, tiles, Finish { bias, activation }, out, borrow_tiles, tile);
    PANELS.with_borrow_mut(|kept| *kept = storage);
}

/// One product of 32 activation rows by 32 weight columns: `inputs` inputs from the tiles at `x`
/// and `w`, into 32 rows of 32 sums `ldo` apart at `out` (at least the first `rows` of them
/// written), added to the sums there if `adding`.
#[derive(Clone, Copy)]
struct TileCall {
    x: *const u16,
    w: *const u16,
    inputs: usize,
    out: *mut f32,
    ldo: usize,
    rows: usize,
    adding: bool,
}

/// The loop nest: blocks of columns in parallel, each multiplied by every panel 32 columns at a
/// time through `tile` (the AMX tile, or a model of it in tests), in one pass or, for long
/// inputs, in chunks; `enter()`'s result is held while a thread works on a block.
#[allow(clippy::too_many_arguments)]
fn by_tiles<T>(
    m: usize,
    n: usize,
    kp: usize,
    panels: &[u16],
    tiles: &[u16],
    finish: Finish,
    out: SharedOut,
    enter: impl Fn() -> T + Sync,
    tile: impl Fn(TileCall) + Sync,
) {
    let panel_len = group_len(kp);
    let (groups_in_all, blocks) = (n.div_ceil(COLS), block_count(n));
    // Block b starts at group b * groups / blocks: sizes differ by one group at most and are
    // spread evenly, so equal runs of blocks (what each thread starts on) hold equal columns.
    let first_group = |b: usize| b * groups_in_all / blocks;
    (0..blocks).into_par_iter().for_each(|b| {
        let (j0, j1) = (first_group(b) * COLS, (first_group(b + 1) * COLS).min(n));
        let groups = (j1 - j0).div_ceil(COLS);
        let columns = Block {
            m,
            n,
            kp,
            j0,
            width: j1 - j0,
            ldo: groups * COLS,
            weights: &tiles[j0 / COLS * panel_len..][..groups * panel_len],
            finish: Finish { bias: finish.bias.map(|b| &b[j0..j1]), ..finish },
            out,
        };
        BLOCK_SUMS.with_borrow_mut(|storage| {
            let _entered = enter();
            if kp > LONG_INPUTS {
                columns.in_chunks(panels, storage, &tile)
            } else {
                columns.in_one_pass(panels, storage, &tile)
            }
        })
    });
}

/// One parallel block: columns `j0..j0 + width` of the `[m, n]` output, their weight tiles
/// (groups of 32 columns, `ldo` in all) and bias.
struct Block<'a> {
    m: usize,
    n: usize,
    kp: usize,
    j0: usize,
    width: usize,
    ldo: usize,
    weights: &'a [u16],
    /// With the block's columns of the bias.
    finish: Finish<'a>,
    out: SharedOut,
}

/// What becomes of the sums: the bias added, then the activation.
#[derive(Clone, Copy)]
struct Finish<'a> {
    bias: Option<&'a [f32]>,
    activation: Activation,
}

impl Finish<'_> {
    fn apply(&self, row: &mut [f32]) {
        if let Some(bias) = self.bias {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
        if self.activation == Activation::GeluTanh {
            crate::activations::gelu_tanh_here(row);
        }
    }
}

impl Block<'_> {
    /// Every panel over all the inputs at once.
    fn in_one_pass(&self, panels: &[u16], storage: &mut Vec<f32>, tile: &impl Fn(TileCall)) {
        let (n, j0, ldo, panel_len) = (self.n, self.j0, self.ldo, group_len(self.kp));
        // Every tile call writes its 32 x 32 sums before they are read.
        let sums = reused_aligned(storage, amx::ROWS * ldo);
        for (panel, xs) in panels.chunks_exact(panel_len).enumerate() {
            let (first_row, rows) = (panel * amx::ROWS, amx::ROWS.min(self.m - panel * amx::ROWS));
            // The tiles store straight into the output when they cover exactly this panel's
            // rows and the block's columns (all but the last panel and block, at most): a copy
            // through `sums` cost a sixth of a vision-tower product.
            let direct = (rows == amx::ROWS || rows == 16) && self.width == ldo;
            for (g, ws) in self.weights.chunks_exact(panel_len).enumerate() {
                let (to, stride) = match direct {
                    // SAFETY: rows first_row.. first_row + rows < m, columns inside the block.
                    true => (unsafe { self.out.0.add(first_row * n + j0 + g * COLS) }, n),
                    false => (sums[g * COLS..].as_mut_ptr(), ldo),
                };
                let (x, w, inputs) = (xs.as_ptr(), ws.as_ptr(), self.kp);
                tile(TileCall { x, w, inputs, out: to, ldo: stride, rows, adding: false });
            }
            for r in 0..rows {
                let at = (first_row + r) * n + j0;
                if !direct {
                    // SAFETY: inside `out`, and only this block writes its columns.
                    unsafe { self.out.write_row(at, &sums[r * ldo..][..self.width]) };
                }
                // SAFETY: as above; the row's columns in the block are written.
                self.finish.apply(unsafe { std::slice::from_raw_parts_mut(self.out.0.add(at), self.width) });
            }
        }
    }

    /// Chunk by chunk of [`CHUNK_INPUTS`] inputs over every panel, all panels' sums kept in the
    /// block's buffer between chunks (stored and loaded as they are, so the sums are those of
    /// one pass), then copied out.
    fn in_chunks(&self, panels: &[u16], storage: &mut Vec<f32>, tile: &impl Fn(TileCall)) {
        let (ldo, panel_len) = (self.ldo, group_len(self.kp));
        let sums = reused_aligned(storage, panels.len() / panel_len * amx::ROWS * ldo);
        for first in (0..self.kp).step_by(CHUNK_INPUTS) {
            let (inputs, at) = (CHUNK_INPUTS.min(self.kp - first), first / amx::STEP * STEP_UNITS);
            let panel_sums = sums.chunks_exact_mut(amx::ROWS * ldo);
            for (panel, (xs, panel_sums)) in panels.chunks_exact(panel_len).zip(panel_sums).enumerate() {
                let rows = amx::ROWS.min(self.m - panel * amx::ROWS);
                for (g, ws) in self.weights.chunks_exact(panel_len).enumerate() {
                    let (x, w) = (xs[at..].as_ptr(), ws[at..].as_ptr());
                    let to = panel_sums[g * COLS..].as_mut_ptr();
                    tile(TileCall { x, w, inputs, out: to, ldo, rows, adding: first > 0 });
                }
            }
        }
        for (r, row) in sums.chunks_exact_mut(ldo).take(self.m).enumerate() {
            let row = &mut row[..self.width];
            self.finish.apply(row);
            // SAFETY: inside `out`, and only this block writes its columns.
            unsafe { self.out.write_row(r * self.n + self.j0, row) };
        }
    }
}

thread_local! {
    /// The activations' panels of the last product this thread called (see [`gemm_bf16`]).
    static PANELS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A block's sums, kept by each thread from block to block rather than allocated and zeroed
    /// for each (for long inputs, all panels' sums: 4.5 MB at 11,700 rows).
    static BLOCK_SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `len` units of `storage` from a cache line on, grown (zeroed) when too short and otherwise
/// holding whatever the last user left: for buffers written before they are read.
fn reused_aligned<T: Copy + Default>(storage: &mut Vec<T>, len: usize) -> &mut [T] {
    let line = 64 / std::mem::size_of::<T>();
    if storage.len() < len + line {
        *storage = vec![T::default(); len + line];
    }
    let skip = storage.as_ptr().align_offset(64).min(line);
    &mut storage[skip..skip + len]
}

/// The AMX tiles configured for Weft on this thread for as long as it lives (one parallel
/// block), and the configuration they had before, put back when it drops: another tile user on
/// the same thread (candle's q4k kernel) finds its own configuration where it left it.
pub(crate) struct TilesBorrowed(amx::SavedConfig);

impl TilesBorrowed {
    /// # Safety
    /// As [`amx::borrow_with`].
    pub(crate) unsafe fn new(config: &amx::TileConfig) -> TilesBorrowed {
        TilesBorrowed(amx::borrow_with(config))
    }
}

impl Drop for TilesBorrowed {
    fn drop(&mut self) {
        // SAFETY: `new` borrowed the tiles on this thread (a block never moves between threads).
        unsafe { amx::give_back(&self.0) }
    }
}

/// Parallel blocks for `n` columns: enough that none is wider than [`MAX_BLOCK_COLS`], at least
/// two a thread and a multiple of the threads where there are enough groups of 32 columns (never
/// more blocks than groups). Blocks all 96 columns wide left 1,024 columns in 11 blocks, 6 for
/// one core and 5 for the other.
fn block_count(n: usize) -> usize {
    let threads = rayon::current_num_threads();
    let blocks = n.div_ceil(MAX_BLOCK_COLS).max(2 * threads).div_ceil(threads) * threads;
    blocks.min(n.div_ceil(COLS))
}

/// `x` rounded to bf16 as panels of 32 rows: `kp / 32` steps of two tiles (rows 0-15, 16-31),
/// each tile row 32 inputs in order; zero-padded to `kp` inputs and whole panels. `storage` is
/// reused as it is: every value of the panels is written.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16.
unsafe fn pack_activations<'a>(x: &[f32], m: usize, k: usize, kp: usize, storage: &'a mut Vec<u16>) -> &'a [u16] {
    let panel_len = group_len(kp);
    let panels = reused_aligned(storage, m.div_ceil(amx::ROWS) * panel_len);
    if k == 0 {
        panels.fill(0);
        return panels;
    }
    panels.par_chunks_mut(panel_len).zip(x.par_chunks(k * amx::ROWS)).for_each(|(panel, rows)| {
        let count = rows.len() / k;
        for r in 0..amx::ROWS {
            let at = (r / 16) * amx::TILE + (r % 16) * amx::STEP;
            if r < count {
                // SAFETY: the caller vouches for the CPU; the panel holds kp / 32 steps from `at`.
                unsafe { x86::round_into_steps(&rows[r * k..][..k], 1.0, panel[at..].as_mut_ptr()) };
            } else {
                // Rows past the last: zeros (their sums are never stored, but stay finite).
                panel[at..].chunks_mut(STEP_UNITS).for_each(|step| step[..amx::STEP].fill(0));
            }
        }
    });
    panels
}

mod x86 {
    use super::STEP_UNITS;
    use std::arch::x86_64::*;

    /// `row` times `scale` rounded to bf16 (to nearest, ties to even) 32 values at a time, each
    /// 32 stored [`STEP_UNITS`] after the previous at `out`; the last ones zero-padded to 32.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `out` holds `row.len().div_ceil(32)` steps.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(crate) unsafe fn round_into_steps(row: &[f32], scale: f32, out: *mut u16) {
        let scale = _mm512_set1_ps(scale);
        for (s, p) in (0..row.len()).step_by(32).enumerate() {
            let left = row.len() - p;
            let (lo_mask, hi_mask) = (lanes(left.min(16)), lanes(left.saturating_sub(16).min(16)));
            let lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(lo_mask, row.as_ptr().add(p)), scale);
            let hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(hi_mask, row.as_ptr().add(p + 16.min(left))), scale);
            let bits = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.add(s * STEP_UNITS) as *mut __m512i, bits);
        }
    }

    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Isa, WeightFormat};

    /// The contract of [`amx::tile`] in plain code, read from the packed layouts: what the tests
    /// run on CPUs without AMX (and Bochs' AMX emulation checks the tile against, `amx-check`).
    fn model_tile(call: TileCall) {
        let TileCall { x: xs, w: ws, inputs: kp, out: sums, ldo, adding, .. } = call;
        let widen = |bits: u16| f32::from_bits((bits as u32) << 16);
        for r in 0..amx::ROWS {
            for c in 0..amx::COLS {
                let sum: f32 = (0..kp)
                    .map(|p| {
                        let (s, i) = (p / amx::STEP, p % amx::STEP);
                        let x_at = s * STEP_UNITS + (r / 16) * amx::TILE + (r % 16) * amx::STEP + i;
                        let w_at = s * STEP_UNITS + (c / 16) * amx::TILE + (i / 2) * 32 + (c % 16) * 2 + i % 2;
                        // SAFETY: inside one panel and one group of kp / 32 steps.
                        unsafe { widen(*xs.add(x_at)) * widen(*ws.add(w_at)) }
                    })
                    .sum();
                // SAFETY: 32 rows of 32 sums ldo apart.
                unsafe { *sums.add(r * ldo + c) = if adding { *sums.add(r * ldo + c) + sum } else { sum } };
            }
        }
    }

    /// The packed layouts and the loop nest (blocks, groups of 32 columns with the last one
    /// padded, panels, bias) give the AVX-512 register tile's product, through the model of the
    /// tile, and through the tile itself where the CPU has AMX; long inputs in chunks too.
    #[test]
    fn the_amx_gemm_matches_the_register_tile() {
        if Isa::detected() < Isa::Avx512Bf16 {
            println!("skipped: no AVX-512 BF16 here");
            return;
        }
        // The last one is past LONG_INPUTS: it runs in chunks, the last one shorter.
        let shapes = [(1, 64, 32), (33, 96, 70), (70, 896, 300), (32, 1152, 4304 / 8), (45, 40, 17), (40, 8200, 50)];
        for (m, k, n) in shapes {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let values: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / n as f32).collect();
            let w = PackedWeight::from_f32_for(Isa::Avx512Bf16, &values, n, k, WeightFormat::Bf16);
            let crate::packed::Storage::Bf16(bits) = &w.storage else { unreachable!() };
            let packed_tiles = crate::packed::Bf16Tiles::from_rows(bits, n, w.kp);
            let tiles = packed_tiles.tiles();
            let mut want = vec![f32::NAN; m * n];
            let mut got = vec![f32::NAN; m * n];
            // SAFETY: AVX-512 BF16 was detected (and AMX where it is used); outputs of m x n.
            unsafe {
                crate::gemm512::gemm_bf16(&x, m, &w, bits, Some(&bias), SharedOut(want.as_mut_ptr()));
                let mut storage = Vec::new();
                let panels = pack_activations(&x, m, k, w.kp, &mut storage);
                let finish = Finish { bias: Some(&bias), activation: Activation::Identity };
                by_tiles(m, n, w.kp, panels, tiles, finish, SharedOut(got.as_mut_ptr()), || (), model_tile);
            }
            let close = |g: f32, e: f32| (g - e).abs() <= 1e-4 * (1.0 + e.abs());
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                assert!(close(g, e), "model tile {m}x{k}x{n} [{i}]: {g} vs {e}");
            }
            if Isa::detected() == Isa::Amx {
                got.fill(f32::NAN);
                // SAFETY: AMX was detected.
                unsafe { gemm_bf16(&x, m, &w, tiles, Some(&bias), Activation::Identity, SharedOut(got.as_mut_ptr())) };
                for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    assert!(close(g, e), "AMX tile {m}x{k}x{n} [{i}]: {g} vs {e}");
                }
            }
        }
    }
}
