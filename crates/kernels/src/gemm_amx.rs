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

use crate::activations::Norm;
use crate::amx::{self, Start};
use crate::matmul::{Activation, Epilogue as Finish};
use crate::packed::{group_len, PackedWeight, COLS, STEP_UNITS};
use crate::panels::{pack_activations, PANELS};
use crate::shared::{reused_aligned, SharedOut, WeightBlocks};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// `out[m, n] = x[m, k] W^T` for the bf16 weights of `w`, packed as `tiles`, then `finish`;
/// each row of `x` through `norm` first where there is one; the work split in `order`
/// ([`Order::for_product`]'s, or any other: every order gives the same bits).
///
/// # Safety
/// The CPU has AVX-512F, AVX-512 BF16, AMX-TILE and AMX-BF16, and this process may use the
/// tiles (what [`crate::Isa::Amx`] means).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16(
    order: Order,
    x: &[f32],
    m: usize,
    norm: Option<&Norm>,
    w: &PackedWeight,
    tiles: &[u16],
    finish: Finish,
    out: SharedOut,
) {
    // The panels' buffer is the calling thread's, kept from call to call (as large as its
    // largest product's activations in bf16): packing into a fresh zeroed one per call took
    // 0.19 ms of a 1.15 ms prefill product, into the kept one 0.10. Taken out while in use, so
    // that a product nested in this one's parallel loop on the same thread allocates its own.
    let mut storage = PANELS.with_borrow_mut(std::mem::take);
    // SAFETY: the caller vouches for the CPU.
    let panels = unsafe { pack_activations(x, m, w.k, w.kp, norm, &mut storage) };
    // SAFETY: as the caller promises.
    unsafe { on_panels(order, m, w, panels, tiles, finish, out) };
    PANELS.with_borrow_mut(|kept| *kept = storage);
}

/// [`gemm_bf16`] from activations already rounded and laid out as panels ([`pack_activations`]'s
/// layout, `m` rows of `w.kp` inputs).
///
/// # Safety
/// As [`gemm_bf16`].
pub(crate) unsafe fn on_panels(
    order: Order,
    m: usize,
    w: &PackedWeight,
    panels: &[u16],
    tiles: &[u16],
    finish: Finish,
    out: SharedOut,
) {
    // SAFETY (both closures): the caller vouches for the CPU and the permission; the tiles are
    // configured while a block holds its `TilesBorrowed`.
    let borrow_tiles = || unsafe { TilesBorrowed::new(&amx::CONFIG) };
    let tile = |call: TileCall| unsafe { on_tiles(call) };
    by_tiles(order, m, w.n, w.kp, panels, tiles, finish, out, borrow_tiles, tile);
}

/// One [`TileCall`] on the AMX tiles.
///
/// # Safety
/// As [`gemm_bf16`], with [`amx::CONFIG`] loaded on this thread (a [`TilesBorrowed`] held); the
/// call's pointers hold what [`amx::tile_from`] reads and writes.
pub(crate) unsafe fn on_tiles(call: TileCall) {
    let TileCall { x, w, inputs, out, ldo, rows, start } = call;
    match rows <= HALF {
        // SAFETY: as the caller promises.
        true => unsafe { amx::tile_16_rows_from(start, x, w, inputs, out, ldo) },
        false => unsafe { amx::tile_from(start, x, w, inputs, out, ldo) },
    }
}

/// One product of 32 activation rows by 32 weight columns: `inputs` inputs from the tiles at `x`
/// and `w`, into 32 rows of 32 sums `ldo` apart at `out` (at least the first `rows` of them
/// written), the sums starting as `start` says.
#[derive(Clone, Copy)]
pub(crate) struct TileCall<'a> {
    pub(crate) x: *const u16,
    pub(crate) w: *const u16,
    pub(crate) inputs: usize,
    pub(crate) out: *mut f32,
    pub(crate) ldo: usize,
    pub(crate) rows: usize,
    pub(crate) start: Start<'a>,
}

/// A group's bias, padded to 32 columns, for [`Start::From`].
#[repr(C, align(64))]
pub(crate) struct BiasRow(pub(crate) [f32; COLS]);

impl BiasRow {
    pub(crate) fn new(bias: &[f32]) -> BiasRow {
        let mut row = BiasRow([0.0; COLS]);
        row.0[..bias.len()].copy_from_slice(bias);
        row
    }
}

/// Values in one call's block of starting sums (its rows of a residual, plus the bias).
const START_LEN: usize = amx::ROWS * COLS;

