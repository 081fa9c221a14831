//! Portable tiles: plain loops, used where no vector path applies or when forced.

use crate::shared::Tile;

/// `acc[r][c] = x_r . w_c` for `mr` rows of `x` (each `kp` long) and `nr` weight rows, where
/// `weight(c, p)` is element `p` of weight row `c` as f32.
pub(crate) fn tile(x: &[f32], mr: usize, nr: usize, kp: usize, acc: &mut Tile, weight: impl Fn(usize, usize) -> f32) {
    for r in 0..mr {
        let xr = &x[r * kp..(r + 1) * kp];
        for (c, out) in acc[r].iter_mut().enumerate().take(nr) {
            *out = xr.iter().enumerate().map(|(p, &a)| a * weight(c, p)).sum();
        }
    }
}
