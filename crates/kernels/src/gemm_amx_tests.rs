//! Tests of the AMX bf16 GEMM's loop nest, on a model of the tile and on the tile.

use super::*;
use crate::{Isa, WeightFormat};

/// The contract of [`amx::tile`] in plain code, read from the packed layouts: what the tests
/// run on CPUs without AMX (and Bochs' AMX emulation checks the tile against, `amx-check`).
pub(crate) fn model_tile(call: TileCall) {
    let TileCall { x: xs, w: ws, inputs: kp, out: sums, ldo, start, rows } = call;
    let widen = |bits: u16| f32::from_bits((bits as u32) << 16);
    // One activation tile (16 rows) for up to 16 rows, as `amx::tile_16_rows`.
    for r in 0..if rows <= 16 { 16 } else { amx::ROWS } {
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
            // SAFETY: as above, and 16 rows of 32 values for a broadcast start.
            let from = unsafe {
                match start {
                    Start::Zero => 0.0,
                    Start::From(at, ldo, _) => *at.add(r * ldo + c),
                }
            };
            unsafe { *sums.add(r * ldo + c) = from + sum };
        }
    }
}

/// The packed layouts and the loop nest (blocks, groups of 32 columns with the last one
/// padded, panels, bias) give the AVX-512 register tile's product, through the model of the
/// tile, and through the tile itself where the CPU has AMX; long inputs in chunks too. Both
/// orders, with row blocks that start and end halfway through panels, give the same bits.
#[test]
fn the_amx_gemm_matches_the_register_tile() {
    if Isa::detected() < Isa::Avx512Bf16 {
        println!("skipped: no AVX-512 BF16 here");
        return;
    }
    // The last one is past LONG_INPUTS: it runs in chunks, the last one shorter.
    let shapes =
        [(1, 64, 32), (33, 96, 70), (70, 896, 300), (32, 1152, 4304 / 8), (45, 40, 17), (40, 8200, 50), (100, 64, 64)];
    for (m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / n as f32).collect();
        let w = PackedWeight::from_f32_for(Isa::Avx512Bf16, &values, n, k, WeightFormat::Bf16);
        let crate::packed::Storage::Bf16(bits) = &w.storage else { unreachable!() };
        let packed_tiles = crate::packed::Bf16Tiles::from_rows(bits, n, w.kp);
        let tiles = packed_tiles.tiles();
        let mut want = vec![f32::NAN; m * n];
        // SAFETY: AVX-512 BF16 was detected; outputs of m x n.
        unsafe { crate::gemm512::gemm_bf16(&x, m, &w, bits, Some(&bias), SharedOut(want.as_mut_ptr())) };
        let close = |g: f32, e: f32| (g - e).abs() <= 1e-4 * (1.0 + e.abs());
        let orders = [Order::Columns, Order::Rows(1), Order::Rows(2), Order::Rows(3), Order::Rows(5)];
        let residual: Vec<f32> = (0..m * n).map(|i| ((i * 29 % 83) as f32 - 41.0) / 41.0).collect();
        let want_adding: Vec<f32> = want.iter().zip(&residual).map(|(w, r)| w + r).collect();
        for (residual, want) in [(None, &want), (Some(residual.as_slice()), &want_adding)] {
            let finish = Finish { bias: Some(&bias), activation: Activation::Identity, residual };
            let (mut first_model, mut first_amx): (Option<Vec<f32>>, Option<Vec<f32>>) = (None, None);
            for order in orders {
                let mut got = vec![f32::NAN; m * n];
                // SAFETY: AVX-512 BF16 was detected; outputs of m x n.
                unsafe {
                    let mut storage = Vec::new();
                    let panels = pack_activations(&x, m, k, w.kp, None, &mut storage);
                    let out = SharedOut(got.as_mut_ptr());
                    by_tiles(order, m, n, w.kp, panels, tiles, finish, out, || (), model_tile);
                }
                let case = format!("{m}x{k}x{n} {order:?}, residual {}", residual.is_some());
                for (i, (&g, &e)) in got.iter().zip(want).enumerate() {
                    assert!(close(g, e), "model tile {case} [{i}]: {g} vs {e}");
                }
                // (The model sums each chunk of long inputs apart, which the tile does not.)
                if k <= LONG_INPUTS {
                    let first = first_model.get_or_insert_with(|| got.clone());
                    assert!(got.iter().zip(first.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{case}");
                }
                if Isa::detected() == Isa::Amx {
                    got.fill(f32::NAN);
                    // SAFETY: AMX was detected.
                    unsafe { gemm_bf16(order, &x, m, None, &w, tiles, finish, SharedOut(got.as_mut_ptr())) };
                    for (i, (&g, &e)) in got.iter().zip(want).enumerate() {
                        assert!(close(g, e), "AMX tile {case} [{i}]: {g} vs {e}");
                    }
                    let first = first_amx.get_or_insert_with(|| got.clone());
                    assert!(got.iter().zip(first.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "AMX {case}");
                }
            }
        }
    }
}
