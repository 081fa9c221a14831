//! `config.json` of a llava checkpoint: parsed with Hugging Face's defaults filled in, old and new layouts.

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

const FILE: &str = "config.json";

/// Which vision tokens are kept: `full` keeps all patches, `default` drops the first (a CLS token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    Full,
    Default,
}

/// The Qwen2 language model's geometry (`text_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
}

/// The SigLIP vision tower's geometry (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    /// Patches per side: a stride-`patch` convolution drops the remainder pixels.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
}

/// Everything the network needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    /// Vision hidden-state indices (as in `hidden_states[i]`, negatives from the end) whose
    /// features are concatenated before the projector.
    pub vision_feature_layers: Vec<i64>,
    pub select_strategy: SelectStrategy,
    pub projector_bias: bool,
}

impl LlavaConfig {
    /// Visual tokens one image occupies in the prompt, computed from the vision geometry
    /// (never from `processor_config.json`, which some revisions got wrong).
    pub fn tokens_per_image(&self) -> usize {
        match self.select_strategy {
            SelectStrategy::Full => self.vision.num_patches(),
            SelectStrategy::Default => self.vision.num_patches() - 1,
        }
    }

    /// Number of encoder layers that must run to produce every selected hidden state.
    pub fn vision_layers_needed(&self) -> usize {
        let total = self.vision.num_hidden_layers as i64;
        self.vision_feature_layers.iter().map(|&l| if l < 0 { total + 1 + l } else { l } as usize).max().unwrap_or(0)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::file(path, e))?;
        Self::from_value(&value)
    }

    pub fn from_value(root: &Value) -> Result<Self> {
        let top = Fields::new(root, "")?;
        let model_type = top.str("model_type", None)?;
        if model_type != "llava" {
            return Err(top.invalid("model_type", format!("expected \"llava\", got {model_type:?}")));
        }
        let text = parse_text(&Fields::new(top.child("text_config")?, "text_config.")?)?;
        let vision = parse_vision(&Fields::new(top.child("vision_config")?, "vision_config.")?)?;

        let image_token_id = match root.get("image_token_id") {
            Some(_) => top.uint("image_token_id", None)?,
            None => top.uint("image_token_index", Some(32000))?,
        } as u32;
        let select_strategy = match top.str("vision_feature_select_strategy", Some("default"))?.as_str() {
            "full" => SelectStrategy::Full,
            "default" => SelectStrategy::Default,
            other => {
                return Err(top.invalid(
                    "vision_feature_select_strategy",
                    format!("unsupported value {other:?} (expected \"full\" or \"default\")"),
                ))
            }
        };
        let vision_feature_layers = match root.get("vision_feature_layer") {
            None => vec![-2],
            Some(Value::Number(n)) => {
                vec![n.as_i64().ok_or_else(|| top.invalid("vision_feature_layer", "not an integer"))?]
            }
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_i64().ok_or_else(|| top.invalid("vision_feature_layer", "list holds a non-integer")))
                .collect::<Result<_>>()?,
            Some(_) => return Err(top.invalid("vision_feature_layer", "expected an integer or a list of integers")),
        };
        let layers = vision.num_hidden_layers as i64;
        for &l in &vision_feature_layers {
            if l < -(layers + 1) || l > layers {
                return Err(top.invalid(
                    "vision_feature_layer",
                    format!("{l} is outside the tower's hidden states (-{} ..= {layers})", layers + 1),
                ));
            }
        }
        let act = top.str("projector_hidden_act", Some("gelu"))?;
        if act != "gelu" {
            return Err(top.invalid("projector_hidden_act", format!("unsupported activation {act:?}")));
        }
        let projector_bias = top.bool("multimodal_projector_bias", Some(true))?;
        Ok(LlavaConfig { text, vision, image_token_id, vision_feature_layers, select_strategy, projector_bias })
    }
}

