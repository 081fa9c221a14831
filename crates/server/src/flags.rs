//! The flags `weft serve` and `weft generate` share (device, weights, KV cache, chat template):
//! typed, so a wrong value is refused by the command line (or the config file) with the values
//! it takes, and documented and defaulted here once.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use weft_model::LinearFormat;

/// `--dtype`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Auto,
    F32,
    Bf16,
    F16,
}

/// `--quantize`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quantize {
    #[serde(rename = "none")]
    #[value(name = "none")]
    None,
    #[serde(rename = "q8_0")]
    #[value(name = "q8_0")]
    Q8_0,
    #[serde(rename = "q4k")]
    #[value(name = "q4k")]
    Q4k,
}

/// `--kv-cache-dtype`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ModelFlags {
    /// Compute device: cpu, or cuda / cuda:N in builds with the `cuda` feature.
    #[arg(long, env = "WEFT_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weights: auto (on the CPU bf16 for a bf16 checkpoint, else f32; on a GPU bf16), f32
    /// (exact), bf16 (on the CPU bf16 weights with f32 activations, half the memory traffic; on a
    /// GPU bf16 throughout) or f16 (weights and activations).
    #[arg(long, env = "WEFT_DTYPE", value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// Quantize linear-layer weights at load time (f32 activations; CPU only).
    #[arg(long, env = "WEFT_QUANTIZE", value_enum, default_value_t = Quantize::None)]
    pub quantize: Quantize,
    /// KV cache storage: auto (on the CPU bf16 for q8_0 and q4k weights, f16 for bf16 weights;
    /// else the activations' dtype), f32, bf16 or f16 (either 16-bit type: half the memory per
    /// token and the bytes each decode step reads).
    #[arg(long, env = "WEFT_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Render prompts with this Hugging Face Jinja chat template instead of the built-in renderer.
    #[arg(long, env = "WEFT_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
}

/// How the loader holds the weights and the KV cache, with every `auto` resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightOptions {
    /// The activations' dtype.
    pub run: DType,
    pub linear: LinearFormat,
    /// `None`: the loader picks by weight format.
    pub kv_cache: Option<DType>,
}

impl ModelFlags {
    /// The device, then whether the flags go together on it: checked at start, before any
    /// download or load.
    pub fn device(&self) -> Result<Device> {
        let device = parse_device(&self.device)?;
        self.weights(device.is_cpu(), None)?;
        Ok(device)
    }

    /// What `dtype`, `quantize` and `kv_cache_dtype` mean on the CPU or a GPU for the
    /// checkpoint in `model_dir` (`auto` reads its stored dtype; without a checkpoint it stays
    /// f32).
    pub fn weights(&self, on_cpu: bool, model_dir: Option<&Path>) -> Result<WeightOptions> {
        let dtype = match (self.dtype, model_dir) {
            (Dtype::Auto, Some(dir)) => resolve_auto(dir, on_cpu),
            (other, _) => other,
        };
        let (run, linear) = match dtype {
            Dtype::Auto | Dtype::F32 => (DType::F32, LinearFormat::Dense),
            Dtype::Bf16 if on_cpu => (DType::F32, LinearFormat::Bf16),
            Dtype::Bf16 => (DType::BF16, LinearFormat::Dense),
            Dtype::F16 => (DType::F16, LinearFormat::Dense),
        };
        let kv_cache = match self.kv_cache_dtype {
            KvCacheDtype::Auto => None,
            KvCacheDtype::F32 => Some(DType::F32),
            KvCacheDtype::Bf16 => Some(DType::BF16),
            KvCacheDtype::F16 => Some(DType::F16),
        };
        let quantized = match self.quantize {
            Quantize::None => return Ok(WeightOptions { run, linear, kv_cache }),
            Quantize::Q8_0 => LinearFormat::Q8_0,
            Quantize::Q4k => LinearFormat::Q4K,
        };
        let name = self.quantize.to_possible_value().expect("no skipped values").get_name().to_string();
        if !on_cpu {
            bail!("--quantize {name}: quantized weights run on the CPU only");
        }
        if self.dtype == Dtype::F16 {
            bail!("--quantize {name} needs --dtype auto, f32 or bf16 (activations stay f32), not f16");
        }
        Ok(WeightOptions { run: DType::F32, linear: quantized, kv_cache })
    }
}

