//! Chat messages -> prompt text: the built-in llava-interleave renderer (byte-identical to the
//! checkpoint's template when images precede text, client order kept otherwise) and arbitrary
//! Hugging Face Jinja templates through minijinja.

use crate::error::{ModelError, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The placeholder that stands for one image (or one video frame) in prompt text.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// One piece of a message's content, in the order the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image,
    /// A video of this many sampled frames: one image slot per frame.
    Video {
        frames: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub parts: Vec<Part>,
}

impl Message {
    pub fn text(role: &str, text: &str) -> Self {
        Message { role: role.to_string(), parts: vec![Part::Text(text.to_string())] }
    }

    /// Number of image slots (images plus video frames) the message needs.
    pub fn image_slots(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(_) => 0,
                Part::Image => 1,
                Part::Video { frames } => *frames,
            })
            .sum()
    }
}

/// Renders ChatML as the llava-interleave template does: `<|im_start|>role\n`, then each part in
/// order (image -> `<image>`, text -> `\n` + text, video -> one `<image>` per frame), then
/// `<|im_end|>\n`. When a message's images come first this is exactly the checkpoint template.
pub fn render_builtin(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        for part in &m.parts {
            match part {
                Part::Text(t) => {
                    out.push('\n');
                    out.push_str(t);
                }
                Part::Image => out.push_str(IMAGE_PLACEHOLDER),
                Part::Video { frames } => out.push_str(&IMAGE_PLACEHOLDER.repeat(*frames)),
            }
        }
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// Messages in the shape Hugging Face templates expect (`content` as a list of typed parts;
/// a video becomes one image entry per frame, since that is what the model sees).
fn messages_json(messages: &[Message]) -> Value {
    let list: Vec<Value> = messages
        .iter()
        .map(|m| {
            let content: Vec<Value> = m
                .parts
                .iter()
                .flat_map(|p| match p {
                    Part::Text(t) => vec![json!({"type": "text", "text": t})],
                    Part::Image => vec![json!({"type": "image"})],
                    Part::Video { frames } => vec![json!({"type": "image"}); *frames],
                })
                .collect();
            json!({"role": m.role, "content": content})
        })
        .collect();
    Value::Array(list)
}

/// A compiled Hugging Face chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl ChatTemplate {
    pub fn new(source: String) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::Prompt(format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
        Self::new(source).map_err(|e| ModelError::file(path, e))
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(minijinja::context! {
                messages => messages_json(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => "",
                eos_token => "<|im_end|>",
            })
            .map_err(|e| ModelError::Prompt(format!("chat template failed: {e}")))
    }
}

/// The checkpoint's own template, wherever this transformers version put it:
/// `chat_template.jinja`, `chat_template.json`, or `tokenizer_config.json`.
pub fn checkpoint_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| ModelError::file(&jinja, e));
    }
    for name in ["chat_template.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::file(&path, e))?;
        match v.get("chat_template") {
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            // A list of named templates: take the one called "default".
            Some(Value::Array(items)) => {
                let default = items.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                if let Some(s) = default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                    return Ok(Some(s.to_string()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// How prompts are rendered: the built-in renderer, or a user-supplied Jinja template.
pub enum PromptRenderer {
    BuiltIn,
    Jinja(Box<ChatTemplate>),
}

impl PromptRenderer {
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match self {
            PromptRenderer::BuiltIn => Ok(render_builtin(messages, add_generation_prompt)),
            PromptRenderer::Jinja(t) => t.render(messages, add_generation_prompt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template the llava-interleave checkpoints ship (images first, then texts).
    pub const INTERLEAVE_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn user(parts: Vec<Part>) -> Message {
        Message { role: "user".into(), parts }
    }

    #[test]
    fn builtin_matches_the_documented_example() {
        let m = [user(vec![Part::Image, Part::Image, Part::Text("Q".into())])];
        assert_eq!(render_builtin(&m, true), "<|im_start|>user\n<image><image>\nQ<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn builtin_equals_checkpoint_template_when_images_lead() {
        let t = ChatTemplate::new(INTERLEAVE_TEMPLATE.to_string()).unwrap();
        let conversations = vec![
            vec![Message::text("user", "Hi")],
            vec![
                Message::text("system", "You are a helpful assistant."),
                user(vec![Part::Image, Part::Text("What is this?".into()), Part::Text("Be brief.".into())]),
                Message::text("assistant", "A cat."),
                user(vec![Part::Video { frames: 3 }, Part::Text("And now?".into())]),
            ],
        ];
        for messages in conversations {
            for gen in [false, true] {
                assert_eq!(render_builtin(&messages, gen), t.render(&messages, gen).unwrap());
            }
        }
    }

    #[test]
    fn builtin_keeps_client_order_when_text_leads() {
        let m = [user(vec![Part::Text("Compare".into()), Part::Image, Part::Text("with".into()), Part::Image])];
        assert_eq!(render_builtin(&m, false), "<|im_start|>user\n\nCompare<image>\nwith<image><|im_end|>\n");
    }

    #[test]
    fn bad_template_is_an_error() {
        assert!(ChatTemplate::new("{% for %}".into()).is_err());
        let t = ChatTemplate::new("{{ raise_exception('no') }}".into()).unwrap();
        assert!(t.render(&[], false).unwrap_err().to_string().contains("no"));
    }
}