/// Qwen2Config's defaults apply to every absent field (the 7b checkpoints omit several).
fn parse_text(f: &Fields) -> Result<TextConfig> {
    let model_type = f.str("model_type", Some("qwen2"))?;
    if model_type != "qwen2" {
        return Err(
            f.invalid("model_type", format!("only \"qwen2\" language models are supported, got {model_type:?}"))
        );
    }
    let hidden_size = f.uint("hidden_size", Some(4096))?;
    let num_attention_heads = f.uint("num_attention_heads", Some(32))?;
    let num_key_value_heads = match f.value.get("num_key_value_heads") {
        Some(Value::Null) | None => num_attention_heads,
        Some(_) => f.uint("num_key_value_heads", None)?,
    };
    if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
        return Err(f.invalid("num_attention_heads", "must divide hidden_size"));
    }
    if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(f.invalid("num_key_value_heads", "must divide num_attention_heads"));
    }
    let head_dim = match f.value.get("head_dim") {
        Some(Value::Null) | None => hidden_size / num_attention_heads,
        Some(_) => f.uint("head_dim", None)?,
    };
    let rope_theta = match f.value.get("rope_parameters") {
        Some(Value::Object(params)) => {
            let sub = Fields {
                value: f.value.get("rope_parameters").unwrap(),
                prefix: format!("{}rope_parameters.", f.prefix),
            };
            if let Some(kind) = params.get("rope_type").and_then(Value::as_str) {
                if kind != "default" {
                    return Err(sub.invalid(
                        "rope_type",
                        format!("only \"default\" rotary embeddings are supported, got {kind:?}"),
                    ));
                }
            }
            sub.float("rope_theta", Some(10000.0))?
        }
        _ => f.float("rope_theta", Some(10000.0))?,
    };
    if let Some(Value::Object(scaling)) = f.value.get("rope_scaling") {
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str);
        if kind.is_some_and(|k| k != "default") {
            return Err(f.invalid("rope_scaling", "rope scaling is not supported"));
        }
    }
    let act = f.str("hidden_act", Some("silu"))?;
    if act != "silu" {
        return Err(f.invalid("hidden_act", format!("unsupported activation {act:?}")));
    }
    Ok(TextConfig {
        vocab_size: f.uint("vocab_size", Some(151936))?,
        hidden_size,
        intermediate_size: f.uint("intermediate_size", Some(22016))?,
        num_hidden_layers: f.uint("num_hidden_layers", Some(32))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: f.uint("max_position_embeddings", Some(32768))?,
        rms_norm_eps: f.float("rms_norm_eps", Some(1e-6))?,
        rope_theta,
    })
}

/// SiglipVisionConfig's defaults apply to every absent field.
fn parse_vision(f: &Fields) -> Result<VisionConfig> {
    let model_type = f.str("model_type", Some("siglip_vision_model"))?;
    if model_type != "siglip_vision_model" {
        return Err(f.invalid("model_type", format!("only SigLIP vision towers are supported, got {model_type:?}")));
    }
    let act = f.str("hidden_act", Some("gelu_pytorch_tanh"))?;
    if act != "gelu_pytorch_tanh" {
        return Err(f.invalid("hidden_act", format!("unsupported activation {act:?}")));
    }
    if f.bool("vision_use_head", Some(false))? {
        // The pooling head is never used for llava features; its weights are simply ignored.
        tracing::debug!("vision_use_head is set; the head is not used");
    }
    let cfg = VisionConfig {
        hidden_size: f.uint("hidden_size", Some(768))?,
        intermediate_size: f.uint("intermediate_size", Some(3072))?,
        num_hidden_layers: f.uint("num_hidden_layers", Some(12))?,
        num_attention_heads: f.uint("num_attention_heads", Some(12))?,
        num_channels: f.uint("num_channels", Some(3))?,
        image_size: f.uint("image_size", Some(224))?,
        patch_size: f.uint("patch_size", Some(16))?,
        layer_norm_eps: f.float("layer_norm_eps", Some(1e-6))?,
    };
    if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(f.invalid("num_attention_heads", "must divide hidden_size"));
    }
    if cfg.patch_size == 0 || cfg.patch_size > cfg.image_size {
        return Err(f.invalid("patch_size", "must be between 1 and image_size"));
    }
    if cfg.num_channels != 3 {
        return Err(f.invalid("num_channels", "only RGB (3) is supported"));
    }
    Ok(cfg)
}

