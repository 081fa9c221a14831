//! Weft's own CPU kernels: the linear-layer product `y = x W^T (+ b)` with f32 activations and
//! f32, bf16 or 8-bit weights, on all cores through rayon's global pool (the one candle uses
//! too). Few rows (decode) run dot-product tiles that stream the weights; many rows (prefill,
//! vision, batched decode) run an outer-product GEMM.
//!
//! The instruction set is picked once at run time: AMX tiles for every bf16 product where the CPU
//! has them ([`gemm_amx`]) and for 8-bit products of 16 rows and more ([`q8_amx`]), AVX-512 with
//! BF16 and VNNI dot products (`vdpbf16ps` for bf16 weights, `vpdpbusd` for 8-bit ones,
//! [`vnni`]), AVX2 + FMA, or portable scalar code.
//! `WEFT_KERNELS=scalar|avx2|avx512` forces a slower path (to test it, or to rule the fast one
//! out).

mod activations;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod attention_amx;
mod avx2;
mod avx512;
#[cfg(target_arch = "x86_64")]
mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm512;
#[cfg(target_arch = "x86_64")]
mod gemm_amx;
mod matmul;
#[cfg(target_arch = "x86_64")]
mod mlp_amx;
mod packed;
#[cfg(target_arch = "x86_64")]
mod panels;
mod pool;
#[cfg(target_arch = "x86_64")]
mod q8_amx;
mod scalar;
mod shared;
mod vector;
#[cfg(target_arch = "x86_64")]
mod vnni;

pub use activations::{gelu_tanh, norm_rows, norm_rows_new, silu_mul, silu_mul_halves, softmax_rows, Norm};
#[cfg(target_arch = "x86_64")]
pub use attention_amx::{AmxHead, ScorePrecision, StridedRows};
pub use matmul::{
    matmul, matmul_new, matmul_new_adding, matmul_new_normed, matmul_new_then, matmul_using, mlp_new_adding,
    Activation, Kernel, Mlp, MlpActivation,
};
pub use packed::{PackedWeight, WeightFormat};
pub use pool::{on_compute_pool, Idle};
pub use vector::{narrow_into, scaled_dots, weighted_sums, weighted_sums_add, widen_into, CachedValue};

use std::sync::OnceLock;

/// The instruction sets the kernels are written for, slowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C: Haswell, Zen 1 and later.
    Avx2,
    /// AVX-512F with the BF16 and VNNI dot-product extensions (and BW): Cooper Lake, Sapphire
    /// Rapids, Zen 4 and later. bf16 weights use `vdpbf16ps`, 8-bit weights `vpdpbusd`.
    Avx512Bf16,
    /// All of [`Isa::Avx512Bf16`], plus AMX tiles (`tdpbf16ps`) for bf16 weights at every row
    /// count, the weights packed as tiles when loaded: Sapphire Rapids and later Xeons.
    Amx,
}

impl Isa {
    /// What this CPU supports (asked once: AMX's answer is a system call).
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                // Every set includes the ones below it; F16C (half-precision conversions, for f16
                // KV caches) came with the first AVX2 CPUs.
                let avx2 = has!("avx2") && has!("fma") && has!("f16c");
                if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("avx512bf16") {
                    return if amx_usable() { Isa::Amx } else { Isa::Avx512Bf16 };
                }
                if avx2 {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }

    /// The set the kernels use: the detected one, lowered by `WEFT_KERNELS` if set.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let detected = Isa::detected();
            match std::env::var("WEFT_KERNELS").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") => detected.min(Isa::Avx2),
                Some("avx512") => detected.min(Isa::Avx512Bf16),
                _ => detected,
            }
        })
    }

    /// Every set this CPU can run, for tests that compare them.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Bf16, Isa::Amx].into_iter().filter(|&isa| isa <= Isa::detected()).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22) and the OS lets
/// this process use the tiles. Linux enables the 8 KiB of tile data per process on request
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); the first tile instruction without
/// it is a SIGILL. The permission covers every thread of the process.
#[cfg(target_arch = "x86_64")]
fn amx_usable() -> bool {
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    if leaf7_edx() & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE {
        return false;
    }
    request_tile_data()
}

/// Whether the AMX tiles also multiply bytes (AMX-INT8, CPUID leaf 7, EDX bit 25): the q8_0
/// products' tiles ([`q8_amx`]). Asked once (CPUID traps to the hypervisor on virtual machines).
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx_int8() -> bool {
    const AMX_INT8: u32 = 1 << 25;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| Isa::detected() == Isa::Amx && leaf7_edx() & AMX_INT8 != 0)
}

/// CPUID leaf 7's EDX, where the AMX bits are (leaf 7 exists on every CPU with AVX-512, which
/// the callers have checked).
#[cfg(target_arch = "x86_64")]
fn leaf7_edx() -> u32 {
    std::arch::x86_64::__cpuid_count(7, 0).edx
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permissions.
    if unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0 {
        return true;
    }
    // Kernels before 5.16 have no such request; a thread's signal stack smaller than the tile
    // state is ENOSPC. Either way AVX-512 still works, but the user should know why AMX is off.
    eprintln!(
        "weft: warning: the CPU has AMX but Linux refused the tile state ({}); bf16 products run on AVX-512",
        std::io::Error::last_os_error()
    );
    false
}

/// Other systems enable the tiles for every process, or not at all (CPUID says which).
#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_data() -> bool {
    // SAFETY: OSXSAVE (XGETBV) is there on every CPU with AVX-512.
    let xcr0 = unsafe { std::arch::x86_64::_xgetbv(0) };
    const TILE_STATE: u64 = 0b11 << 17;
    xcr0 & TILE_STATE == TILE_STATE
}
