//! Weight matrices in the layout the kernels read: `[n, k]` rows (one per output), each padded
//! with zeros to a multiple of [`K_ALIGN`] so the inner loops never handle a ragged tail, in
//! f32, bf16 or 8-bit blocks.

#[cfg(target_arch = "x86_64")]
use crate::amx;
use crate::Isa;
use half::bf16;
use rayon::prelude::*;

/// Row length granularity: one AVX-512 register of bf16 pairs.
pub const K_ALIGN: usize = 32;

/// Weights per scale in [`WeightFormat::Q8`] (as in ggml's q8_0).
pub const Q8_BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    /// Brain float: the top 16 bits of an f32 (rounded to nearest even when converted).
    Bf16,
    /// 8-bit integers with one f32 scale per block of 32 along each row (ggml's q8_0 layout,
    /// with an f32 rather than f16 scale): 9 bits per weight.
    Q8,
}

#[derive(Debug, Clone)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// The same bf16 values as AMX tiles, for [`Isa::Amx`] (see [`crate::gemm_amx`]).
    Bf16Tiles(Bf16Tiles),
    /// Row-major values and `[n, kp / Q8_BLOCK]` scales.
    Q8 {
        values: Vec<i8>,
        scales: Vec<f32>,
    },
    /// The same 8-bit blocks interleaved for AVX-512 VNNI (see [`crate::vnni`]).
    Q8Panels(Q8Panels),
}

/// A linear layer's weight, `n` outputs by `k` inputs, ready for [`crate::matmul`].
#[derive(Debug, Clone)]
pub struct PackedWeight {
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// Padded row length.
    pub(crate) kp: usize,
    pub(crate) storage: Storage,
}

impl PackedWeight {
    /// Packs row-major `[n, k]` f32 values in `format`, laid out for [`Isa::active`].
    pub fn from_f32(values: &[f32], n: usize, k: usize, format: WeightFormat) -> PackedWeight {
        PackedWeight::from_f32_for(Isa::active(), values, n, k, format)
    }

    /// As [`PackedWeight::from_f32`], laid out for `isa`'s kernels: 8-bit weights are interleaved
    /// in panels on AVX-512 (VNNI), row-major elsewhere. A weight packed for one set and
    /// multiplied on a lower one still gives the right product, on the scalar path.
    pub fn from_f32_for(isa: Isa, values: &[f32], n: usize, k: usize, format: WeightFormat) -> PackedWeight {
        assert_eq!(values.len(), n * k, "weight of {n}x{k} needs {} values", n * k);
        let kp = k.div_ceil(K_ALIGN) * K_ALIGN;
        let storage = match format {
            WeightFormat::F32 => Storage::F32(pad_rows(values, n, k, kp, 0.0, |v| v)),
            WeightFormat::Bf16 => bf16_storage(isa, bf16_rows(values, n, k, kp), n, kp),
            WeightFormat::Q8 => {
                let (values, scales) = quantize_q8(&pad_rows(values, n, k, kp, 0.0, |v| v));
                if isa >= Isa::Avx512Bf16 {
                    Storage::Q8Panels(Q8Panels::from_rows(&values, &scales, n, kp))
                } else {
                    Storage::Q8 { values, scales }
                }
            }
        };
        PackedWeight { n, k, kp, storage }
    }

    /// Packs row-major `[n, k]` bf16 bit patterns as they are (no rounding), laid out for
    /// [`Isa::active`].
    pub fn from_bf16_bits(bits: &[u16], n: usize, k: usize) -> PackedWeight {
        assert_eq!(bits.len(), n * k, "weight of {n}x{k} needs {} values", n * k);
        let kp = k.div_ceil(K_ALIGN) * K_ALIGN;
        PackedWeight { n, k, kp, storage: bf16_storage(Isa::active(), pad_rows(bits, n, k, kp, 0, |v| v), n, kp) }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn format(&self) -> WeightFormat {
        match self.storage {
            Storage::F32(_) => WeightFormat::F32,
            Storage::Bf16(_) | Storage::Bf16Tiles(_) => WeightFormat::Bf16,
            Storage::Q8 { .. } | Storage::Q8Panels(_) => WeightFormat::Q8,
        }
    }

    /// Bytes held, padding included.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => v.len() * 4,
            Storage::Bf16(v) => v.len() * 2,
            Storage::Bf16Tiles(tiles) => tiles.tiles().len() * 2,
            Storage::Q8 { values, scales } => values.len() + scales.len() * 4,
            Storage::Q8Panels(panels) => panels.bytes(),
        }
    }

    /// Element `(row, col)` as the kernels see it (after rounding or quantization).
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let i = row * self.kp + col;
        match &self.storage {
            Storage::F32(v) => v[i],
            Storage::Bf16(v) => bf16::from_bits(v[i]).to_f32(),
            Storage::Bf16Tiles(tiles) => bf16::from_bits(tiles.get(row, col, self.kp)).to_f32(),
            Storage::Q8 { values, scales } => values[i] as f32 * scales[i / Q8_BLOCK],
            Storage::Q8Panels(panels) => panels.get(row, col, self.kp),
        }
    }
}