/// Typed access to one JSON object, with errors that carry the dotted field path.
struct Fields<'a> {
    value: &'a Value,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, prefix: &str) -> Result<Self> {
        if !value.is_object() {
            let field = prefix.trim_end_matches('.');
            return Err(ModelError::Config {
                file: FILE,
                field: if field.is_empty() { "(root)".into() } else { field.into() },
                message: "expected a JSON object".into(),
            });
        }
        Ok(Fields { value, prefix: prefix.to_string() })
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ModelError {
        ModelError::Config { file: FILE, field: format!("{}{key}", self.prefix), message: message.into() }
    }

    fn child(&self, key: &str) -> Result<&'a Value> {
        self.value.get(key).ok_or_else(|| self.invalid(key, "missing"))
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn uint(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match (self.get(key), default) {
            (Some(v), _) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.invalid(key, format!("expected a non-negative integer, got {v}"))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.invalid(key, "missing")),
        }
    }

    fn float(&self, key: &str, default: Option<f64>) -> Result<f64> {
        match (self.get(key), default) {
            (Some(v), _) => v.as_f64().ok_or_else(|| self.invalid(key, format!("expected a number, got {v}"))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.invalid(key, "missing")),
        }
    }

    fn bool(&self, key: &str, default: Option<bool>) -> Result<bool> {
        match (self.get(key), default) {
            (Some(v), _) => v.as_bool().ok_or_else(|| self.invalid(key, format!("expected true or false, got {v}"))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.invalid(key, "missing")),
        }
    }

    fn str(&self, key: &str, default: Option<&str>) -> Result<String> {
        match (self.get(key), default) {
            (Some(v), _) => {
                v.as_str().map(str::to_string).ok_or_else(|| self.invalid(key, format!("expected a string, got {v}")))
            }
            (None, Some(d)) => Ok(d.to_string()),
            (None, None) => Err(self.invalid(key, "missing")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The published 7b config omits most text fields: Qwen2Config's defaults must fill them.
    fn seven_b_style() -> Value {
        json!({
            "model_type": "llava",
            "image_token_index": 151646,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "text_config": {"model_type": "qwen2", "intermediate_size": 11008, "vocab_size": 152000,
                             "max_position_embeddings": 32768, "rope_theta": 1000000.0},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384,
                               "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 26,
                               "patch_size": 14, "vision_use_head": false}
        })
    }

    #[test]
    fn fills_qwen2_defaults_for_7b() {
        let cfg = LlavaConfig::from_value(&seven_b_style()).unwrap();
        assert_eq!(cfg.text.hidden_size, 4096);
        assert_eq!(cfg.text.num_hidden_layers, 32);
        assert_eq!(cfg.text.num_attention_heads, 32);
        assert_eq!(cfg.text.num_key_value_heads, 32);
        assert_eq!(cfg.text.head_dim, 128);
        assert_eq!(cfg.text.rms_norm_eps, 1e-6);
        assert_eq!(cfg.text.rope_theta, 1e6);
        assert_eq!(cfg.tokens_per_image(), 729);
        assert_eq!(cfg.vision_layers_needed(), 26);
        assert_eq!(cfg.image_token_id, 151646);
    }

    #[test]
    fn accepts_rope_parameters_and_image_token_id() {
        let mut v = seven_b_style();
        let text = v["text_config"].as_object_mut().unwrap();
        text.remove("rope_theta");
        text.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 5000.0}));
        v.as_object_mut().unwrap().remove("image_token_index");
        v["image_token_id"] = json!(7);
        v["vision_feature_layer"] = json!(-2);
        v["vision_feature_select_strategy"] = json!("default");
        let cfg = LlavaConfig::from_value(&v).unwrap();
        assert_eq!(cfg.text.rope_theta, 5000.0);
        assert_eq!(cfg.image_token_id, 7);
        assert_eq!(cfg.tokens_per_image(), 728);
        assert_eq!(cfg.vision_layers_needed(), 25);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = seven_b_style();
        v["vision_feature_select_strategy"] = json!("cls_patch");
        let err = LlavaConfig::from_value(&v).unwrap_err().to_string();
        assert!(err.contains("`vision_feature_select_strategy`"), "{err}");

        let mut v = seven_b_style();
        v["model_type"] = json!("llava_next");
        assert!(LlavaConfig::from_value(&v).unwrap_err().to_string().contains("`model_type`"));

        let mut v = seven_b_style();
        v["vision_feature_layer"] = json!(-40);
        assert!(LlavaConfig::from_value(&v).unwrap_err().to_string().contains("`vision_feature_layer`"));

        let mut v = seven_b_style();
        v["text_config"]["hidden_size"] = json!("big");
        let err = LlavaConfig::from_value(&v).unwrap_err().to_string();
        assert!(err.contains("`text_config.hidden_size`"), "{err}");

        let mut v = seven_b_style();
        v["text_config"]["model_type"] = json!("llama");
        assert!(LlavaConfig::from_value(&v).unwrap_err().to_string().contains("`text_config.model_type`"));
    }
}
