//! Activations as the AMX tiles read them ([`crate::gemm_amx`], [`crate::mlp_amx`],
//! [`crate::attention_amx`]): rounded to bf16 once, laid out in panels of 32 rows, each
//! `kp / 32` steps of two 1 KiB tiles (rows 0-15, 16-31) whose rows hold 32 inputs in order.

use crate::activations::Norm;
use crate::amx;
use crate::packed::{group_len, STEP_UNITS};
use crate::shared::reused_aligned;
use rayon::prelude::*;

thread_local! {
    /// The activations' panels of the last product this thread called (see
    /// [`crate::gemm_amx::gemm_bf16`]).
    pub(crate) static PANELS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x`, through `norm` where there is one, rounded to bf16 as panels of 32 rows: `kp / 32` steps of two tiles (rows 0-15, 16-31),
/// each tile row 32 inputs in order; zero-padded to `kp` inputs and whole panels. `storage` is
/// reused as it is: every value of the panels is written.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16.
pub(crate) unsafe fn pack_activations<'a>(
    x: &[f32],
    m: usize,
    k: usize,
    kp: usize,
    norm: Option<&Norm>,
    storage: &'a mut Vec<u16>,
) -> &'a [u16] {
    let panel_len = group_len(kp);
    let panels = reused_aligned(storage, m.div_ceil(amx::ROWS) * panel_len);
    if k == 0 {
        panels.fill(0);
        return panels;
    }
    panels.par_chunks_mut(panel_len).zip(x.par_chunks(k * amx::ROWS)).for_each(|(panel, rows)| {
        let count = rows.len() / k;
        // A normalised row goes from L1 to the panel: the norm's f32 output is never written
        // out and read back (3.4 MB each way per vision-tower norm at 729 rows).
        let mut normed = vec![0.0f32; if norm.is_some() { k } else { 0 }];
        for r in 0..amx::ROWS {
            let at = (r / 16) * amx::TILE + (r % 16) * amx::STEP;
            if r < count {
                let row = match norm {
                    Some(norm) => {
                        norm.row(&rows[r * k..][..k], &mut normed);
                        &normed
                    }
                    None => &rows[r * k..][..k],
                };
                // SAFETY: the caller vouches for the CPU; the panel holds kp / 32 steps from `at`.
                unsafe { x86::round_into_steps(row, 1.0, panel[at..].as_mut_ptr()) };
            } else {
                // Rows past the last: zeros (their sums are never stored, but stay finite).
                panel[at..].chunks_mut(STEP_UNITS).for_each(|step| step[..amx::STEP].fill(0));
            }
        }
    });
    panels
}

pub(crate) use x86::round_into_steps;

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
