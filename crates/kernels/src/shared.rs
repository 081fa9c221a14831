//! What the per-ISA kernels share, at the bottom of the crate (it imports no other module): the
//! register tile of the dot-product kernels and the macro that picks its instantiation, the
//! output pointer that parallel blocks share and how the GEMMs split weight rows into those
//! blocks, cache-line-aligned buffers, and rounding to bf16.

/// Largest register tile: rows of `x` by rows of `W`.
pub(crate) const MR_MAX: usize = 4;
pub(crate) const NR_MAX: usize = 4;

/// Dot products of one tile, `acc[r][c] = x_r . w_c`.
pub(crate) type Tile = [[f32; NR_MAX]; MR_MAX];

/// Maps a run-time tile shape onto the const-generic kernel instantiations.
macro_rules! dispatch_tile {
    ($kernel:ident, $mr:expr, $nr:expr, ($($arg:expr),*)) => {
        match ($mr, $nr) {
            (1, 1) => $kernel::<1, 1>($($arg),*), (1, 2) => $kernel::<1, 2>($($arg),*),
            (1, 3) => $kernel::<1, 3>($($arg),*), (1, 4) => $kernel::<1, 4>($($arg),*),
            (2, 1) => $kernel::<2, 1>($($arg),*), (2, 2) => $kernel::<2, 2>($($arg),*),
            (2, 3) => $kernel::<2, 3>($($arg),*), (2, 4) => $kernel::<2, 4>($($arg),*),
            (3, 1) => $kernel::<3, 1>($($arg),*), (3, 2) => $kernel::<3, 2>($($arg),*),
            (3, 3) => $kernel::<3, 3>($($arg),*), (3, 4) => $kernel::<3, 4>($($arg),*),
            (4, 1) => $kernel::<4, 1>($($arg),*), (4, 2) => $kernel::<4, 2>($($arg),*),
            (4, 3) => $kernel::<4, 3>($($arg),*), (4, 4) => $kernel::<4, 4>($($arg),*),
            (mr, nr) => unreachable!("no {mr}x{nr} tile"),
        }
    };
}
pub(crate) use dispatch_tile;

/// A GEMM's weight rows (the AMX GEMM's columns) in parallel blocks of whole groups (a register
/// tile's rows, or 32 tile columns): enough blocks that none is wider than `max_rows`, at least
/// two a thread, and a multiple of the threads where there are enough groups. Block `b` starts
/// at group `b * groups / count`, so sizes differ by one group at most and each thread's half
/// holds as many rows as the other's. Rounding every block up to whole groups instead left
/// 1,024 rows in 11 blocks of 96: six for one core and five for the other (43 groups of 12 a
/// core against 48 on the language model's `o_proj` and `down_proj`).
pub(crate) struct WeightBlocks {
    n: usize,
    group: usize,
    groups: usize,
    /// How many blocks (none where `n` is 0).
    pub(crate) count: usize,
}

impl WeightBlocks {
    pub(crate) fn new(n: usize, group: usize, max_rows: usize) -> Self {
        let threads = rayon::current_num_threads();
        let groups = n.div_ceil(group);
        let max_groups = (max_rows / group).max(1);
        let count = groups.div_ceil(max_groups).max(2 * threads).div_ceil(threads) * threads;
        WeightBlocks { n, group, groups, count: count.min(groups) }
    }

    /// Block `b`'s weight rows.
    pub(crate) fn rows(&self, b: usize) -> std::ops::Range<usize> {
        let first = |b: usize| (b * self.groups / self.count * self.group).min(self.n);
        first(b)..first(b + 1)
    }
}

/// The output pointer, shared by blocks that write disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the pointer is only written through `write` and `write_row`, whose callers promise
// that no two threads write the same value; the output outlives every block of a product
// (rayon's parallel loops return only when all blocks have finished).
unsafe impl Send for SharedOut {}
// SAFETY: as for Send: sharing the pointer lets blocks write disjoint parts of one output.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `index` is inside the output and no other thread writes it.
    pub(crate) unsafe fn write(self, index: usize, value: f32) {
        *self.0.add(index) = value;
    }

    /// # Safety
    /// `index..index + values.len()` is inside the output and no other thread writes it.
    pub(crate) unsafe fn write_row(self, index: usize, values: &[f32]) {
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(index), values.len());
    }
}

/// A zeroed buffer of `len` units starting on a cache line, inside `storage`: vector loads from
/// a 16-byte aligned allocation split every line they cross, which cost a quarter of the AVX2
/// GEMM's speed.
pub(crate) fn aligned<T: Copy + Default>(storage: &mut Vec<T>, len: usize) -> &mut [T] {
    let line = 64 / std::mem::size_of::<T>();
    *storage = vec![T::default(); len + line];
    let skip = storage.as_ptr().align_offset(64).min(line);
    &mut storage[skip..skip + len]
}

/// `len` units of `storage` from a cache line on, grown (zeroed) when too short and otherwise
/// holding whatever the last user left: for buffers written before they are read.
pub(crate) fn reused_aligned<T: Copy + Default>(storage: &mut Vec<T>, len: usize) -> &mut [T] {
    let line = 64 / std::mem::size_of::<T>();
    if storage.len() < len + line {
        *storage = vec![T::default(); len + line];
    }
    let skip = storage.as_ptr().align_offset(64).min(line);
    &mut storage[skip..skip + len]
}

/// `src` rounded to bf16 bits (to nearest, ties to even) in `dst`, 32 values at a time.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16; `dst` is at least as long as `src`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
    x86::round_row(src, dst)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `row` rounded to bf16 (to nearest, ties to even) into the start of `out`, 32 at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `out` is at least as long as `row`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(row: &[f32], out: &mut [u16]) {
        let whole = row.len() / 32 * 32;
        for p in (0..whole).step_by(32) {
            let lo = _mm512_loadu_ps(row.as_ptr().add(p));
            let hi = _mm512_loadu_ps(row.as_ptr().add(p + 16));
            let bits = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(p) as *mut __m512i, bits);
        }
        for p in whole..row.len() {
            out[p] = half::bf16::from_f32(row[p]).to_bits();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WeightBlocks;

    /// Every row in exactly one block, blocks start on whole groups and hold at most `max_rows`,
    /// and they differ by one group at most (the balance between threads that 1,024 rows lacked).
    #[test]
    fn weight_blocks_cover_every_row_once_in_even_blocks() {
        for (group, max_rows) in [(12, 96), (6, 96), (32, 96), (32, 128)] {
            for n in (0..700).chain([1000, 1024, 1152, 3072, 4304, 5632, 152000]) {
                let blocks = WeightBlocks::new(n, group, max_rows);
                let sizes: Vec<usize> = (0..blocks.count).map(|b| blocks.rows(b).len()).collect();
                let mut next = 0;
                for b in 0..blocks.count {
                    let rows = blocks.rows(b);
                    assert_eq!(rows.start, next, "n {n}: block {b} starts where the last ended");
                    assert!(rows.start.is_multiple_of(group) && rows.len() <= max_rows.max(group));
                    next = rows.end;
                }
                assert_eq!(next, n, "n {n}: the blocks cover every row");
                let (least, most) = (sizes.iter().min().copied(), sizes.iter().max().copied());
                if let (Some(least), Some(most)) = (least, most) {
                    // The last block may be short by a partial group as well.
                    assert!(most - least < 2 * group, "n {n}, group {group}: blocks of {sizes:?}");
                }
            }
        }
        assert_eq!(WeightBlocks::new(1024, 12, 96).count % rayon::current_num_threads(), 0);
    }
}
