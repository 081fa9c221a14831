//! Intel AMX tiles for the bf16 GEMM (Sapphire Rapids and later): one `tdpbf16ps` multiplies a
//! 16-row tile of 32 bf16 inputs by 32 inputs of 16 columns into 16x16 f32 sums, 16,384 FLOPs an
//! instruction (a `vdpbf16ps` does 64). A call covers 32 activation rows by 32 weight columns in
//! four accumulator tiles (tmm0-3), loading two tiles of activations (tmm4-5) and two of weights
//! (tmm6-7) per 32 inputs, so its sums come out as rows of the output and are stored in place.
//!
//! Both operands are packed by [`crate::gemm_amx`] as 1 KiB tiles, contiguous (64-byte rows), so
//! no load strides across lines a power of two apart: activations as 16 rows of 32 inputs in
//! order; weights pair-interleaved ("VNNI"), 16 rows `q` of 16 columns' pairs of inputs
//! `2q, 2q + 1`, the layout `tdpbf16ps` wants for its second operand.
//!
//! The tiles are named in inline assembly (Rust has no stable AMX intrinsics), so the compiler
//! never allocates them. A thread's tile configuration is shared by every tile user in the
//! process (candle's q4k kernel loads its own once per thread and expects it to stay), so Weft
//! borrows it: [`borrow_with`] saves what the thread had and loads Weft's, [`give_back`] restores
//! what was saved (or releases the tiles if there was none). This file uses `core` only:
//! `amx-check/run.sh` compiles it into a bare-metal image and runs it on Bochs' AMX emulation,
//! for machines without AMX.

use core::arch::asm;
use core::marker::PhantomData;

/// Activation rows one call covers (two tiles of 16).
pub const ROWS: usize = 32;
/// Weight columns one call covers (two tiles of 16).
pub const COLS: usize = 32;
/// Inputs one step covers: a tile row of bf16 activations.
pub const STEP: usize = 32;
/// bf16 values in one tile (16 rows of 64 bytes).
pub const TILE: usize = 512;

/// The 64-byte operand of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
pub struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile (tmm0-7; 8-15 are reserved and must be zero).
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// [`tile`]'s: all eight tiles at their largest, 16 rows of 64 bytes.
pub static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The 8-bit products' tiles (`crate::q8_amx`), one block of 32 inputs a step: tmm0-3 hold 16
/// rows of 16 32-bit sums, tmm4-5 16 rows of 32 signed bytes (activations), tmm6-7 8 rows of 16
/// columns' 4 consecutive unsigned bytes (weights, as the VNNI panels store them).
pub static INT8_CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 32, 32, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Returns this thread's tiles to their initial state, so the OS need not save them.
///
/// # Safety
/// As [`borrow_with`].
#[inline]
pub unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem, preserves_flags));
}

/// A thread's tile configuration as `sttilecfg` stores it: 64 zero bytes when none is loaded.
#[repr(C, align(64))]
pub struct SavedConfig(pub [u8; 64]);

/// Saves this thread's tile configuration (whoever loaded it) and loads `config` ([`CONFIG`] for
/// [`tile`]); [`give_back`] puts the saved one back.
///
/// # Safety
/// The CPU has AMX-TILE (and the AMX instructions the tiles will run), and the OS lets this
/// process use the tile data (Linux: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`
/// succeeded); `config` is valid for this CPU (palette 1, at most 16 rows of 64 bytes).
#[inline]
pub unsafe fn borrow_with(config: &TileConfig) -> SavedConfig {
    let mut saved = SavedConfig([0; 64]);
    asm!("sttilecfg [{saved}]", saved = in(reg) saved.0.as_mut_ptr(), options(nostack, preserves_flags));
    asm!("ldtilecfg [{config}]", config = in(reg) config, options(nostack, readonly, preserves_flags));
    saved
}

