//! The checkpoint's tokenizer, with `<image>` expansion to the computed number of visual tokens
//! and the stop tokens of `generation_config.json`.

use crate::error::{ModelError, Result};
use crate::prompt::IMAGE_PLACEHOLDER;
use serde_json::Value;
use std::path::Path;

/// A tokenized prompt: ids with every `<image>` expanded into its visual-token slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    pub ids: Vec<u32>,
    /// Images (and video frames) the prompt holds slots for.
    pub num_images: usize,
}

pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    image_token_id: u32,
    tokens_per_image: usize,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` and checks that its `<image>` token is the config's.
    pub fn from_dir(dir: &Path, image_token_id: u32, tokens_per_image: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::file(path, "not found"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::file(&path, e))?;
        match inner.token_to_id(IMAGE_PLACEHOLDER) {
            Some(id) if id == image_token_id => {}
            Some(id) => {
                return Err(ModelError::file(
                    &path,
                    format!("`<image>` is token {id} but config.json says image_token_index {image_token_id}"),
                ))
            }
            None => return Err(ModelError::file(&path, "has no `<image>` token")),
        }
        Ok(PromptTokenizer { inner, image_token_id, tokens_per_image })
    }

    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    pub fn tokens_per_image(&self) -> usize {
        self.tokens_per_image
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Plain tokenization (one id per `<image>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| ModelError::Prompt(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes rendered prompt text and expands each `<image>` to `tokens_per_image` slots,
    /// exactly as the llava processor's text expansion does.
    pub fn encode_prompt(&self, text: &str) -> Result<EncodedPrompt> {
        let raw = self.encode(text)?;
        let num_images = raw.iter().filter(|&&id| id == self.image_token_id).count();
        let mut ids = Vec::with_capacity(raw.len() + num_images * self.tokens_per_image);
        for id in raw {
            if id == self.image_token_id {
                ids.extend(std::iter::repeat_n(id, self.tokens_per_image));
            } else {
                ids.push(id);
            }
        }
        Ok(EncodedPrompt { ids, num_images })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| ModelError::Prompt(format!("detokenizer: {e}")))
    }

    /// The Hugging Face tokenizer itself (for the structured-output vocabulary).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Token ids that end generation: `eos_token_id` of `generation_config.json` (an id or a list)
/// plus `<|endoftext|>` and `<|im_end|>` when the tokenizer has them.
pub fn stop_token_ids(dir: &Path, tokenizer: &PromptTokenizer) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let path = dir.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::file(&path, e))?;
        match v.get("eos_token_id") {
            Some(Value::Number(n)) => ids.extend(n.as_u64().map(|n| n as u32)),
            Some(Value::Array(list)) => ids.extend(list.iter().filter_map(Value::as_u64).map(|n| n as u32)),
            _ => {}
        }
    }
    for token in ["<|im_end|>", "<|endoftext|>"] {
        ids.extend(tokenizer.token_id(token));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
