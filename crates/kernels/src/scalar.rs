//! Portable tiles: plain loops, used where no vector path applies or when forced.

use crate::matmul::Tile;

/// `acc[r][c] = x_r . w_c` for `mr` rows of `x` and `nr` rows of `w`, each `kp` long.
pub(crate) fn tile<W: Copy>(
    x: &[f32],
    mr: usize,
    w: &[W],
    nr: usize,
    kp: usize,
    acc: &mut Tile,
    to_f32: impl Fn(W) -> f32,
) {
    for r in 0..mr {
        let xr = &x[r * kp..(r + 1) * kp];
        for c in 0..nr {
            let wc = &w[c * kp..(c + 1) * kp];
            acc[r][c] = xr.iter().zip(wc).map(|(&a, &b)| a * to_f32(b)).sum();
        }
    }
}