/// Restores the configuration [`borrow_with`] saved: loads it again (which zeroes the tile data,
/// as any configuration's owner expects of a fresh load), or releases the tiles if the thread
/// had none.
///
/// # Safety
/// As [`borrow_with`]; `saved` came from [`borrow_with`] on this thread.
#[inline]
pub unsafe fn give_back(saved: &SavedConfig) {
    if saved.0[0] == 0 {
        release();
    } else {
        asm!("ldtilecfg [{saved}]", saved = in(reg) saved.0.as_ptr(), options(nostack, readonly, preserves_flags));
    }
}

/// `out[r * ldo + c] = sum_p x[r][p] * w[c][p]` for 32 activation rows and 32 weight columns
/// over `kp` inputs. `x` holds `kp / 32` steps of two tiles (rows 0-15, then 16-31), each row 32
/// bf16 inputs in order; `w` holds `kp / 32` steps of two tiles (columns 0-15, then 16-31), each
/// tile row `q` the pairs `w[c][2q], w[c][2q + 1]` of its 16 columns side by side.
///
/// # Safety
/// [`borrow_with`] loaded [`CONFIG`] on this thread since the last [`release`]; `kp` is a
/// multiple of 32; `x` and `w` hold `kp / 32 * 2` tiles each; `out` holds 32 rows of 32 values
/// `ldo` apart.
#[inline]
pub unsafe fn tile(x: *const u16, w: *const u16, kp: usize, out: *mut f32, ldo: usize) {
    tile_from(Start::Zero, x, w, kp, out, ldo);
}

/// What a call's sums start from.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    Zero,
    /// Rows of 32 sums `ldo` values apart at the pointer (rows 16-31 from `16 * ldo` on); with
    /// `ldo` 0, the same 32 for every row (a bias). Outputs stored by an earlier call over
    /// other inputs continue as one call over all of them would (the accumulators are stored
    /// and loaded as they are). Starting from the bias (or the bias and a residual) leaves
    /// nothing to read the outputs right after the tiles store them: loads right behind tile
    /// stores waited for them to reach L1. Made by [`Start::from`], which keeps what the
    /// pointer reads borrowed while the start is used.
    From(*const f32, usize, PhantomData<&'a [f32]>),
}

impl<'a> Start<'a> {
    /// From `values` (their first value, then rows `ldo` apart), borrowed while the start lives.
    pub fn from(values: &'a [f32], ldo: usize) -> Start<'a> {
        Start::From(values.as_ptr(), ldo, PhantomData)
    }
}

/// Loads the accumulators of `rows` rows (16 or 32) as `start` says.
#[inline(always)]
unsafe fn load_start(start: Start, rows: usize) {
    let Start::From(at, ldo, _) = start else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem, preserves_flags)
        );
        return;
    };
    asm!(
        "tileloadd tmm0, [{c00} + {cs}*1]",
        "tileloadd tmm1, [{c01} + {cs}*1]",
        c00 = in(reg) at,
        c01 = in(reg) at.add(16),
        cs = in(reg) ldo * 4,
        options(nostack, readonly, preserves_flags)
    );
    if rows > 16 {
        asm!(
            "tileloadd tmm2, [{c10} + {cs}*1]",
            "tileloadd tmm3, [{c11} + {cs}*1]",
            c10 = in(reg) at.add(16 * ldo),
            c11 = in(reg) at.add(16 * ldo + 16),
            cs = in(reg) ldo * 4,
            options(nostack, readonly, preserves_flags)
        );
    }
}

/// As [`tile`], the sums starting as `start` says.
///
/// # Safety
/// As [`tile`]; a [`Start::From`] pointer holds its 32 rows of 32 sums.
#[inline]
pub unsafe fn tile_from(start: Start, x: *const u16, w: *const u16, kp: usize, out: *mut f32, ldo: usize) {
    load_start(start, 32);
    tile_steps(x, w, kp, out, ldo);
}

