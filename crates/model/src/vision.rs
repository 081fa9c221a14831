//! The SigLIP vision tower: patch embedding and encoder layers, returning pre-`post_layernorm`
//! hidden states as transformers' `hidden_states[i]` does, batched over many images.

use crate::config::VisionConfig;
use crate::error::{ModelError, Result};
use crate::layers::{softmax_f32, LayerNorm};
use crate::linear::{Linear, MlpActivation};
use crate::weights::Scope;
use candle_core::{DType, Tensor, D};

struct Attention {
    /// The query, key and value projections as one product (outputs in that order).
    qkv: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn load(scope: &Scope, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Attention {
            qkv: Linear::load_fused(
                &[(scope.pp("q_proj"), d), (scope.pp("k_proj"), d), (scope.pp("v_proj"), d)],
                d,
                true,
            )?,
            out: Linear::load(&scope.pp("out_proj"), d, d, true)?,
            heads: cfg.num_attention_heads,
            scale: ((d / cfg.num_attention_heads) as f64).powf(-0.5),
        })
    }

    /// `x` plus attention over `norm(x)`: `[images, patches, hidden]`; full (non-causal)
    /// attention within each image.
    fn forward_adding(&self, x: &Tensor, norm: &LayerNorm) -> Result<Tensor> {
        let residual = x;
        let (n, p, d) = x.dims3()?;
        let hd = d / self.heads;
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((n, p, self.heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let qkv = self.qkv.forward_normed(x, norm)?;
        if crate::attention::bf16_available(&self.qkv, x.device()) {
            let ctx = crate::attention::full_bf16(&qkv, self.heads, self.scale as f32)?;
            return self.out.forward_adding(&ctx, residual);
        }
        let (q, k, v) = (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?);
        // In f32 whatever the run dtype, as in the language model's attention.
        let f32 = |t: Tensor| -> Result<Tensor> { Ok(split(t)?.to_dtype(DType::F32)?) };
        let (q, k, v) = (f32(q)?, f32(k)?, f32(v)?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = softmax_f32(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, p, d))?.to_dtype(x.dtype())?;
        self.out.forward_adding(&ctx, residual)
    }
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
        let h = self.attn.forward_adding(x, &self.norm1)?;
        self.fc1.mlp_adding(&h, &self.norm2, MlpActivation::GeluTanh, &self.fc2, &h)
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
