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

/// `silu(gate) * up` (Qwen2's MLP), fused.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if on_cpu_in_f32(gate) && on_cpu_in_f32(up) {
        let up = up.flatten_all()?.to_vec1::<f32>()?;
        return map_values(gate, |values| weft_kernels::silu_mul(values, &up));
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
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

/// A copy of an f32 CPU tensor with `kernel` applied to its values.
fn map_values(t: &Tensor, kernel: impl FnOnce(&mut [f32])) -> Result<Tensor> {
    let mut values = t.flatten_all()?.to_vec1::<f32>()?;
    kernel(&mut values);
    Ok(Tensor::from_vec(values, t.shape(), t.device())?)
}