/// The steps and the stores of [`tile_from`], from the accumulators as they are.
#[inline(always)]
unsafe fn tile_steps(x: *const u16, w: *const u16, kp: usize, out: *mut f32, ldo: usize) {
    for s in 0..kp / STEP {
        let (x, w) = (x.add(s * 2 * TILE), w.add(s * 2 * TILE));
        // The step PREFETCH_STEPS ahead, a quarter behind each product (see `prefetch_quarter`).
        let (next_x, next_w) = (x.wrapping_add(PREFETCH_STEPS * 2 * TILE), w.wrapping_add(PREFETCH_STEPS * 2 * TILE));
        asm!(
            "tileloadd tmm4, [{x} + {rs}*1]",
            "tileloadd tmm6, [{w} + {rs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            x = in(reg) x, w = in(reg) w, rs = in(reg) 64usize,
            options(nostack, readonly, preserves_flags)
        );
        prefetch_quarter(next_x, next_w, 0);
        asm!(
            "tileloadd tmm7, [{w} + {rs}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            w = in(reg) w, rs = in(reg) 64usize,
            options(nostack, readonly, preserves_flags)
        );
        prefetch_quarter(next_x, next_w, 1);
        asm!(
            "tileloadd tmm5, [{x} + {rs}*1 + 1024]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            x = in(reg) x, rs = in(reg) 64usize,
            options(nostack, readonly, preserves_flags)
        );
        prefetch_quarter(next_x, next_w, 2);
        asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem, preserves_flags));
        prefetch_quarter(next_x, next_w, 3);
    }
    asm!(
        "tilestored [{c00} + {cs}*1], tmm0",
        "tilestored [{c01} + {cs}*1], tmm1",
        "tilestored [{c10} + {cs}*1], tmm2",
        "tilestored [{c11} + {cs}*1], tmm3",
        c00 = in(reg) out,
        c01 = in(reg) out.add(16),
        c10 = in(reg) out.add(16 * ldo),
        c11 = in(reg) out.add(16 * ldo + 16),
        cs = in(reg) ldo * 4,
        options(nostack, preserves_flags)
    );
}

/// Steps ahead that [`tile`] prefetches: the hardware's prefetchers alone left the tile loads
/// waiting on L2 (the 0.5b's prefill products ran 1-15% faster with it, measured interleaved).
const PREFETCH_STEPS: usize = 2;

/// Asks for quarter `q` of a step's activation and weight tiles (2 KiB each, 8 lines of each
/// per quarter) to be brought into L1. Prefetches never fault, so the steps past the end of a
/// panel cost nothing but the hint.
#[inline(always)]
fn prefetch_quarter(x: *const u16, w: *const u16, q: usize) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for line in q * 8..(q + 1) * 8 {
        // SAFETY: a prefetch reads nothing architecturally and never faults, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(x.wrapping_add(line * 32) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(line * 32) as *const i8);
        }
    }
}

/// As [`tile`] for the first 16 activation rows only (a panel of at most 16 rows: decode, and
/// the last panel of a prefill): half the products and one activation tile a step. Rows 16-31
/// of `out` are left as they were.
///
/// # Safety
/// As [`tile`]; `out` holds 16 rows.
#[inline]
pub unsafe fn tile_16_rows(x: *const u16, w: *const u16, kp: usize, out: *mut f32, ldo: usize) {
    tile_16_rows_from(Start::Zero, x, w, kp, out, ldo);
}

/// As [`tile_16_rows`], the sums starting as `start` says.
///
/// # Safety
/// As [`tile_16_rows`] and [`tile_from`] (for 16 rows).
#[inline]
pub unsafe fn tile_16_rows_from(start: Start, x: *const u16, w: *const u16, kp: usize, out: *mut f32, ldo: usize) {
    load_start(start, 16);
    for s in 0..kp / STEP {
        asm!(
            "tileloadd tmm4, [{x} + {rs}*1]",
            "tileloadd tmm6, [{w} + {rs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{w} + {rs}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            x = in(reg) x.add(s * 2 * TILE),
            w = in(reg) w.add(s * 2 * TILE),
            rs = in(reg) 64usize,
            options(nostack, readonly, preserves_flags)
        );
    }
    asm!(
        "tilestored [{c00} + {cs}*1], tmm0",
        "tilestored [{c01} + {cs}*1], tmm1",
        c00 = in(reg) out,
        c01 = in(reg) out.add(16),
        cs = in(reg) ldo * 4,
        options(nostack, preserves_flags)
    );
}
