//! `LlavaForConditionalGeneration`: vision tower -> projector -> image features merged into the
//! `<image>` slots of the prompt -> Qwen2.

use crate::config::LlavaConfig;
use crate::error::{ModelError, Result};
use crate::kv_pool::KvPool;
use crate::linear::{Linear, LinearFormat};
use crate::qwen2::{Qwen2, SeqInput};
use crate::vision::VisionTower;
use crate::weights::{LoadProgress, NameLayout, Weights};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use weft_kernels::Idle;

/// Activations in a forward pass (new tokens x hidden size) below which the pool's threads
/// spin ([`Idle::Spin`]): candle runs elementwise operations this large or larger (the
/// residual adds) on threads of its own, which would then wait for the cores the spinners hold.
/// Decode steps of the 0.5b up to 63 sequences (measured at 1 and 16), of the 7b up to 15.
const SPIN_MAX_VALUES: usize = 64 * 1024;

/// The two-layer MLP that maps vision features into the language model's embedding space.
struct Projector {
    linear_1: Linear,
    linear_2: Linear,
}

impl Projector {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // projector_hidden_act "gelu" is the exact (erf) GELU.
        self.linear_2.forward(&self.linear_1.forward(x)?.gelu_erf()?)
    }
}

/// How to load a checkpoint.
#[derive(Clone)]
pub struct LoadOptions {
    /// Dtype of weights and activations (f32 exact; f16 halves memory).
    pub dtype: DType,
    pub device: Device,
    /// Linear-layer weights: the run dtype, bf16 or quantized (f32 run dtype on the CPU only).
    pub linear: LinearFormat,
    /// Told the bytes of weights read so far, and in all, as tensors are read.
    pub progress: Option<LoadProgress>,
    /// The dtype the KV cache stores; `None` for the format's choice (see
    /// [`crate::qwen2::Qwen2::load`]).
    pub kv_cache_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            linear: LinearFormat::Dense,
            progress: None,
            kv_cache_dtype: None,
        }
    }
}

/// A loaded llava-interleave model.
pub struct LlavaModel {
    vision: VisionTower,
    projector: Projector,
    lm: Qwen2,
    config: LlavaConfig,
    layout: NameLayout,
    dtype: DType,
    linear: LinearFormat,
    device: Device,
}

