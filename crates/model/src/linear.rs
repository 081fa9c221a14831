//! The one linear-layer abstraction, `y = x W^T + b`, used by every projection of the vision
//! tower, the projector and the language model. The weight format is chosen at load time:
//! exact f32, bf16 and q8_0 on Weft's own CPU kernels, q4k through candle's quantized matmul,
//! and candle's matmul for f16 or on a GPU.

use crate::error::{ModelError, Result};
use crate::layers::{with_f32_values, RowNorm};
use crate::weights::Scope;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;
pub use weft_kernels::{Activation, MlpActivation};
use weft_kernels::{PackedWeight, WeightFormat};

/// How linear-layer weights are stored and multiplied (activations stay in the run dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearFormat {
    /// The run dtype: f32 (exact) on Weft's kernels, f16 on candle's.
    #[default]
    Dense,
    /// bf16 weights, f32 activations: half the memory traffic of f32.
    Bf16,
    /// 8-bit weights with one scale per block of 32 (9 bits per weight), quantized at load time
    /// and multiplied by Weft's kernels: on AVX-512 VNNI CPUs with the activations quantized per
    /// block of 32 too (integer products, as llama.cpp does), elsewhere with f32 activations.
    Q8_0,
    /// 4-bit k-quants in super-blocks of 256 (4.5 bits per weight), quantized at load time and
    /// multiplied by candle's ggml-style kernels (which quantize activations to 8 bits too).
    /// Layers whose input size is not a multiple of 256 fall back to q8_0.
    Q4K,
}

impl LinearFormat {
    pub fn name(self) -> &'static str {
        match self {
            LinearFormat::Dense => "dense",
            LinearFormat::Bf16 => "bf16",
            LinearFormat::Q8_0 => "q8_0",
            LinearFormat::Q4K => "q4k",
        }
    }
}

#[derive(Debug, Clone)]
enum Backend {
    /// candle's matmul on `[out, in]` in the run dtype.
    Candle(Tensor),
    /// Weft's CPU kernels (f32 run dtype).
    Packed(Arc<PackedWeight>),
    Quantized(QMatMul),
}

#[derive(Debug, Clone)]
pub struct Linear {
    backend: Backend,
    bias: Option<Tensor>,
    /// The bias as the CPU kernels take it.
    bias_f32: Option<Arc<Vec<f32>>>,
    out_dim: usize,
}

impl Linear {
    /// Wraps `weight` (`[out, in]`, run dtype) and `bias` (`[out]`) in the backend `format` asks for.
    pub fn new(weight: Tensor, bias: Option<Tensor>, format: LinearFormat) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let on_cpu = matches!(weight.device(), Device::Cpu);
        let f32_run = weight.dtype() == DType::F32;
        let quantized = |dtype: GgmlDType| -> Result<Backend> {
            let q = QTensor::quantize(&weight.to_dtype(DType::F32)?, dtype)?;
            Ok(Backend::Quantized(QMatMul::from_arc(Arc::new(q))?))
        };
        let packed = |format: WeightFormat| -> Result<Backend> {
            let values = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(Backend::Packed(Arc::new(PackedWeight::from_f32(&values, out_dim, in_dim, format))))
        };
        let backend = match format {
            _ if !on_cpu || !f32_run => {
                if format != LinearFormat::Dense {
                    return Err(ModelError::Input(format!(
                        "{} weights need the CPU and the f32 run dtype",
                        format.name()
                    )));
                }
                Backend::Candle(weight)
            }
            LinearFormat::Dense => packed(WeightFormat::F32)?,
            LinearFormat::Bf16 => packed(WeightFormat::Bf16)?,
            // k-quant super-blocks span 256 inputs; other sizes take q8_0 rather than failing.
            LinearFormat::Q4K if in_dim % 256 == 0 => quantized(GgmlDType::Q4K)?,
            LinearFormat::Q4K | LinearFormat::Q8_0 => packed(WeightFormat::Q8)?,
        };
        let bias_f32 = match (&backend, &bias) {
            (Backend::Packed(_), Some(b)) => Some(Arc::new(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
            _ => None,
        };
        Ok(Linear { backend, bias, bias_f32, out_dim })
    }

    /// Loads `weight` (and `bias`) under `scope`, in the checkpoint's chosen linear format.
    pub fn load(scope: &Scope, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Linear::load_fused(&[(scope.clone(), out_dim)], in_dim, bias)
    }

    /// Several layers that read the same input loaded as one (their outputs side by side, in
    /// order): `parts` are each layer's scope and output size. One product instead of several
    /// reads and converts (or quantizes) the input once and keeps every core busy on a wider
    /// matrix; rows are quantized one by one, so each part's weights are exactly as if alone.
    pub fn load_fused(parts: &[(Scope, usize)], in_dim: usize, bias: bool) -> Result<Self> {
        let format = parts[0].0.linear_format();
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for (scope, out_dim) in parts {
            weights.push(scope.get("weight", &[*out_dim, in_dim])?);
            if bias {
                biases.push(scope.get("bias", &[*out_dim])?);
            }
        }
        let bias = if bias { Some(Tensor::cat(&biases, 0)?) } else { None };
        Linear::new(Tensor::cat(&weights, 0)?, bias, format)
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// How Weft's kernels hold the weights (`None` when candle computes this layer).
    pub fn kernel_format(&self) -> Option<WeightFormat> {
        match &self.backend {
            Backend::Packed(w) => Some(w.format()),
            _ => None,
        }
    }

    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, Activation::Identity)
    }

