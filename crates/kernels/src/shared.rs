//! What the per-ISA kernels share, at the bottom of the crate (it imports no other module): the
//! register tile of the dot-product kernels and the macro that picks its instantiation, the
//! output pointer that parallel blocks share, cache-line-aligned buffers, and rounding to bf16.

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