/// How a product's work is split between the threads: which operand each thread keeps in its
/// L2 while the other streams through it from L3 or memory.
///
/// Tile loads that miss L2 are slow: a stand-alone loop on this Xeon ran a step (four products,
/// 4 KiB of tiles) in 20 ns from L1, 27-40 from L2 and 108-143 from L3 or memory (~29 GB/s a
/// core), so the order is the one that brings the fewest bytes into L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Blocks of weight columns (at most [`MAX_BLOCK_COLS`]) kept in L2, every panel of
    /// activations passing over each: right for few rows, where the activations are small.
    Columns,
    /// This many blocks of activation rows (multiples of 16, at most [`ROW_BLOCK_BYTES`] of
    /// panels) kept in L2, every group of weight columns passing over each: for prefill, where
    /// the column order brought all the activations back from L3 for every block of columns
    /// (a vision-tower product of 729 rows: 36 blocks of 1.7 MB against 8 MB of weights once
    /// per thread; 1.06-1.16x faster on the 0.5b's and 7b's prefill products where chosen,
    /// measured interleaved).
    Rows(usize),
}

/// Bytes of activation panels one row block keeps in L2: half of a 2 MiB L2, the rest for the
/// group of weights passing through (73 KiB at 1,152 inputs) and the outputs being written.
const ROW_BLOCK_BYTES: usize = 1 << 20;

impl Order {
    /// The order that reads the fewest bytes from beyond L2 over the threads, counted in rows
    /// of `kp` inputs: rows read the activations once and every weight column once per row
    /// block; columns read the weights once and the activations once per column block (once
    /// in all when they are small enough to stay in L2 themselves). Weights too large to stay
    /// in L3 are read once per thread at most: the 7b's 180 MB gate and up projections read
    /// twice per thread (512 rows) ran at 0.8x the column order.
    pub(crate) fn for_product(m: usize, n: usize, kp: usize) -> Order {
        let threads = rayon::current_num_threads();
        let row_blocks = row_block_count(m, kp, threads);
        let column_blocks = if m * kp * 2 <= ROW_BLOCK_BYTES / 2 { 1 } else { column_blocks(n).count };
        let rereads_large_weights = row_blocks > threads && n * kp * 2 > REREAD_WEIGHT_BYTES;
        match m + n * row_blocks < n + m * column_blocks && !rereads_large_weights {
            true => Order::Rows(row_blocks),
            false => Order::Columns,
        }
    }
}

/// Weights past which the row order reads them once per thread at most (the 7b's 34 MB
/// output projection read twice per thread still ran 1.1x faster than in the column order).
const REREAD_WEIGHT_BYTES: usize = 48 << 20;

/// Row blocks for `m` rows of `kp` inputs on `threads` threads: a multiple of the threads (one
/// block each, or more where a thread's rows would not stay in L2), each a run of whole tiles
/// (16 rows).
fn row_block_count(m: usize, kp: usize, threads: usize) -> usize {
    let (tiles, tiles_kept) = (m.div_ceil(HALF), (ROW_BLOCK_BYTES / (kp * 2 * HALF)).max(1));
    tiles.div_ceil(tiles_kept).div_ceil(threads) * threads
}

/// Rows of one AMX tile, half a panel: the unit row blocks are made of.
pub(crate) const HALF: usize = 16;

