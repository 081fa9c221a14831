//! The SigLIP vision tower: patch embedding and encoder layers, returning pre-`post_layernorm`
//! hidden states as transformers' `hidden_states[i]` does, batched over many images.

use crate::config::VisionConfig;
use crate::error::{ModelError, Result};
use crate::layers::{gelu_tanh, softmax_f32, LayerNorm};
use crate::linear::Linear;
use crate::weights::Scope;
use candle_core::{DType, Device, Tensor, D};
use weft_kernels::{Isa, PackedWeight, WeightFormat};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn load(scope: &Scope, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Attention {
            q: Linear::load(&scope.pp("q_proj"), d, d, true)?,
            k: Linear::load(&scope.pp("k_proj"), d, d, true)?,
            v: Linear::load(&scope.pp("v_proj"), d, d, true)?,
            out: Linear::load(&scope.pp("out_proj"), d, d, true)?,
            heads: cfg.num_attention_heads,
            scale: ((d / cfg.num_attention_heads) as f64).powf(-0.5),
        })
    }

    /// `x`: `[images, patches, hidden]`; full (non-causal) attention within each image.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, p, d) = x.dims3()?;
        let hd = d / self.heads;
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((n, p, self.heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        if x.device().is_cpu() && self.q.kernel_format() == Some(WeightFormat::Bf16) && Isa::active() == Isa::Avx512Bf16
        {
            let ctx = attention_bf16(&q, &k, &v, self.heads, self.scale as f32)?;
            return self.out.forward(&ctx);
        }
        // In f32 whatever the run dtype, as in the language model's attention.
        let f32 = |t: Tensor| -> Result<Tensor> { Ok(split(t)?.to_dtype(DType::F32)?) };
        let (q, k, v) = (f32(q)?, f32(k)?, f32(v)?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = softmax_f32(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, p, d))?.to_dtype(x.dtype())?;
        self.out.forward(&ctx)
    }
}

/// Full attention over `[images, patches, heads * head_dim]` on Weft's bf16 GEMM, for bf16
/// weights on AVX-512 BF16 CPUs: per image and head, `softmax(q k^T * scale) v` with `k` and
/// `v^T` packed as bf16 "weights" (torch's bf16 rounds these operands too; the sums stay f32).
/// The 729x729 products ran on candle's f32 matmul, 11% of an image's time to first token.
fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f32) -> Result<Tensor> {
    let (n, p, d) = q.dims3()?;
    let hd = d / heads;
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?);
    let mut ctx = vec![0.0f32; n * p * d];
    let (mut qh, mut kh, mut vt) = (vec![0.0; p * hd], vec![0.0; p * hd], vec![0.0; hd * p]);
    let mut scores = vec![0.0f32; p * p];
    let mut out = vec![0.0f32; p * hd];
    for img in 0..n {
        for h in 0..heads {
            for t in 0..p {
                let at = (img * p + t) * d + h * hd;
                for j in 0..hd {
                    qh[t * hd + j] = q[at + j] * scale;
                    kh[t * hd + j] = k[at + j];
                    vt[j * p + t] = v[at + j];
                }
            }
            let keys = PackedWeight::from_f32(&kh, p, hd, WeightFormat::Bf16);
            weft_kernels::matmul(&qh, p, &keys, None, &mut scores);
            weft_kernels::softmax_rows(&mut scores, p);
            let values = PackedWeight::from_f32(&vt, hd, p, WeightFormat::Bf16);
            weft_kernels::matmul(&scores, p, &values, None, &mut out);
            for t in 0..p {
                let at = (img * p + t) * d + h * hd;
                ctx[at..at + hd].copy_from_slice(&out[t * hd..(t + 1) * hd]);
            }
        }
    }
    Ok(Tensor::from_vec(ctx, (n, p, d), &Device::Cpu)?)
}

struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(scope: &Scope, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(EncoderLayer {
            norm1: LayerNorm::load(&scope.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            attn: Attention::load(&scope.pp("self_attn"), cfg)?,
            norm2: LayerNorm::load(&scope.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            fc1: Linear::load(&scope.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(&scope.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let mlp = self.fc2.forward(&gelu_tanh(&self.fc1.forward(&self.norm2.forward(&h)?)?)?)?;
        Ok((h + mlp)?)
    }
}

/// SigLIP's vision transformer without its pooling head and post-layernorm.
pub struct VisionTower {
    /// The patch convolution as a matrix: `[hidden, channels * patch * patch]`.
    patch: Linear,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    cfg: VisionConfig,
}

impl VisionTower {
    pub fn load(scope: &Scope, cfg: &VisionConfig) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = scope.pp("embeddings");
        let conv = emb.pp("patch_embedding");
        let weight = conv.get("weight", &[d, c, p, p])?.reshape((d, c * p * p))?;
        let bias = conv.get("bias", &[d])?;
        let patch = Linear::new(weight, Some(bias), scope.linear_format())?;
        let positions = emb.pp("position_embedding").get("weight", &[cfg.num_patches(), d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(&scope.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<_>>()?;
        Ok(VisionTower { patch, positions, layers, cfg: cfg.clone() })
    }

    /// Patch embedding plus position embedding: `[n, 3, S, S]` -> `[n, patches, hidden]`.
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        let (s, p) = (self.cfg.image_size, self.cfg.patch_size);
        if c != self.cfg.num_channels || h != s || w != s {
            return Err(ModelError::Input(format!("pixel tensor is {:?}, expected [n, {c}, {s}, {s}]", pixels.dims())));
        }
        let g = self.cfg.patches_per_side();
        // A stride-p convolution ignores the pixels past g * p: crop them, then cut into patches.
        let patches = pixels
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * g * g, c * p * p))?;
        let embedded = self.patch.forward(&patches)?.reshape((n, g * g, self.cfg.hidden_size))?;
        Ok(embedded.broadcast_add(&self.positions)?)
    }

    /// Returns `hidden_states[i]` for each requested index (negatives count from the end;
    /// index 0 is the embedding output), running only as many layers as needed.
    pub fn hidden_states(&self, pixels: &Tensor, indices: &[i64]) -> Result<Vec<Tensor>> {
        let total = self.layers.len() as i64;
        let wanted: Vec<usize> = indices.iter().map(|&i| (if i < 0 { total + 1 + i } else { i }) as usize).collect();
        let needed = wanted.iter().copied().max().unwrap_or(0);
        let mut states: Vec<Option<Tensor>> = vec![None; wanted.len()];
        let mut x = self.embed(pixels)?;
        for depth in 0..=needed {
            if depth > 0 {
                x = self.layers[depth - 1].forward(&x)?;
            }
            for (slot, &w) in states.iter_mut().zip(&wanted) {
                if w == depth {
                    *slot = Some(x.clone());
                }
            }
        }
        Ok(states.into_iter().map(|s| s.expect("every index is reached")).collect())
    }

    /// Concatenated selected features, `[n, patches, hidden * indices.len()]`.
    pub fn features(&self, pixels: &Tensor, indices: &[i64]) -> Result<Tensor> {
        let states = self.hidden_states(pixels, indices)?;
        Ok(Tensor::cat(&states, D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 path computes the same attention as the f32 one, within bf16 rounding of its
    /// operands (it runs on any CPU; AVX-512 BF16 also rounds the activations).
    #[test]
    fn bf16_attention_matches_f32_within_rounding() {
        let dev = Device::Cpu;
        let (n, p, heads, hd) = (2, 37, 3, 24);
        let rand = |seed: u64| {
            let values: Vec<f32> = (0..n * p * heads * hd)
                .map(|i| (((i as u64 * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0)
                .collect();
            Tensor::from_vec(values, (n, p, heads * hd), &dev).unwrap()
        };
        let (q, k, v) = (rand(1), rand(2), rand(3));
        let scale = (hd as f32).powf(-0.5);
        let fast = attention_bf16(&q, &k, &v, heads, scale).unwrap();
        let split = |t: &Tensor| t.reshape((n, p, heads, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (qs, ks, vs) = (split(&q), split(&k), split(&v));
        let scores = (qs.matmul(&ks.t().unwrap()).unwrap() * scale as f64).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let exact = probs.matmul(&vs).unwrap().transpose(1, 2).unwrap().reshape((n, p, heads * hd)).unwrap();
        let diff = (fast - exact).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 2e-2, "largest difference {diff}");
        assert!(diff > 0.0, "bf16 rounding leaves some trace");
    }
}
