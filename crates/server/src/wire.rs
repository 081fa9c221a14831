//! OpenAI wire types (requests, responses, stream chunks), with their OpenAPI schemas.
//! Request fields Weft does not know are collected and refused (see `fields.rs`), as OpenAI's
//! own API refuses unrecognized arguments.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use utoipa::ToSchema;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and text completions (OpenAI's, plus vLLM's extensions).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension: keep only the k most likely tokens.
    pub top_k: Option<i64>,
    /// Extension: drop tokens less likely than min_p times the most likely one.
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Extension: Hugging Face's repetition penalty.
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    /// Extension: token ids that end generation.
    pub stop_token_ids: Option<Vec<u32>>,
    /// Extension: keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Accepted for compatibility and logged with the request.
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ImageUrl {
    /// `data:image/...;base64,...`
    pub url: String,
    /// Accepted and ignored (every image is 384x384 for this model).
    #[allow(dead_code)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct VideoUrl {
    pub url: String,
    /// Frames to sample uniformly (server default when absent).
    pub num_frames: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
    VideoUrl { video_url: VideoUrl },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool` (`developer` is treated as `system`).
    pub role: String,
    pub content: Option<MessageContent>,
    /// An earlier answer's tool calls (assistant messages), put back into the prompt as the
    /// JSON the model wrote.
    pub tool_calls: Option<Vec<PastToolCall>>,
    /// Which call a `tool` message answers (kept for the client; the prompt has them in order).
    #[allow(dead_code)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PastToolCall {
    pub function: PastFunctionCall,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PastFunctionCall {
    pub name: String,
    pub arguments: String,
}

/// `response_format`: free text, any JSON object, or JSON matching a schema.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[allow(dead_code)] // `name` and `description` are part of the wire format only
pub struct JsonSchemaFormat {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema; absent means any JSON object.
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
    /// The schema is always enforced; `true` also holds it to OpenAI's strict rules (every
    /// object closed, every property required), or the request is a 400.
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs` extension: exactly one of its constraints.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    #[schema(value_type = Option<Object>)]
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A Lark grammar.
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[allow(dead_code)] // `description` is part of the wire format only
pub struct FunctionDefinition {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments; absent means no arguments (`{}`).
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// The parameters' schema is always enforced; `true` also holds it to OpenAI's strict
    /// rules, as for `response_format`.
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NamedFunction {
    pub name: String,
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<ResponseFormat>,
    /// Extension (vLLM): regex, choice, Lark grammar or JSON schema.
    pub structured_outputs: Option<StructuredOutputs>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    /// `false`: at most one tool call per answer (default: several may follow one another).
    pub parallel_tool_calls: Option<bool>,
    /// Every other field, checked against the table of accepted-and-ignored fields.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

/// `prompt`: a string, a list of strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Number of most likely alternatives to return per token.
    pub logprobs: Option<i64>,
    /// Not supported: `true` is refused.
    #[serde(default)]
    pub echo: bool,
    /// Extension (vLLM): regex, choice, Lark grammar or JSON schema.
    pub structured_outputs: Option<StructuredOutputs>,
    /// Every other field, checked against the table of accepted-and-ignored fields.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
    /// Extension: prompt tokens that are image or video-frame slots.
    pub image_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the answer is a tool call.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as JSON text, matching the function's parameters schema.
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

/// A piece of a streamed tool call: the first names it, the rest add argument text.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageBody,
    /// Extension: the frame indices sampled from each video part, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub video_frames: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
}

/// One position's most likely tokens as a JSON object of token text -> logprob, most likely
/// first (a map in a fixed order: the same answer is the same bytes); a text two tokens share
/// keeps the more likely one's logprob.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankedLogprobs(pub Vec<(String, f32)>);

impl Serialize for RankedLogprobs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut seen = std::collections::HashSet::new();
        let mut map = serializer.serialize_map(None)?;
        for (text, logprob) in self.0.iter().filter(|(t, _)| seen.insert(t.as_str())) {
            map.serialize_entry(text, logprob)?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per position, token text -> logprob, most likely first.
    #[schema(value_type = Vec<HashMap<String, f32>>)]
    pub top_logprobs: Vec<RankedLogprobs>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Extension: context length in tokens.
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `POST /tokenize`: chat messages or a prompt.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<String>,
    #[serde(default = "default_true")]
    pub add_generation_prompt: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Images and video frames counted in the prompt.
    pub images: usize,
    pub image_tokens: usize,
}