/// The loop nest, in `order`: each block multiplied 32 columns and up to 32 rows at a time
/// through `tile` (the AMX tile, or a model of it in tests), in one pass or, for long inputs in
/// the column order, in chunks; `enter()`'s result is held while a thread works on a block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn by_tiles<T>(
    order: Order,
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
    if let Order::Rows(blocks) = order {
        by_row_blocks(blocks, m, n.div_ceil(COLS), enter, |first, end, g, storage| {
            RowBlock { n, kp, first, end, finish, out }.group(g, panels, tiles, storage, &tile)
        });
        return;
    }
    let panel_len = group_len(kp);
    let blocks = column_blocks(n);
    (0..blocks.count).into_par_iter().for_each(|b| {
        let std::ops::Range { start: j0, end: j1 } = blocks.rows(b);
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

/// The row order's schedule: `work(first, end, g, storage)` for group `g` (of `groups`, 32
/// columns each) over rows `first..end` of each of `blocks` row blocks over `m` rows, `storage`
/// the thread's block buffer, with `enter()`'s result held meanwhile. Each block's next group is
/// claimed by whoever works on the block: a thread starts on its own block and then helps with
/// the others' groups left, so one woken late (prefill products come far apart) does not leave
/// the other waiting for it.
pub(crate) fn by_row_blocks<T>(
    blocks: usize,
    m: usize,
    groups: usize,
    enter: impl Fn() -> T + Sync,
    work: impl Fn(usize, usize, usize, &mut Vec<f32>) + Sync,
) {
    let next_group: Vec<AtomicUsize> = (0..blocks).map(|_| AtomicUsize::new(0)).collect();
    (0..blocks).into_par_iter().for_each(|own| {
        BLOCK_SUMS.with_borrow_mut(|storage| {
            let _entered = enter();
            for b in (own..blocks).chain(0..own) {
                let (first, end) = row_block_rows(b, blocks, m);
                loop {
                    let g = next_group[b].fetch_add(1, Ordering::Relaxed);
                    if g >= groups {
                        break;
                    }
                    work(first, end, g, storage);
                }
            }
        })
    });
}

/// Rows `first..end` of row block `b` of `blocks` over `m` rows: runs of whole tiles (16 rows),
/// the blocks' sizes differing by one tile at most.
fn row_block_rows(b: usize, blocks: usize, m: usize) -> (usize, usize) {
    let tiles_in_all = m.div_ceil(HALF);
    (b * tiles_in_all / blocks * HALF, ((b + 1) * tiles_in_all / blocks * HALF).min(m))
}

/// One tile call of a row block: `rows` rows from `row`, in `panel`, starting on its second
/// activation tile (its 17th row) or not.
pub(crate) struct RowCall {
    pub(crate) row: usize,
    pub(crate) rows: usize,
    pub(crate) panel: usize,
    pub(crate) second_half: bool,
}

/// The tile calls over rows `first..end` (`first` a multiple of 16): from a panel's first row,
/// both tiles (up to 32 rows); from its 17th, the second alone (up to 16).
pub(crate) fn row_calls(first: usize, end: usize) -> impl Iterator<Item = RowCall> {
    let mut row = first;
    std::iter::from_fn(move || {
        if row >= end {
            return None;
        }
        let (panel, second_half) = (row / amx::ROWS, row % amx::ROWS == HALF);
        let call = RowCall { row, rows: end.min((panel + 1) * amx::ROWS) - row, panel, second_half };
        row += call.rows;
        Some(call)
    })
}

/// One parallel block in the row order: output rows `first..end` (`first` a multiple of 16),
/// every column.
struct RowBlock<'a> {
    n: usize,
    kp: usize,
    first: usize,
    end: usize,
    finish: Finish<'a>,
    out: SharedOut,
}

impl RowBlock<'_> {
    /// Group `g` of 32 weight columns over every panel of the block: the panels stay in L2 from
    /// group to group, a group comes from beyond it once. A block may start or end halfway
    /// through a panel; those halves run on one activation tile.
    fn group(&self, g: usize, panels: &[u16], tiles: &[u16], storage: &mut Vec<f32>, tile: &impl Fn(TileCall)) {
        let (n, panel_len) = (self.n, group_len(self.kp));
        // Every tile call writes the sums, and every residual start its block, before they are read.
        let (sums, starts) = reused_aligned(storage, amx::ROWS * COLS + START_LEN).split_at_mut(amx::ROWS * COLS);
        let ws = &tiles[g * panel_len..][..panel_len];
        let (j0, width) = (g * COLS, COLS.min(n - g * COLS));
        let bias = self.finish.bias.map(|b| BiasRow::new(&b[j0..j0 + width]));
        for RowCall { row, rows, panel, second_half } in row_calls(self.first, self.end) {
            let x = panels[panel * panel_len + usize::from(second_half) * amx::TILE..].as_ptr();
            // Straight into the output when the call's rows and columns are all there.
            let direct = (rows == amx::ROWS || rows == HALF) && width == COLS;
            let (to, ldo) = match direct {
                // SAFETY: rows row..row + rows < m, columns j0..j0 + 32 <= n.
                true => (unsafe { self.out.0.add(row * n + j0) }, n),
                false => (sums.as_mut_ptr(), COLS),
            };
            let start = self.finish.start(&bias, row, rows, j0, width, n, starts);
            tile(TileCall { x, w: ws.as_ptr(), inputs: self.kp, out: to, ldo, rows, start });
            if !direct {
                for r in 0..rows {
                    // SAFETY: inside `out`, and only this block writes its rows and these columns.
                    unsafe { self.out.write_row((row + r) * n + j0, &sums[r * COLS..][..width]) };
                }
            }
            // SAFETY: as above; the rows' columns in the group are written.
            unsafe { self.finish.apply(self.out.0.add(row * n + j0), rows, width, n) };
        }
    }
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

/// On the tiles, the bias, and the residual where there is one, start the sums (see
/// [`Start::From`]); the activation follows them.
impl Finish<'_> {
    /// Where the sums of output rows `row..row + rows`, columns `j0..j0 + width` (of `n`),
    /// start: `bias` is those columns' bias; `starts` ([`START_LEN`] values) holds the starting
    /// rows when there is a residual (rows past `rows` and columns past `width` zero).
    #[allow(clippy::too_many_arguments)]
    fn start<'s>(
        &'s self,
        bias: &'s Option<BiasRow>,
        row: usize,
        rows: usize,
        j0: usize,
        width: usize,
        n: usize,
        starts: &'s mut [f32],
    ) -> Start<'s> {
        let Some(residual) = self.residual else {
            return bias.as_ref().map_or(Start::Zero, |b| Start::from(&b.0, 0));
        };
        if bias.is_none() && (rows == amx::ROWS || rows == HALF) && width == COLS {
            // The tiles load the residual's rows where they lie (every row they read is there).
            return Start::from(&residual[row * n + j0..], n);
        }
        // SAFETY: AVX-512F (the caller runs AMX tiles); rows row..row + rows, columns j0..j0 +
        // width lie inside the residual.
        unsafe {
            x86::residual_and_bias(
                residual[row * n + j0..].as_ptr(),
                n,
                rows,
                width,
                bias.as_ref().map(|b| &b.0),
                starts,
            )
        };
        Start::from(starts, COLS)
    }

    /// The activation on `rows` rows of `width` values (the block's columns), `ldo` apart from
    /// `at`.
    ///
    /// # Safety
    /// `at` points to `rows` rows of `width` written values `ldo` apart, which only this
    /// thread accesses.
    unsafe fn apply(&self, at: *mut f32, rows: usize, width: usize, ldo: usize) {
        if self.activation == Activation::GeluTanh {
            // SAFETY: as the caller promises.
            unsafe { crate::activations::gelu_tanh_rows_here(at, rows, width, ldo) };
        }
    }
}