/// The dtype a checkpoint stores its weights in (`torch_dtype`, or transformers 5's `dtype`,
/// at the top of config.json or in its text config).
fn checkpoint_dtype(model_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(model_dir.join("config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    let found = [&cfg, &cfg["text_config"]]
        .into_iter()
        .flat_map(|c| [&c["torch_dtype"], &c["dtype"]])
        .find_map(|v| v.as_str().map(str::to_string));
    found
}

/// What `--dtype auto` runs: a bf16 checkpoint keeps its bf16 weights on the CPU (exact: they
/// are the checkpoint's own values; half the bytes of f32, so decode streams half as much and
/// a 7b fits in 24 GiB, which f32 does not); anything else runs f32. On a GPU, bf16 throughout
/// (cuBLAS's bf16 tensor-core products; scores and softmax stay f32), as vLLM runs it.
fn resolve_auto(model_dir: &Path, on_cpu: bool) -> Dtype {
    let stored = checkpoint_dtype(model_dir);
    let chosen = if !on_cpu || stored.as_deref() == Some("bfloat16") { Dtype::Bf16 } else { Dtype::F32 };
    tracing::info!(stored = stored.as_deref().unwrap_or("unknown"), ?chosen, "--dtype auto");
    chosen
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("--device: {spec:?} is not a device (expected cpu, cuda or cuda:N)"),
        },
        None => bail!("--device: {spec:?} is not a device (expected cpu, cuda or cuda:N)"),
    };
    if cfg!(feature = "cuda") {
        Ok(Device::new_cuda(ordinal)?)
    } else {
        bail!("--device {spec}: this build has no CUDA support (build with `--features cuda`)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: ModelFlags,
    }

    fn flags(args: &[&str]) -> Result<ModelFlags, clap::Error> {
        Cli::try_parse_from(std::iter::once("weft").chain(args.iter().copied())).map(|c| c.flags)
    }

    #[test]
    fn auto_is_bf16_for_a_bf16_checkpoint_on_the_cpu_and_for_any_on_a_gpu() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        assert_eq!(resolve_auto(&fixtures.join("tiny-hub"), true), Dtype::Bf16);
        assert_eq!(resolve_auto(&fixtures.join("tiny-v5"), true), Dtype::F32);
        assert_eq!(resolve_auto(&fixtures.join("tiny-v5"), false), Dtype::Bf16);
        let on = |args: &[&str]| flags(args).unwrap().weights(true, Some(&fixtures.join("tiny-hub"))).unwrap();
        assert_eq!(on(&[]).linear, LinearFormat::Bf16, "auto on a bf16 checkpoint");
        assert_eq!(on(&["--dtype", "f32"]).linear, LinearFormat::Dense);
        assert_eq!(on(&["--dtype", "bf16", "--quantize", "q8_0"]).linear, LinearFormat::Q8_0);
        assert_eq!(on(&["--quantize", "q4k"]).linear, LinearFormat::Q4K);
        assert_eq!((on(&["--dtype", "bf16"]).run, on(&["--dtype", "bf16"]).linear), (DType::F32, LinearFormat::Bf16));
        let f16_q8 = flags(&["--dtype", "f16", "--quantize", "q8_0"]).unwrap().weights(true, None);
        assert!(f16_q8.unwrap_err().to_string().contains("--quantize q8_0 needs"));
        let gpu = |args: &[&str]| flags(args).unwrap().weights(false, None);
        let bf16 = gpu(&["--dtype", "bf16"]).unwrap();
        assert_eq!((bf16.run, bf16.linear), (DType::BF16, LinearFormat::Dense));
        assert!(gpu(&["--quantize", "q8_0"]).is_err(), "quantized weights on a GPU");
    }

    #[test]
    fn wrong_values_are_refused_with_the_values_taken() {
        let err = flags(&["--kv-cache-dtype", "fp8"]).err().unwrap().to_string();
        assert!(err.contains("--kv-cache-dtype") && err.contains("fp8") && err.contains("bf16"), "{err}");
        let err = flags(&["--quantize", "q5"]).err().unwrap().to_string();
        assert!(err.contains("q8_0") && err.contains("q4k"), "{err}");
        assert_eq!(flags(&["--kv-cache-dtype", "bf16"]).unwrap().kv_cache_dtype, KvCacheDtype::Bf16);
        assert_eq!(flags(&["--kv-cache-dtype", "f16"]).unwrap().kv_cache_dtype, KvCacheDtype::F16);
        assert!(parse_device("tpu").unwrap_err().to_string().contains("--device"));
    }
}
