//! An MLP's two products on AMX tiles ([`crate::gemm_amx`]) with its hidden activations handed
//! from the first to the second as the second's bf16 panels: each call's sums go through the
//! activation (GELU, or SiLU gating with the up projection's matching columns) while they are in
//! L1 and are rounded straight into the panel step the second product reads, instead of being
//! written out in f32 (12.5 MB a vision-tower layer), read back by the activation and read once
//! more to be rounded. The values are those of the two products run apart, bit for bit: the same
//! sums, the same activation code, the same rounding.

use crate::activations::Norm;
use crate::amx::{self, Start};
use crate::gemm_amx::{
    by_row_blocks, on_panels, on_tiles, row_calls, BiasRow, Order, RowCall, TileCall, TilesBorrowed, HALF,
};
use crate::matmul::{Activation, Epilogue as Finish, Mlp, MlpActivation};
use crate::packed::{group_len, Storage, COLS, STEP_UNITS};
use crate::panels::{pack_activations, round_into_steps, PANELS};
use crate::shared::{reused_aligned, SharedOut};

/// `out = residual + down(activation(norm(x) up^T + up bias)) + down bias` as
/// [`crate::mlp_new_adding`] says, with the hidden activations as panels; `false` (nothing written) where this does not
/// apply: weights not in AMX tiles, a first product the row order does not suit (few rows, or
/// weights too large to read once per row block), or gated halves not whole groups of 32.
///
/// # Safety
/// As [`crate::gemm_amx::gemm_bf16`]; `out` points to `m * mlp.down.n` writable values nothing
/// else accesses during the call.
pub(crate) unsafe fn mlp_bf16(
    x: &[f32],
    m: usize,
    norm: Option<&Norm>,
    mlp: &Mlp,
    residual: &[f32],
    out: SharedOut,
) -> bool {
    let Mlp { up, up_bias, activation, down, down_bias } = *mlp;
    let (Storage::Bf16Tiles(up_tiles), Storage::Bf16Tiles(down_tiles)) = (&up.storage, &down.storage) else {
        return false;
    };
    let gated = activation == MlpActivation::SiluGated;
    if gated && !(up.n / 2).is_multiple_of(COLS) {
        return false;
    }
    let Order::Rows(blocks) = Order::for_product(m, up.n, up.kp) else {
        return false;
    };
    let mut input_storage = PANELS.with_borrow_mut(std::mem::take);
    let mut hidden_storage = HIDDEN.with_borrow_mut(std::mem::take);
    // SAFETY: the caller vouches for the CPU.
    let input = unsafe { pack_activations(x, m, up.k, up.kp, norm, &mut input_storage) };
    let hidden = reused_aligned(&mut hidden_storage, m.div_ceil(amx::ROWS) * group_len(down.kp));
    let first = First { m, kp: up.kp, hidden_kp: down.kp, tiles: up_tiles.tiles(), bias: up_bias, gated };
    // SAFETY (both closures): the caller vouches for the CPU and the permission; the tiles are
    // configured while a thread holds its `TilesBorrowed`.
    let borrow_tiles = || unsafe { TilesBorrowed::new(&amx::CONFIG) };
    first
        .write_panels(blocks, input, SharedPanels(hidden.as_mut_ptr()), borrow_tiles, |call| unsafe { on_tiles(call) });
    let order = Order::for_product(m, down.n, down.kp);
    let finish = Finish { bias: down_bias, activation: Activation::Identity, residual: Some(residual) };
    // SAFETY: as the caller promises; the hidden panels are `m` rows of `down.kp` inputs.
    unsafe { on_panels(order, m, down, hidden, down_tiles.tiles(), finish, out) };
    PANELS.with_borrow_mut(|kept| *kept = input_storage);
    HIDDEN.with_borrow_mut(|kept| *kept = hidden_storage);
    true
}