impl Block<'_> {
    /// The block's group `g`'s bias (`None` without a bias), made on the stack for each call:
    /// a vector of them per block, allocated and freed 1,584 times in the output head's product,
    /// made decode steps 7% slower.
    fn group_bias(&self, g: usize) -> Option<BiasRow> {
        self.finish.bias.map(|b| BiasRow::new(&b[g * COLS..][..self.group_width(g)]))
    }

    /// The columns of the block's group `g`.
    fn group_width(&self, g: usize) -> usize {
        COLS.min(self.width - g * COLS)
    }

    /// Every panel over all the inputs at once.
    fn in_one_pass(&self, panels: &[u16], storage: &mut Vec<f32>, tile: &impl Fn(TileCall)) {
        let (n, j0, ldo, panel_len) = (self.n, self.j0, self.ldo, group_len(self.kp));
        // Every tile call writes its 32 x 32 sums, and every residual start its block, before
        // they are read.
        let (sums, starts) = reused_aligned(storage, amx::ROWS * ldo + START_LEN).split_at_mut(amx::ROWS * ldo);
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
                // (Bound here: the tiles read the bias through `start`'s pointer.)
                let (bias, width) = (self.group_bias(g), self.group_width(g));
                let start = self.finish.start(&bias, first_row, rows, j0 + g * COLS, width, n, starts);
                tile(TileCall { x, w, inputs, out: to, ldo: stride, rows, start });
            }
            if !direct {
                for r in 0..rows {
                    // SAFETY: inside `out`, and only this block writes its columns.
                    unsafe { self.out.write_row((first_row + r) * n + j0, &sums[r * ldo..][..self.width]) };
                }
            }
            // SAFETY: as above; the rows' columns in the block are written.
            unsafe { self.finish.apply(self.out.0.add(first_row * n + j0), rows, self.width, n) };
        }
    }

    /// Chunk by chunk of [`CHUNK_INPUTS`] inputs over every panel, all panels' sums kept in the
    /// block's buffer between chunks (stored and loaded as they are, so the sums are those of
    /// one pass), then copied out.
    fn in_chunks(&self, panels: &[u16], storage: &mut Vec<f32>, tile: &impl Fn(TileCall)) {
        let (ldo, panel_len) = (self.ldo, group_len(self.kp));
        let all_sums = panels.len() / panel_len * amx::ROWS * ldo;
        let (sums, starts) = reused_aligned(storage, all_sums + START_LEN).split_at_mut(all_sums);
        for first in (0..self.kp).step_by(CHUNK_INPUTS) {
            let (inputs, at) = (CHUNK_INPUTS.min(self.kp - first), first / amx::STEP * STEP_UNITS);
            let panel_sums = sums.chunks_exact_mut(amx::ROWS * ldo);
            for (panel, (xs, panel_sums)) in panels.chunks_exact(panel_len).zip(panel_sums).enumerate() {
                let rows = amx::ROWS.min(self.m - panel * amx::ROWS);
                for (g, ws) in self.weights.chunks_exact(panel_len).enumerate() {
                    let (x, w) = (xs[at..].as_ptr(), ws[at..].as_ptr());
                    let to = panel_sums[g * COLS..].as_mut_ptr();
                    let (row, j, bias) = (panel * amx::ROWS, self.j0 + g * COLS, self.group_bias(g));
                    let start = match first {
                        0 => self.finish.start(&bias, row, rows, j, self.group_width(g), self.n, starts),
                        _ => Start::From(to, ldo, std::marker::PhantomData),
                    };
                    tile(TileCall { x, w, inputs, out: to, ldo, rows, start });
                }
            }
        }
        // SAFETY: the first m rows of the sums are written, and the buffer is this thread's.
        unsafe { self.finish.apply(sums.as_mut_ptr(), self.m, self.width, ldo) };
        for (r, row) in sums.chunks_exact(ldo).take(self.m).enumerate() {
            // SAFETY: inside `out`, and only this block writes its columns.
            unsafe { self.out.write_row(r * self.n + self.j0, &row[..self.width]) };
        }
    }
}

