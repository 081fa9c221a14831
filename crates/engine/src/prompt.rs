//! The one way to make a prompt the engine runs: [`PromptBuilder`] renders, tokenizes,
//! preprocesses and hashes, then proves the result ([`ValidPrompt`], which nothing else can
//! construct). Media never come here: callers hand over decoded pictures, in prompt order.

use crate::request::ImageInput;
use candle_core::Device;
use image::DynamicImage;
use std::sync::Arc;
use weft_model::preprocess::{picture_hash, ImageProcessor};
use weft_model::prompt::{Message, PromptRenderer};
use weft_model::tokenizer::PromptTokenizer;
use weft_model::LlavaConfig;

/// Token ids inside the vocabulary whose image slots come in whole images, one image per
/// `tokens_per_image` slots, each image made by this crate's [`PromptBuilder`]. The engine
/// relies on it (it indexes images by slot) and checks only its own budgets.
#[derive(Debug, Clone)]
pub struct ValidPrompt {
    ids: Vec<u32>,
    images: Vec<ImageInput>,
}

impl ValidPrompt {
    /// Token ids, each image expanded to its slots.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// One input per image or video frame, in slot order.
    pub fn images(&self) -> &[ImageInput] {
        &self.images
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Never true: the proof refuses empty prompts.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Why a prompt cannot run. The server names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("the prompt is empty")]
    Empty,
    #[error("token id {0} is outside the vocabulary")]
    OutsideVocabulary(u32),
    #[error("the prompt has {slots} image slots but {images} images need {}", images * tokens_per_image)]
    SlotCount { slots: usize, images: usize, tokens_per_image: usize },
    /// The prompt is text only (a completion), yet it holds the image token.
    #[error("the prompt holds the image token but takes no images")]
    ImageInText,
    /// The chat template failed or the text could not be tokenized.
    #[error("{0}")]
    Render(String),
    /// Preprocessing a decoded picture failed (the server's fault, not the client's).
    #[error("preprocessing an image: {0}")]
    Preprocess(String),
}

/// Turns messages and decoded pictures (or text, or token ids) into a [`ValidPrompt`]: made
/// from the loaded model's tokenizer, chat template and image processor.
pub struct PromptBuilder {
    tokenizer: Arc<PromptTokenizer>,
    renderer: PromptRenderer,
    processor: ImageProcessor,
    vocab_size: usize,
}

impl PromptBuilder {
    pub fn new(
        tokenizer: Arc<PromptTokenizer>,
        renderer: PromptRenderer,
        processor: ImageProcessor,
        config: &LlavaConfig,
    ) -> Self {
        PromptBuilder { tokenizer, renderer, processor, vocab_size: config.text.vocab_size }
    }

    pub fn tokenizer(&self) -> &Arc<PromptTokenizer> {
        &self.tokenizer
    }

    /// Prompt tokens one image or video frame takes.
    pub fn tokens_per_image(&self) -> usize {
        self.tokenizer.tokens_per_image()
    }

    /// Chat messages whose image and video parts are `pictures`, in the order of the parts
    /// (a video's frames one after another).
    pub fn chat(
        &self,
        messages: &[Message],
        pictures: &[DynamicImage],
        add_generation_prompt: bool,
    ) -> Result<ValidPrompt, PromptError> {
        let images = pictures.iter().map(|p| self.image_input(p)).collect::<Result<Vec<_>, _>>()?;
        self.chat_inputs(messages, images, add_generation_prompt)
    }

    /// [`Self::chat`] with pictures already preprocessed by [`Self::image_input`] (a caller
    /// that sends the same pictures many times preprocesses them once).
    pub fn chat_inputs(
        &self,
        messages: &[Message],
        images: Vec<ImageInput>,
        add_generation_prompt: bool,
    ) -> Result<ValidPrompt, PromptError> {
        let ids = self.render_ids(messages, add_generation_prompt)?;
        self.check(&ids, images.len())?;
        Ok(ValidPrompt { ids, images })
    }

    /// The token ids of chat messages whose parts hold `images` pictures, checked as
    /// [`Self::chat`] checks them but with no picture preprocessed (what `/tokenize` reports).
    pub fn chat_ids(
        &self,
        messages: &[Message],
        images: usize,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, PromptError> {
        let ids = self.render_ids(messages, add_generation_prompt)?;
        self.check(&ids, images)?;
        Ok(ids)
    }

    /// Rendered with the chat template and tokenized, each `<image>` expanded to its slots.
    fn render_ids(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>, PromptError> {
        let text = self.renderer.render(messages, add_generation_prompt).map_err(render)?;
        Ok(self.tokenizer.encode_prompt(&text).map_err(render)?.ids)
    }

    /// Raw text, no template and no images.
    pub fn text(&self, text: &str) -> Result<ValidPrompt, PromptError> {
        self.ids(self.tokenize(text)?)
    }

    /// Token ids as sent, no images.
    pub fn ids(&self, ids: Vec<u32>) -> Result<ValidPrompt, PromptError> {
        if ids.contains(&self.tokenizer.image_token_id()) {
            return Err(PromptError::ImageInText);
        }
        self.check(&ids, 0)?;
        Ok(ValidPrompt { ids, images: Vec::new() })
    }

    /// Plain tokenization, one id per `<image>` (what `/tokenize` reports for text).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.tokenizer.encode(text).map_err(render)
    }

    /// One picture as the engine takes it: its pixels, made on the CPU, and their hash.
    pub fn image_input(&self, picture: &DynamicImage) -> Result<ImageInput, PromptError> {
        let pixels = self
            .processor
            .batch(std::slice::from_ref(picture), &Device::Cpu)
            .and_then(|t| Ok(t.squeeze(0)?))
            .map_err(|e| PromptError::Preprocess(e.to_string()))?;
        Ok(ImageInput { pixels, hash: picture_hash(picture) })
    }

    /// The proof: ids inside the vocabulary, one image for each image's worth of slots.
    fn check(&self, ids: &[u32], images: usize) -> Result<(), PromptError> {
        if ids.is_empty() {
            return Err(PromptError::Empty);
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(PromptError::OutsideVocabulary(bad));
        }
        // Every `<image>` was expanded to whole images (encode_prompt) or refused (`ids`), so
        // counting the slots is enough.
        let image_id = self.tokenizer.image_token_id();
        let tokens_per_image = self.tokenizer.tokens_per_image();
        let slots = ids.iter().filter(|&&id| id == image_id).count();
        if slots != images * tokens_per_image {
            return Err(PromptError::SlotCount { slots, images, tokens_per_image });
        }
        Ok(())
    }
}

fn render(e: weft_model::ModelError) -> PromptError {
    PromptError::Render(e.to_string())
}