/// bf16 rows (padded to `kp`) as `isa`'s kernels read them: AMX tiles on [`Isa::Amx`], rows
/// elsewhere.
fn bf16_storage(isa: Isa, rows: Vec<u16>, n: usize, kp: usize) -> Storage {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx {
        return Storage::Bf16Tiles(Bf16Tiles::from_rows(&rows, n, kp));
    }
    let _ = (isa, n, kp);
    Storage::Bf16(rows)
}

/// bf16 weights as [`crate::gemm_amx`] multiplies them: groups of 32 columns (the last padded
/// with zeros), each `kp / 32` steps of two 1 KiB tiles (columns 0-15, 16-31) whose row `q`
/// holds every column's pair of inputs `2q, 2q + 1`; starting on a cache line, as tile loads
/// want.
#[derive(Debug, Clone)]
pub(crate) struct Bf16Tiles {
    storage: Vec<u16>,
    skip: usize,
    len: usize,
}

impl Bf16Tiles {
    /// Tiles of the bf16 rows `rows` (`n` rows of `kp`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn from_rows(rows: &[u16], n: usize, kp: usize) -> Bf16Tiles {
        Bf16Tiles::written(n.div_ceil(COLS) * group_len(kp), |tiles| {
            tiles.par_chunks_mut(group_len(kp)).enumerate().for_each(|(g, group)| {
                // SAFETY: this layout is made for Isa::Amx only, whose CPUs have AVX-512F.
                unsafe { pack_group(rows, n, kp, g, group) }
            })
        })
    }

    /// As [`Bf16Tiles::from_rows`], on the calling thread and in `storage` (see
    /// [`Bf16Tiles::written_in`]): for attention's keys, packed a head at a time by threads that
    /// each take whole heads.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn from_rows_here(rows: &[u16], n: usize, kp: usize, storage: Vec<u16>) -> Bf16Tiles {
        Bf16Tiles::written_in(storage, n.div_ceil(COLS) * group_len(kp), |tiles| {
            for (g, group) in tiles.chunks_exact_mut(group_len(kp)).enumerate() {
                // SAFETY: as above.
                unsafe { pack_group(rows, n, kp, g, group) }
            }
        })
    }

    /// `len` units starting on a cache line, zeroed, then laid out by `write`.
    pub(crate) fn written(len: usize, write: impl FnOnce(&mut [u16])) -> Bf16Tiles {
        Bf16Tiles::written_in(Vec::new(), len, |tiles| {
            tiles.fill(0);
            write(tiles)
        })
    }

    /// `len` units starting on a cache line in `storage` (grown when too short, otherwise as a
    /// last user left them), laid out by `write`, which writes every unit: attention packs
    /// each head's keys and values into the buffers of the last head the thread packed
    /// (zeroing fresh ones for every head had been 1.4% of a one-image first token).
    pub(crate) fn written_in(mut storage: Vec<u16>, len: usize, write: impl FnOnce(&mut [u16])) -> Bf16Tiles {
        let tiles = crate::shared::reused_aligned(&mut storage, len);
        write(tiles);
        let start = tiles.as_ptr() as usize;
        let skip = (start - storage.as_ptr() as usize) / 2;
        Bf16Tiles { storage, skip, len }
    }

    /// The buffer the tiles lie in, for [`Bf16Tiles::written_in`] to reuse (no tiles left).
    pub(crate) fn take_storage(&mut self) -> Vec<u16> {
        self.len = 0;
        std::mem::take(&mut self.storage)
    }

    pub(crate) fn tiles(&self) -> &[u16] {
        &self.storage[self.skip..self.skip + self.len]
    }

    /// The bits of element `(row, col)`.
    fn get(&self, row: usize, col: usize, kp: usize) -> u16 {
        let (group, c, step, i) = (row / 32, row % 32, col / 32, col % 32);
        let tile = (group * (kp / 32) + step) * 2 + c / 16;
        self.tiles()[tile * 512 + (i / 2) * 32 + (c % 16) * 2 + i % 2]
    }
}

fn pad_rows<S: Copy, T: Copy>(
    values: &[S],
    n: usize,
    k: usize,
    kp: usize,
    zero: T,
    convert: impl Fn(S) -> T,
) -> Vec<T> {
    let mut out = vec![zero; n * kp];
    for (dst, src) in out.chunks_exact_mut(kp).zip(values.chunks_exact(k.max(1))) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = convert(s);
        }
    }
    out
}