impl LlavaModel {
    /// Loads `config.json` and the safetensors weights of `dir`.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::file(dir, "not a directory"));
        }
        let config = LlavaConfig::from_file(&dir.join("config.json"))?;
        if !matches!(options.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Input(format!("unsupported dtype {:?}", options.dtype)));
        }
        if options.linear != LinearFormat::Dense && (options.dtype != DType::F32 || !options.device.is_cpu()) {
            return Err(ModelError::Input(format!(
                "{} weights need the CPU and the f32 run dtype",
                options.linear.name()
            )));
        }
        let weights = Weights::open(dir, options.dtype, &options.device, options.linear, options.progress.clone())?;
        let layout = weights.layout.clone();
        let vision = VisionTower::load(&weights.scope(layout.vision_tower), &config.vision)?;
        let proj = weights.scope(layout.projector);
        let in_dim = config.vision.hidden_size * config.vision_feature_layers.len();
        let hidden = config.text.hidden_size;
        let projector = Projector {
            linear_1: Linear::load(&proj.pp("linear_1"), in_dim, hidden, config.projector_bias)?,
            linear_2: Linear::load(&proj.pp("linear_2"), hidden, hidden, config.projector_bias)?,
        };
        let lm = Qwen2::load(
            &weights.scope(layout.language_model),
            &weights.scope(layout.lm_head),
            &config.text,
            options.kv_cache_dtype,
        )?;
        let (dtype, linear, device) = (options.dtype, options.linear, options.device.clone());
        Ok(LlavaModel { vision, projector, lm, config, layout, dtype, linear, device })
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    pub fn layout(&self) -> &NameLayout {
        &self.layout
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How the linear layers hold their weights.
    pub fn linear_format(&self) -> LinearFormat {
        self.linear
    }

    /// Where the weights live and the model computes.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encodes preprocessed images (`[n, 3, S, S]`, f32, on any device) into projected
    /// features on the model's device, `[n, tokens_per_image, hidden]`, ready for the `<image>`
    /// slots.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        weft_kernels::on_compute_pool(Idle::Sleep, || self.encode_on_pool(pixels))
    }

    fn encode_on_pool(&self, pixels: &Tensor) -> Result<Tensor> {
        let dtype = self.dtype();
        // Pixels are made on the CPU; a GPU model takes them over here, once per batch.
        let pixels = pixels.to_device(&self.device)?.to_dtype(dtype)?;
        let features = self.vision.features(&pixels, &self.config.vision_feature_layers)?;
        let features = match self.config.select_strategy {
            crate::config::SelectStrategy::Full => features,
            crate::config::SelectStrategy::Default => {
                let p = features.dim(1)?;
                features.narrow(1, 1, p - 1)?
            }
        };
        self.projector.forward(&features)
    }

    /// Embeddings of `ids` with the image-token positions filled, in order, by the rows of
    /// `image_rows` (`[k, hidden]`, where k is the number of image tokens in `ids`).
    pub fn embed(&self, ids: &[u32], image_rows: Option<&Tensor>) -> Result<Tensor> {
        let image_id = self.config.image_token_id;
        let slots = ids.iter().filter(|&&id| id == image_id).count();
        let supplied = image_rows.map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        if slots != supplied {
            return Err(ModelError::Input(format!(
                "the tokens hold {slots} image positions but {supplied} image feature rows were given"
            )));
        }
        if slots == 0 {
            return self.lm.embed(ids);
        }
        let rows = image_rows.expect("checked above").to_device(&self.device)?.to_dtype(self.dtype())?;
        // Alternate runs of text tokens (embedded) and image tokens (taken from the features).
        let mut pieces = Vec::new();
        let (mut i, mut used) = (0, 0);
        while i < ids.len() {
            let is_image = ids[i] == image_id;
            let run = ids[i..].iter().take_while(|&&id| (id == image_id) == is_image).count();
            if is_image {
                pieces.push(rows.narrow(0, used, run)?);
                used += run;
            } else {
                pieces.push(self.lm.embed(&ids[i..i + run])?);
            }
            i += run;
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    /// Embeddings of generated tokens: a sampled image token id is an ordinary token here (as
    /// in transformers, which fills image features only where the prompt had them).
    pub fn embed_generated(&self, ids: &[u32]) -> Result<Tensor> {
        self.lm.embed(ids)
    }

    /// The KV pool every sequence's keys and values live in: `num_blocks` blocks of
    /// `block_size` tokens, in the dtype the weights call for (see [`Qwen2::load`]).
    pub fn new_kv_pool(&self, num_blocks: usize, block_size: usize) -> Result<KvPool> {
        self.lm.new_kv_pool(num_blocks, block_size)
    }

    /// Bytes of KV one token costs across all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.lm.kv_bytes_per_token()
    }

    /// One ragged forward pass of the language model; see [`Qwen2::forward`].
    pub fn forward(&self, pool: &mut KvPool, seqs: &[SeqInput]) -> Result<Option<Tensor>> {
        // Decode steps on the CPU are many short loops: the pool's threads spin between them
        // (`weft_kernels::Idle` says why, and why not for prefill chunks and images). Only where
        // Weft's kernels multiply: candle's (q4k, f16) run on threads of candle's own, which
        // spinners would keep waiting (q4k's decode fell from 38-39 to 16 tokens/s).
        let tokens: usize = seqs.iter().map(|s| s.embeds.dim(0).unwrap_or(0)).sum();
        let on_weft_kernels = self.device.is_cpu() && self.dtype() == DType::F32 && self.linear != LinearFormat::Q4K;
        let idle = match on_weft_kernels && tokens * self.config.text.hidden_size < SPIN_MAX_VALUES {
            true => Idle::Spin,
            false => Idle::Sleep,
        };
        weft_kernels::on_compute_pool(idle, || self.lm.forward(pool, seqs))
    }
}
