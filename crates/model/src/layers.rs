//! The normalisations every network part shares (linear layers live in `linear.rs`).

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
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
    Ok(probs.to_dtype(dtype)?)
}