    /// [`Linear::forward`], then `activation` on every output: in the product's epilogue on
    /// Weft's kernels, as a separate step elsewhere.
    pub fn forward_then(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let (flat, rows, out_dims) = self.as_rows(x)?;
        let y = match &self.backend {
            Backend::Candle(w) => activate(add_bias(flat.matmul(&w.t()?)?, &self.bias)?, activation)?,
            Backend::Quantized(q) => {
                activate(add_bias(q.forward(&flat.to_dtype(DType::F32)?.contiguous()?)?, &self.bias)?, activation)?
            }
            Backend::Packed(w) => {
                let bias = self.bias_f32.as_deref().map(Vec::as_slice);
                let out =
                    with_f32_values(&flat, |input| weft_kernels::matmul_new_then(input, rows, w, bias, activation))?;
                Tensor::from_vec(out, (rows, self.out_dim), x.device())?
            }
        };
        Ok(y.to_dtype(x.dtype())?.reshape(out_dims)?)
    }

    /// `residual + x W^T + b`, `residual` shaped as the output (a residual connection): in the
    /// product on Weft's kernels (on AMX tiles the sums start from the residual and the bias, so
    /// it is read once rather than the output written, read again and summed into a third
    /// array), an addition after it elsewhere.
    pub fn forward_adding(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let Backend::Packed(w) = &self.backend else {
            return Ok((residual + self.forward(x)?)?);
        };
        let (flat, rows, out_dims) = self.as_rows(x)?;
        same_dims(residual, &out_dims)?;
        let bias = self.bias_f32.as_deref().map(Vec::as_slice);
        let out = with_f32_values(&flat, |input| {
            with_f32_values(residual, |residual| weft_kernels::matmul_new_adding(input, rows, w, bias, residual))
        })??;
        Ok(Tensor::from_vec(out, out_dims, x.device())?)
    }

    /// `self(norm(x))`: on Weft's kernels the norm is applied as the rows go into the product
    /// (on AMX tiles as they are rounded into its panels, the norm's output never written out),
    /// with the same values as `norm` then [`Linear::forward`].
    pub fn forward_normed(&self, x: &Tensor, norm: &impl RowNorm) -> Result<Tensor> {
        let (Backend::Packed(w), Some(kernel_norm)) = (&self.backend, norm.kernel()) else {
            return self.forward(&norm.forward(x)?);
        };
        let (flat, rows, out_dims) = self.as_rows(x)?;
        let bias = self.bias_f32.as_deref().map(Vec::as_slice);
        let out = with_f32_values(&flat, |input| weft_kernels::matmul_new_normed(input, rows, &kernel_norm, w, bias))?;
        Ok(Tensor::from_vec(out, out_dims, x.device())?)
    }