thread_local! {
    /// The hidden activations' panels of the last MLP this thread ran (as `PANELS`).
    static HIDDEN: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The hidden panels, written by threads that each own whole steps of them.
#[derive(Clone, Copy)]
struct SharedPanels(*mut u16);
// SAFETY: each step (one group of 32 hidden columns of one panel's rows) is written by the one
// thread that claimed the group, and the panels outlive the parallel loop that writes them.
unsafe impl Send for SharedPanels {}
// SAFETY: as for Send.
unsafe impl Sync for SharedPanels {}

/// The first product: `m` rows of `kp` inputs by the up weights' `tiles`, to hidden panels of
/// `hidden_kp` inputs (the second product's).
struct First<'a> {
    m: usize,
    kp: usize,
    hidden_kp: usize,
    tiles: &'a [u16],
    bias: Option<&'a [f32]>,
    /// SiLU of the first half's outputs times the second half's, or GELU of every output.
    gated: bool,
}

impl First<'_> {
    /// Every group of 32 hidden columns over every row, in the row order of `blocks` blocks
    /// (as [`crate::gemm_amx`]'s: a thread keeps its rows' panels in L2, the weights pass over
    /// them once, threads claim the groups left in each other's blocks), through `tile`.
    fn write_panels<T>(
        &self,
        blocks: usize,
        input: &[u16],
        hidden: SharedPanels,
        enter: impl Fn() -> T + Sync,
        tile: impl Fn(TileCall) + Sync,
    ) {
        by_row_blocks(blocks, self.m, self.hidden_kp / COLS, enter, |first, end, g, storage| {
            // Every tile call writes its sums before they are read.
            let sums = reused_aligned(storage, 2 * amx::ROWS * COLS);
            self.group(g, first, end, input, hidden, sums, &tile)
        });
    }

    /// Hidden group `g` for rows `first..end`: its sums (and for gating the up half's, `groups`
    /// groups on), activated, rounded into step `g` of each panel.
    #[allow(clippy::too_many_arguments)]
    fn group(
        &self,
        g: usize,
        first: usize,
        end: usize,
        input: &[u16],
        hidden: SharedPanels,
        sums: &mut [f32],
        tile: &impl Fn(TileCall),
    ) {
        let (panel_len, hidden_len) = (group_len(self.kp), group_len(self.hidden_kp));
        let bias_of = |group: usize| {
            let j0 = group * COLS;
            self.bias.map(|b| BiasRow::new(&b[j0.min(b.len())..(j0 + COLS).min(b.len())]))
        };
        // Gating: the up projection's groups follow the gate's.
        let half = self.tiles.len() / panel_len / 2;
        let (bias, up_bias) = (bias_of(g), if self.gated { bias_of(g + half) } else { None });
        let (acts, ups) = sums.split_at_mut(amx::ROWS * COLS);
        for RowCall { row, rows, panel, second_half } in row_calls(first, end) {
            let x = input[panel * panel_len + usize::from(second_half) * amx::TILE..].as_ptr();
            let call = |group: usize, out: &mut [f32], bias: &Option<BiasRow>| {
                let w = self.tiles[group * panel_len..].as_ptr();
                let start = bias.as_ref().map_or(Start::Zero, |b| Start::from(&b.0, 0));
                tile(TileCall { x, w, inputs: self.kp, out: out.as_mut_ptr(), ldo: COLS, rows, start });
            };
            call(g, acts, &bias);
            // Every row the tiles computed (rows past `m` are sums of zero rows: finite, and
            // never read back as anything but padding).
            let computed = if rows <= HALF { HALF } else { amx::ROWS };
            let acts = &mut acts[..computed * COLS];
            if self.gated {
                call(g + half, ups, &up_bias);
                crate::activations::silu_mul_here(acts, &ups[..computed * COLS]);
            } else {
                // SAFETY: `computed` rows of 32 written values; padding columns are zeros
                // (zero weights, zero bias) and stay zeros.
                unsafe { crate::activations::gelu_tanh_rows_here(acts.as_mut_ptr(), computed, COLS, COLS) };
            }
            let at = panel * hidden_len + g * STEP_UNITS + (row % amx::ROWS) * amx::STEP;
            for (r, values) in acts.chunks_exact(COLS).enumerate() {
                // SAFETY: the caller vouches for AVX-512 BF16; one step's row of 32 inside the
                // hidden panels, written by this thread alone (it claimed group g).
                unsafe { round_into_steps(values, 1.0, hidden.0.add(at + r * amx::STEP)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm_amx::{by_tiles, model_tile};
    use crate::{Isa, PackedWeight, WeightFormat};

    fn values(len: usize, a: usize, b: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * a % b) as f32 - (b / 2) as f32) / (b / 2) as f32).collect()
    }

    /// The two products apart, as the model ran them before: the first into f32 rows (GELU in
    /// its epilogue, or SiLU gating after it), rounded into panels, the second adding.
    fn apart(x: &[f32], m: usize, mlp: &Mlp, residual: &[f32], tile: &(impl Fn(TileCall) + Sync)) -> Vec<f32> {
        let tiles = |w: &PackedWeight| match &w.storage {
            Storage::Bf16Tiles(t) => t.tiles().to_vec(),
            _ => unreachable!(),
        };
        let (up, down) = (mlp.up, mlp.down);
        let mut first = vec![f32::NAN; m * up.n];
        let activation = match mlp.activation {
            MlpActivation::GeluTanh => Activation::GeluTanh,
            MlpActivation::SiluGated => Activation::Identity,
        };
        let finish = Finish { bias: mlp.up_bias, activation, residual: None };
        let mut storage = Vec::new();
        let mut out = vec![f32::NAN; m * down.n];
        // SAFETY: the test runs on AVX-512 BF16; outputs of m x n.
        unsafe {
            let panels = pack_activations(x, m, up.k, up.kp, None, &mut storage);
            let order = Order::for_product(m, up.n, up.kp);
            by_tiles(order, m, up.n, up.kp, panels, &tiles(up), finish, SharedOut(first.as_mut_ptr()), || (), tile);
            let hidden = match mlp.activation {
                MlpActivation::GeluTanh => first,
                MlpActivation::SiluGated => crate::silu_mul_halves(&first, up.n / 2),
            };
            let panels = pack_activations(&hidden, m, down.k, down.kp, None, &mut storage);
            let finish = Finish { bias: mlp.down_bias, activation: Activation::Identity, residual: Some(residual) };
            let order = Order::for_product(m, down.n, down.kp);
            by_tiles(order, m, down.n, down.kp, panels, &tiles(down), finish, SharedOut(out.as_mut_ptr()), || (), tile);
        }
        out
    }

    /// The MLP with its hidden activations as panels gives the bits of its two products run
    /// apart, GELU and gated, with and without biases, its input normalised on the way into
    /// the panels or before, over row counts that end halfway through
    /// panels and hidden widths that end halfway through a group: on the model of the tile, and
    /// on the tile where the CPU has AMX.
    #[test]
    fn the_mlp_through_panels_is_its_two_products_apart() {
        if Isa::detected() < Isa::Avx512Bf16 {
            println!("skipped: no AVX-512 BF16 here");
            return;
        }
        // (m, k, hidden): rows ending halfway through a panel, hidden widths ending halfway
        // through a group; the last ones large enough that `mlp_bf16` takes the row order.
        let shapes: [(usize, usize, usize); 6] =
            [(40, 64, 80), (70, 96, 112), (250, 128, 200), (33, 32, 64), (300, 1024, 528), (300, 1024, 512)];
        for (m, k, hidden) in shapes {
            let cases = (0..8).map(|c| (c & 1 == 1, c & 2 == 2, c & 4 == 4));
            for (gated, biases, normed) in cases {
                let up_n = if gated { 2 * hidden.div_ceil(32) * 32 } else { hidden };
                let hidden = if gated { up_n / 2 } else { hidden };
                let up = PackedWeight::from_f32_for(Isa::Amx, &values(up_n * k, 53, 97), up_n, k, WeightFormat::Bf16);
                let down =
                    PackedWeight::from_f32_for(Isa::Amx, &values(k * hidden, 31, 89), k, hidden, WeightFormat::Bf16);
                let (up_bias, down_bias) = (values(up_n, 7, 23), values(k, 11, 29));
                let (x, residual) = (values(m * k, 37, 101), values(m * k, 29, 83));
                let activation = if gated { MlpActivation::SiluGated } else { MlpActivation::GeluTanh };
                let (up_bias, down_bias) = match biases {
                    true => (Some(up_bias.as_slice()), Some(down_bias.as_slice())),
                    false => (None, None),
                };
                let mlp = Mlp { up: &up, up_bias, activation, down: &down, down_bias };
                let case = format!("{m}x{k}, hidden {hidden}, gated {gated}, biases {biases}, normed {normed}");
                let (weight, bias) = (values(k, 13, 31), values(k, 17, 37));
                let norm = match (normed, gated) {
                    (false, _) => None,
                    (true, false) => Some(Norm::Layer { weight: &weight, bias: &bias, eps: 1e-6 }),
                    (true, true) => Some(Norm::Rms { weight: &weight, eps: 1e-6 }),
                };
                let norm = norm.as_ref();
                // The input as the products apart see it.
                let normed_x = norm.map_or_else(|| x.clone(), |norm| crate::norm_rows_new(&x, norm));
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                if k < 1024 {
                    let want = apart(&normed_x, m, &mlp, &residual, &model_tile);
                    assert!(want.iter().all(|v| v.is_finite()), "{case}");
                    for blocks in [1, 2, 3] {
                        let got = through_panels(&x, m, norm, &mlp, &residual, blocks);
                        assert!(same(&got, &want), "model tile {case}, {blocks} row blocks");
                    }
                } else if Isa::detected() == Isa::Amx {
                    let want = apart_on_amx(&normed_x, m, &mlp, &residual);
                    let mut got = vec![f32::NAN; m * k];
                    // SAFETY: AMX was detected; outputs of m x k.
                    assert!(unsafe { mlp_bf16(&x, m, norm, &mlp, &residual, SharedOut(got.as_mut_ptr())) }, "{case}");
                    assert!(same(&got, &want), "AMX {case}");
                }
            }
        }
    }

    /// [`mlp_bf16`]'s two steps on the model of the tile (the norm in the first one's packing),
    /// the first in `blocks` row blocks.
    fn through_panels(
        x: &[f32],
        m: usize,
        norm: Option<&Norm>,
        mlp: &Mlp,
        residual: &[f32],
        blocks: usize,
    ) -> Vec<f32> {
        let (up, down) = (mlp.up, mlp.down);
        let mut got = vec![f32::NAN; m * down.n];
        let (mut input_storage, mut hidden_storage) = (Vec::new(), Vec::new());
        let (Storage::Bf16Tiles(up_tiles), Storage::Bf16Tiles(down_tiles)) = (&up.storage, &down.storage) else {
            unreachable!()
        };
        let gated = mlp.activation == MlpActivation::SiluGated;
        // SAFETY: the test runs on AVX-512 BF16; outputs of m x n.
        unsafe {
            let input = pack_activations(x, m, up.k, up.kp, norm, &mut input_storage);
            let panels = reused_aligned(&mut hidden_storage, m.div_ceil(32) * group_len(down.kp));
            let first = First { m, kp: up.kp, hidden_kp: down.kp, tiles: up_tiles.tiles(), bias: mlp.up_bias, gated };
            first.write_panels(blocks, input, SharedPanels(panels.as_mut_ptr()), || (), model_tile);
            let finish = Finish { bias: mlp.down_bias, activation: Activation::Identity, residual: Some(residual) };
            let order = Order::for_product(m, down.n, down.kp);
            let out = SharedOut(got.as_mut_ptr());
            by_tiles(order, m, down.n, down.kp, panels, down_tiles.tiles(), finish, out, || (), model_tile);
        }
        got
    }

    /// [`apart`] through the products the model ran before, on the AMX tiles.
    fn apart_on_amx(x: &[f32], m: usize, mlp: &Mlp, residual: &[f32]) -> Vec<f32> {
        let hidden = match mlp.activation {
            MlpActivation::GeluTanh => crate::matmul_new_then(x, m, mlp.up, mlp.up_bias, Activation::GeluTanh),
            MlpActivation::SiluGated => {
                crate::silu_mul_halves(&crate::matmul_new(x, m, mlp.up, mlp.up_bias), mlp.up.n / 2)
            }
        };
        crate::matmul_new_adding(&hidden, m, mlp.down, mlp.down_bias, residual)
    }
}