/// Rows of f32 values rounded to bf16 bits (to nearest, ties to even) and padded to `kp`: 32
/// at a time on AVX-512 BF16 (the vision tower packs its keys and values this way for every
/// head of every layer), one by one elsewhere.
fn bf16_rows(values: &[f32], n: usize, k: usize, kp: usize) -> Vec<u16> {
    let mut out = vec![0u16; n * kp];
    #[cfg(target_arch = "x86_64")]
    let vectorized = crate::Isa::detected() >= crate::Isa::Avx512Bf16;
    for (dst, src) in out.chunks_exact_mut(kp).zip(values.chunks_exact(k.max(1))) {
        #[cfg(target_arch = "x86_64")]
        if vectorized {
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16; `dst` (kp) is as long as `src` (k).
            unsafe { crate::shared::round_to_bf16(src, dst) };
            continue;
        }
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(s).to_bits();
        }
    }
    out
}

/// Symmetric 8-bit quantization of padded rows, one scale per block of [`Q8_BLOCK`]: the block's
/// largest magnitude maps to 127.
/// Blocks in parallel: quantizing a 7b checkpoint one block at a time took most of its load.
fn quantize_q8(padded: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut values = vec![0i8; padded.len()];
    let mut scales = vec![0.0f32; padded.len() / Q8_BLOCK];
    const BLOCKS_PER_TASK: usize = 1024;
    values
        .par_chunks_mut(Q8_BLOCK * BLOCKS_PER_TASK)
        .zip(scales.par_chunks_mut(BLOCKS_PER_TASK))
        .zip(padded.par_chunks(Q8_BLOCK * BLOCKS_PER_TASK))
        .for_each(|((values, scales), padded)| {
            for ((out, scale), block) in
                values.chunks_exact_mut(Q8_BLOCK).zip(scales).zip(padded.chunks_exact(Q8_BLOCK))
            {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                *scale = amax / 127.0;
                let inverse = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
                for (q, v) in out.iter_mut().zip(block) {
                    *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
                }
            }
        });
    (values, scales)
}

/// Weight rows per panel of [`Q8Panels`]: the 16 lanes of one vector of sums.
pub(crate) const PANEL: usize = 16;
/// Bytes of one block of one panel.
pub(crate) const Q8_PANEL_BLOCK_BYTES: usize = PANEL * Q8_BLOCK;

/// `[n, kp]` q8_0 weights in panels (see the module's comment).
#[derive(Debug, Clone)]
pub(crate) struct Q8Panels {
    /// Per panel, per block, per group of 4 inputs: 16 rows x 4 bytes, each weight plus 128.
    pub(crate) values: Vec<u8>,
    /// Per panel, per block: the 16 rows' scales (0 for the padding rows).
    pub(crate) scales: Vec<f32>,
}

impl Q8Panels {
    /// Interleaves row-major quantized rows (`values` `[n, kp]`, `scales` `[n, kp / 32]`).
    pub(crate) fn from_rows(values: &[i8], scales: &[f32], n: usize, kp: usize) -> Q8Panels {
        let blocks = kp / Q8_BLOCK;
        let panels = n.div_ceil(PANEL);
        let mut out = Q8Panels {
            values: vec![128; panels * blocks * Q8_PANEL_BLOCK_BYTES],
            scales: vec![0.0; panels * blocks * PANEL],
        };
        let panel_values = out.values.par_chunks_mut(blocks * Q8_PANEL_BLOCK_BYTES);
        panel_values.zip(out.scales.par_chunks_mut(blocks * PANEL)).enumerate().for_each(|(p, (dst, dst_scales))| {
            for (r, row) in (p * PANEL..n.min((p + 1) * PANEL)).enumerate() {
                for b in 0..blocks {
                    let base = b * Q8_PANEL_BLOCK_BYTES;
                    for (i, &v) in values[row * kp + b * Q8_BLOCK..][..Q8_BLOCK].iter().enumerate() {
                        dst[base + i / 4 * 64 + r * 4 + i % 4] = (v as i16 + 128) as u8;
                    }
                    dst_scales[b * PANEL + r] = scales[row * blocks + b];
                }
            }
        });
        out
    }

    /// Weight `(row, col)` as the kernel sees it.
    pub(crate) fn get(&self, row: usize, col: usize, kp: usize) -> f32 {
        let blocks = kp / Q8_BLOCK;
        let (p, r, b, i) = (row / PANEL, row % PANEL, col / Q8_BLOCK, col % Q8_BLOCK);
        let v = self.values[(p * blocks + b) * Q8_PANEL_BLOCK_BYTES + i / 4 * 64 + r * 4 + i % 4] as i32 - 128;
        v as f32 * self.scales[(p * blocks + b) * PANEL + r]
    }

