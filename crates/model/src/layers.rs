//! The building blocks every network part shares: linear layers and normalisations.

use crate::error::Result;
use crate::weights::Scope;
use candle_core::{DType, Tensor, D};

/// One linear projection `y = x W^T + b`. Every projection of the vision tower, the projector
/// and the language model goes through this type, so its weight format can change in one place.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, in the run dtype.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(scope: &Scope, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = scope.get("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(scope.get("bias", &[out_dim])?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// A linear layer over an existing matrix (tied embeddings reuse the embedding table).
    pub fn from_weight(weight: Tensor) -> Self {
        Linear { weight, bias: None }
    }

    /// A linear layer over tensors that are already loaded (e.g. a reshaped convolution).
    pub fn from_weight_and_bias(weight: Tensor, bias: Tensor) -> Self {
        Linear { weight, bias: Some(bias) }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let flat = x.reshape((rows, in_dim))?;
        let mut y = flat.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_dim();
        Ok(y.reshape(out_dims)?)
    }
}

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
