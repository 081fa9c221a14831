//! The normalisations and activations every network part shares (linear layers live in
//! `linear.rs`). f32 tensors on the CPU go through Weft's vectorized kernels; anything else
//! (f16, a GPU) through candle.

use crate::error::Result;
use crate::weights::Scope;
use candle_core::{DType, Tensor, D};

/// LayerNorm with weight and bias (SigLIP).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(scope: &Scope, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: scope.get("weight", &[dim])?, bias: scope.get("bias", &[dim])?, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if on_cpu_in_f32(x) && self.weight.dtype() == DType::F32 && self.bias.dtype() == DType::F32 {
            let mut out = vec![0.0f32; x.elem_count()];
            with_f32_values(&self.weight, |weight| {
                with_f32_values(&self.bias, |bias| {
                    with_f32_values(x, |values| weft_kernels::layer_norm_rows(values, weight, bias, self.eps, &mut out))
                })
            })???;
            return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
        }
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)?)
    }
}

/// RMSNorm (Qwen2): normalised in f32, scaled by the weight in the run dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(scope: &Scope, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: scope.get("weight", &[dim])?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if on_cpu_in_f32(x) && self.weight.dtype() == DType::F32 {
            // One pass per row on the kernels; candle took seven, each allocating.
            let mut out = vec![0.0f32; x.elem_count()];
            let eps = self.eps as f32;
            with_f32_values(&self.weight, |weight| {
                with_f32_values(x, |values| weft_kernels::rms_norm_rows(values, weight, eps, &mut out))
            })??;
            return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// Softmax over the last dimension, computed in f32 whatever the run dtype.
pub fn softmax_f32(scores: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    let scores = scores.to_dtype(DType::F32)?;
    let probs = if scores.device().is_cpu() {
        let row_len = scores.dim(D::Minus1)?;
        map_values(&scores, |values| weft_kernels::softmax_rows(values, row_len))?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    Ok(probs.to_dtype(dtype)?)
}

/// `silu(gate) * up` (Qwen2's MLP) from `[.., 2 i]` rows holding the gate's `i` values, then
/// the up projection's: `[.., i]`.
pub fn silu_mul_halves(fused: &Tensor) -> Result<Tensor> {
    let width = fused.dim(D::Minus1)? / 2;
    let mut dims = fused.dims().to_vec();
    *dims.last_mut().expect("at least one dimension") = width;
    if on_cpu_in_f32(fused) {
        let out = with_f32_values(fused, |values| weft_kernels::silu_mul_halves(values, width))?;
        return Ok(Tensor::from_vec(out, dims, fused.device())?);
    }
    let gate = fused.narrow(D::Minus1, 0, width)?;
    Ok((candle_nn::ops::silu(&gate)? * fused.narrow(D::Minus1, width, width)?)?)
}

/// The tanh approximation of GELU (SigLIP's `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if on_cpu_in_f32(x) {
        return map_values(x, weft_kernels::gelu_tanh);
    }
    Ok(x.gelu()?)
}

/// Whether the kernels' elementwise paths apply.
fn on_cpu_in_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `f` on the values of an f32 CPU tensor, in row-major order: borrowed where they lie when the
/// tensor is contiguous (no copy), copied out otherwise.
pub(crate) fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.is_contiguous() && t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let start = layout.start_offset();
            return Ok(f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]));
        }
    }
    Ok(f(&t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

/// A copy of an f32 CPU tensor with `kernel` applied to its values.
fn map_values(t: &Tensor, kernel: impl FnOnce(&mut [f32])) -> Result<Tensor> {
    let mut values = t.flatten_all()?.to_vec1::<f32>()?;
    kernel(&mut values);
    Ok(Tensor::from_vec(values, t.shape(), t.device())?)
}
