//! Weight matrices in the layout the kernels read: `[n, k]` rows (one per output), each padded
//! with zeros to a multiple of [`K_ALIGN`] so the inner loops never handle a ragged tail.

use half::bf16;

/// Row length granularity: one AVX-512 register of bf16 pairs.
pub const K_ALIGN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    /// Brain float: the top 16 bits of an f32 (rounded to nearest even when converted).
    Bf16,
}

#[derive(Debug, Clone)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
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
    /// Packs row-major `[n, k]` f32 values in `format`.
    pub fn from_f32(values: &[f32], n: usize, k: usize, format: WeightFormat) -> PackedWeight {
        assert_eq!(values.len(), n * k, "weight of {n}x{k} needs {} values", n * k);
        let kp = k.div_ceil(K_ALIGN) * K_ALIGN;
        let storage = match format {
            WeightFormat::F32 => Storage::F32(pad_rows(values, n, k, kp, 0.0, |v| v)),
            WeightFormat::Bf16 => Storage::Bf16(pad_rows(values, n, k, kp, 0, |v| bf16::from_f32(v).to_bits())),
        };
        PackedWeight { n, k, kp, storage }
    }

    /// Packs row-major `[n, k]` bf16 bit patterns as they are (no rounding).
    pub fn from_bf16_bits(bits: &[u16], n: usize, k: usize) -> PackedWeight {
        assert_eq!(bits.len(), n * k, "weight of {n}x{k} needs {} values", n * k);
        let kp = k.div_ceil(K_ALIGN) * K_ALIGN;
        PackedWeight { n, k, kp, storage: Storage::Bf16(pad_rows(bits, n, k, kp, 0, |v| v)) }
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
            Storage::Bf16(_) => WeightFormat::Bf16,
        }
    }

    /// Bytes held, padding included.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => v.len() * 4,
            Storage::Bf16(v) => v.len() * 2,
        }
    }
}

fn pad_rows<S: Copy, T: Copy>(values: &[S], n: usize, k: usize, kp: usize, zero: T, convert: impl Fn(S) -> T) -> Vec<T> {
    let mut out = vec![zero; n * kp];
    for (dst, src) in out.chunks_exact_mut(kp).zip(values.chunks_exact(k.max(1))) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = convert(s);
        }
    }
    out
}
