//! The normalisations and activations every network part shares (linear layers live in
//! `linear.rs`). f32 tensors on the CPU go through Weft's vectorized kernels; anything else
//! (f16, a GPU) through candle.

use crate::error::Result;
use crate::weights::Scope;
use candle_core::{DType, Tensor, D};

/// A normalisation of each row of its input, which a linear layer reading its output may apply
/// on the way into its product ([`crate::linear::Linear::forward_normed`]).
pub trait RowNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The norm as Weft's kernels take it, where they compute it (f32 weights on the CPU).
    fn kernel(&self) -> Option<weft_kernels::Norm<'_>>;
}

/// LayerNorm with weight and bias (SigLIP).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
    /// The weight and the bias as the kernels take them, when the run is f32 on the CPU.
    kernel_values: Option<(Vec<f32>, Vec<f32>)>,
}

impl LayerNorm {
    pub fn load(scope: &Scope, dim: usize, eps: f64) -> Result<Self> {
        let (weight, bias) = (scope.get("weight", &[dim])?, scope.get("bias", &[dim])?);
        let kernel_values = match on_cpu_in_f32(&weight) && on_cpu_in_f32(&bias) {
            true => Some((weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?)),
            false => None,
        };
        Ok(LayerNorm { weight, bias, eps: eps as f32, kernel_values })
    }
}

impl RowNorm for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernel() {
            Some(norm) if on_cpu_in_f32(x) => norm_on_kernels(x, &norm),
            _ => Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)?),
        }
    }

    fn kernel(&self) -> Option<weft_kernels::Norm<'_>> {
        let (weight, bias) = self.kernel_values.as_ref()?;
        Some(weft_kernels::Norm::Layer { weight, bias, eps: self.eps })
    }
}

/// RMSNorm (Qwen2): normalised in f32, scaled by the weight in the run dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// The weight as the kernels take it, when the run is f32 on the CPU.
    kernel_weight: Option<Vec<f32>>,
}

impl RmsNorm {
    pub fn load(scope: &Scope, dim: usize, eps: f64) -> Result<Self> {
        let weight = scope.get("weight", &[dim])?;
        let kernel_weight = if on_cpu_in_f32(&weight) { Some(weight.to_vec1::<f32>()?) } else { None };
        Ok(RmsNorm { weight, eps, kernel_weight })
    }
}

impl RowNorm for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(norm) = self.kernel().filter(|_| on_cpu_in_f32(x)) {
            // One pass per row on the kernels; candle took seven, each allocating.
            return norm_on_kernels(x, &norm);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }

    fn kernel(&self) -> Option<weft_kernels::Norm<'_>> {
        Some(weft_kernels::Norm::Rms { weight: self.kernel_weight.as_ref()?, eps: self.eps as f32 })
    }
}

/// `norm` of every row of the f32 CPU tensor `x`, on the kernels.
fn norm_on_kernels(x: &Tensor, norm: &weft_kernels::Norm) -> Result<Tensor> {
    let out = with_f32_values(x, |values| weft_kernels::norm_rows_new(values, norm))?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
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
