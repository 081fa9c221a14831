//! Intel AMX tiles for the bf16 GEMM (Sapphire Rapids and later): one `tdpbf16ps` multiplies a
//! 16-row tile of 32 bf16 inputs by 32 inputs of 16 columns into 16x16 f32 sums, 16,384 FLOPs an
//! instruction (a `vdpbf16ps` does 64). A call covers 32 weight rows by one 32-row activation
//! panel of [`crate::gemm512`] in four accumulator tiles (tmm0-3), loading two tiles of weights
//! (tmm4-5) and two of activations (tmm6-7) per 32 inputs.
//!
//! The weights are read where they lie: a tile row is 32 consecutive bf16 inputs of one weight
//! row, and `tileloadd` steps from row to row by the weight's stride. The activation panels
//! already hold each row's pair of inputs `2q, 2q + 1` in 32-bit unit `q * 32 + r`, which is
//! the pair-interleaved ("VNNI") layout `tdpbf16ps` wants for its second operand, so tile row
//! `q` is 64 bytes of the panel, for rows 0-15 or 16-31.
//!
//! The tiles are named in inline assembly (Rust has no stable AMX intrinsics), so the compiler
//! never allocates them; each thread configures them ([`configure`]) before its calls and
//! releases them after ([`release`]). This file uses `core` only: `amx-check/run.sh` compiles it
//! into a bare-metal image and runs it on Bochs' AMX emulation, for machines without AMX.

use core::arch::asm;

/// Weight rows one call covers (two tiles of 16).
pub const ROWS: usize = 32;
/// Activation rows one call covers (two tiles of 16): one panel.
pub const COLS: usize = 32;

/// The 64-byte operand of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile (tmm0-7; 8-15 are reserved and must be zero).
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// All eight tiles at their largest: 16 rows of 64 bytes.
static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Configures this thread's tiles for [`tile`].
///
/// # Safety
/// The CPU has AMX-TILE and AMX-BF16, and the OS lets this process use the tile data (Linux:
/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` succeeded).
#[inline]
pub unsafe fn configure() {
    asm!("ldtilecfg [{config}]", config = in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
}

/// Returns this thread's tiles to their initial state, so the OS need not save them.
///
/// # Safety
/// As [`configure`].
#[inline]
pub unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem, preserves_flags));
}

/// `sums[c][r] = sum_p w[c][p] * x[r][p]` for the 32 weight rows at `w` (bf16 bits, rows
/// `stride` values apart) and the 32 activation rows of one pair-interleaved `panel`, over
/// `kp` inputs.
///
/// # Safety
/// [`configure`] ran on this thread since the last [`release`]; `kp` is a multiple of 32; `w`
/// holds 32 rows of `kp` values `stride` apart and `panel` `kp / 2 * 32` units.
#[inline]
pub unsafe fn tile(w: *const u16, stride: usize, panel: *const u32, kp: usize, sums: &mut [[f32; COLS]; ROWS]) {
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem, preserves_flags));
    let w_stride_bytes = stride * 2;
    let panel_stride_bytes = COLS * 4;
    for p in (0..kp).step_by(32) {
        asm!(
            "tileloadd tmm4, [{w0} + {ws}*1]",
            "tileloadd tmm5, [{w1} + {ws}*1]",
            "tileloadd tmm6, [{x} + {xs}*1]",
            "tileloadd tmm7, [{x} + {xs}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            w0 = in(reg) w.add(p),
            w1 = in(reg) w.add(16 * stride + p),
            ws = in(reg) w_stride_bytes,
            x = in(reg) panel.add(p / 2 * COLS),
            xs = in(reg) panel_stride_bytes,
            options(nostack, readonly, preserves_flags)
        );
    }
    let out = sums.as_mut_ptr() as *mut f32;
    let out_stride_bytes = COLS * 4;
    asm!(
        "tilestored [{c00} + {cs}*1], tmm0",
        "tilestored [{c01} + {cs}*1], tmm1",
        "tilestored [{c10} + {cs}*1], tmm2",
        "tilestored [{c11} + {cs}*1], tmm3",
        c00 = in(reg) out,
        c01 = in(reg) out.add(16),
        c10 = in(reg) out.add(16 * COLS),
        c11 = in(reg) out.add(16 * COLS + 16),
        cs = in(reg) out_stride_bytes,
        options(nostack, preserves_flags)
    );
}