thread_local! {
    /// A block's sums, kept by each thread from block to block rather than allocated and zeroed
    /// for each (for long inputs, all panels' sums: 4.5 MB at 11,700 rows).
    static BLOCK_SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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

/// Parallel blocks of whole groups of 32 columns, none wider than [`MAX_BLOCK_COLS`].
fn column_blocks(n: usize) -> WeightBlocks {
    WeightBlocks::new(n, COLS, MAX_BLOCK_COLS)
}

mod x86 {
    use std::arch::x86_64::*;

    /// `rows` rows of `width` residual values `ld` apart from `at`, plus `bias` (32 values, zero
    /// past `width`) where there is one, as rows of 32 into `out` (zeros past `rows`, up to the
    /// 16 or 32 rows the tiles load, and past `width`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `at` holds `rows` rows of `width` values `ld` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn residual_and_bias(
        at: *const f32,
        ld: usize,
        rows: usize,
        width: usize,
        bias: Option<&[f32; 32]>,
        out: &mut [f32],
    ) {
        assert!(out.len() >= 32 * 32);
        let (lo, hi) = (lanes(width.min(16)), lanes(width.saturating_sub(16)));
        // The rows the tiles load: 16 for up to 16 rows, 32 otherwise.
        for r in 0..if rows <= 16 { 16 } else { 32 } {
            let (to, from) = (out.as_mut_ptr().add(r * 32), at.add(r * ld));
            let (a, b) = match r < rows {
                true => (_mm512_maskz_loadu_ps(lo, from), _mm512_maskz_loadu_ps(hi, from.add(16))),
                false => (_mm512_setzero_ps(), _mm512_setzero_ps()),
            };
            // (No bias, nothing added: the residual's values as they are, -0.0 included, as
            // where the tiles load them in place.)
            let (a, b) = match (bias, r < rows) {
                (Some(bias), true) => (
                    _mm512_add_ps(a, _mm512_loadu_ps(bias.as_ptr())),
                    _mm512_add_ps(b, _mm512_loadu_ps(bias.as_ptr().add(16))),
                ),
                _ => (a, b),
            };
            _mm512_storeu_ps(to, a);
            _mm512_storeu_ps(to.add(16), b);
        }
    }

    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count) - 1) as __mmask16
    }
}

#[cfg(test)]
#[path = "gemm_amx_tests.rs"]
mod tests;
#[cfg(test)]
pub(crate) use tests::model_tile;