    pub(crate) fn bytes(&self) -> usize {
        self.values.len() + self.scales.len() * 4
    }
}

/// Weight columns per group of AMX tiles (one tile call).
#[cfg(target_arch = "x86_64")]
pub(crate) const COLS: usize = amx::COLS;
/// u16 units of one step (two tiles) of a panel or a group of columns.
#[cfg(target_arch = "x86_64")]
pub(crate) const STEP_UNITS: usize = 2 * amx::TILE;

/// u16 units of one group of 32 columns (or one panel of 32 rows) over `kp` inputs.
#[cfg(target_arch = "x86_64")]
pub(crate) fn group_len(kp: usize) -> usize {
    kp / amx::STEP * STEP_UNITS
}

#[cfg(target_arch = "x86_64")]
/// Group `g` of the bf16 rows `bits` (`n` rows of `kp`), 32 columns, into `group` (of
/// [`group_len`]): `kp / 32` steps of two tiles (columns 0-15, 16-31), tile row `q` holding
/// each column's pair of inputs `2q, 2q + 1` as one 32-bit unit; columns past `n` are zeros.
///
/// # Safety
/// The CPU has AVX-512F.
unsafe fn pack_group(bits: &[u16], n: usize, kp: usize, g: usize, group: &mut [u16]) {
    let zeros = [0u16; amx::STEP];
    for (t, tile) in group.chunks_exact_mut(amx::TILE).enumerate() {
        let (s, half) = (t / 2, t % 2);
        let first = g * COLS + half * 16;
        // Each column's 16 pairs of this step, as 16 source rows of 64 bytes.
        let rows: [*const u16; 16] = std::array::from_fn(|c| match first + c {
            j if j < n => bits[j * kp + s * amx::STEP..].as_ptr(),
            _ => zeros.as_ptr(),
        });
        // SAFETY: the caller vouches for AVX-512F; each row holds 64 bytes, the tile 1 KiB.
        unsafe { x86::transpose_16x16(&rows, tile.as_mut_ptr() as *mut u32) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Writes the 16x16 matrix of 32-bit units whose row `i` is at `rows[i]` transposed to
    /// `out` (row `j` at `out + 16 j`): unpacks of units and pairs within each 128-bit lane,
    /// then two rounds of lane shuffles.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every `rows[i]` holds 64 bytes and `out` 1 KiB.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_16x16(rows: &[*const u16; 16], out: *mut u32) {
        let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(rows[i] as *const __m512i));
        // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved, units 0-1 and 2-3 of each lane.
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // u[4i + j]: unit 4L + j of rows 4i..4i + 3, in lane L.
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (base, j) = (i / 4 * 4, i % 4);
            let (a, b) = (t[base + j / 2], t[base + 2 + j / 2]);
            if j % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        for j in 0..4 {
            let even_lanes_lo = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
            let odd_lanes_lo = _mm512_shuffle_i32x4::<0xDD>(u[j], u[4 + j]);
            let even_lanes_hi = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
            let odd_lanes_hi = _mm512_shuffle_i32x4::<0xDD>(u[8 + j], u[12 + j]);
            let lane = |l: usize| out.add((4 * l + j) * 16) as *mut __m512i;
            _mm512_storeu_si512(lane(0), _mm512_shuffle_i32x4::<0x88>(even_lanes_lo, even_lanes_hi));
            _mm512_storeu_si512(lane(2), _mm512_shuffle_i32x4::<0xDD>(even_lanes_lo, even_lanes_hi));
            _mm512_storeu_si512(lane(1), _mm512_shuffle_i32x4::<0x88>(odd_lanes_lo, odd_lanes_hi));
            _mm512_storeu_si512(lane(3), _mm512_shuffle_i32x4::<0xDD>(odd_lanes_lo, odd_lanes_hi));
        }
    }
}

#[cfg(test)]
mod bf16_rounding_tests {
    use super::*;

    /// The vectorized rounding (AVX-512 BF16, where present) gives exactly `half`'s
    /// round-to-nearest-even on normal values, ties included.
    #[test]
    fn bf16_packing_rounds_to_nearest_even() {
        let mut values: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0).collect();
        // Exact ties between two bf16 values, both ways, and the largest normals.
        values.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -(1.0 + 1.0 / 256.0), f32::MAX, f32::MIN_POSITIVE]);
        let k = values.len();
        let packed = PackedWeight::from_f32(&values, 1, k, WeightFormat::Bf16);
        for (p, &v) in values.iter().enumerate() {
            assert_eq!(packed.get(0, p).to_bits(), bf16::from_f32(v).to_f32().to_bits(), "{v}");
        }
    }
}