    /// `residual + down(activation(self(norm(x))))`: an MLP whose first layer is `self` (for
    /// [`MlpActivation::SiluGated`] the gate's and the up projection's outputs side by side,
    /// [`Linear::load_fused`]). On Weft's kernels in one call, which on AMX tiles hands the
    /// hidden activations to `down` as bf16 panels rather than f32 rows
    /// ([`weft_kernels::mlp_new_adding`]); layer by layer elsewhere.
    pub fn mlp_adding(
        &self,
        x: &Tensor,
        norm: &impl RowNorm,
        activation: MlpActivation,
        down: &Linear,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (Backend::Packed(up_weight), Backend::Packed(down_weight), Some(kernel_norm)) =
            (&self.backend, &down.backend, norm.kernel())
        else {
            let normed = norm.forward(x)?;
            let hidden = match activation {
                MlpActivation::GeluTanh => self.forward_then(&normed, Activation::GeluTanh)?,
                MlpActivation::SiluGated => crate::layers::silu_mul_halves(&self.forward(&normed)?)?,
            };
            return down.forward_adding(&hidden, residual);
        };
        let (flat, rows, mut out_dims) = self.as_rows(x)?;
        *out_dims.last_mut().expect("x has at least one dimension") = down.out_dim;
        same_dims(residual, &out_dims)?;
        let mlp = weft_kernels::Mlp {
            up: up_weight,
            up_bias: self.bias_f32.as_deref().map(Vec::as_slice),
            activation,
            down: down_weight,
            down_bias: down.bias_f32.as_deref().map(Vec::as_slice),
        };
        let out = with_f32_values(&flat, |input| {
            with_f32_values(residual, |residual| {
                weft_kernels::mlp_new_adding(input, rows, Some(&kernel_norm), &mlp, residual)
            })
        })??;
        Ok(Tensor::from_vec(out, out_dims, x.device())?)
    }

    /// `x` (`[.., in]`) as `[rows, in]`, its rows, and the output's dimensions (`[.., out]`).
    fn as_rows(&self, x: &Tensor) -> Result<(Tensor, usize, Vec<usize>)> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        *dims.last_mut().expect("x has at least one dimension") = self.out_dim;
        Ok((x.reshape((rows, in_dim))?, rows, dims))
    }
}

/// An error unless `residual` is shaped as the outputs it is added to.
fn same_dims(residual: &Tensor, out_dims: &[usize]) -> Result<()> {
    match residual.dims() == out_dims {
        true => Ok(()),
        false => Err(ModelError::Input(format!("residual {:?} for outputs {out_dims:?}", residual.dims()))),
    }
}

fn activate(y: Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Identity => Ok(y),
        Activation::GeluTanh => crate::layers::gelu_tanh(&y),
    }
}

fn add_bias(y: Tensor, bias: &Option<Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn relative_rms(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        let base = b.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        (diff / base).sqrt()
    }

    /// q4k through candle's quantized matmul: the product equals `x W'^T` for the dequantized
    /// weights W' up to the 8-bit activation blocks, and W' is within 4-bit rounding of W. This
    /// pins the q4k path itself; the parity test bounds what 4 bits cost a whole network.
    #[test]
    fn q4k_is_its_dequantized_weights_up_to_activation_rounding() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 512), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 512), &dev).unwrap();
        let linear = Linear::new(w.clone(), None, LinearFormat::Q4K).unwrap();
        let dequantized = QTensor::quantize(&w, GgmlDType::Q4K).unwrap().dequantize(&dev).unwrap();
        let weight_error = relative_rms(&dequantized, &w);
        assert!(weight_error > 0.01 && weight_error < 0.1, "q4k weight error {weight_error}");
        let y = linear.forward(&x).unwrap();
        let exact = x.matmul(&dequantized.t().unwrap()).unwrap();
        let product_error = relative_rms(&y, &exact);
        assert!(product_error < 0.01, "q4k product differs from its dequantized weights by {product_error}");
    }
}
