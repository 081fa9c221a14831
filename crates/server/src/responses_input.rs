//! A Responses request's input -> the chat messages, tools and tool choice the chat pipeline
//! takes (`prompt.rs`, `structured.rs`), with every refusal naming the Responses field
//! (`input[2].content[0].image_url`), and an answer's output written back as input items for
//! the next turn.

use crate::error::ApiError;
use crate::responses_wire::OutputItem;
use crate::wire::{
    ChatMessage, ContentPart, FunctionDefinition, ImageUrl, MessageContent, NamedFunction, PastFunctionCall,
    PastToolCall, Tool, ToolChoice, VideoUrl,
};
use serde_json::{json, Value};

/// The input as a list of items (a string is one user message).
pub fn input_items(input: &Value) -> Result<Vec<Value>, ApiError> {
    match input {
        Value::String(text) => Ok(vec![json!({"role": "user", "content": text})]),
        Value::Array(items) if !items.is_empty() => Ok(items.clone()),
        Value::Array(_) => Err(ApiError::invalid("input", "at least one input item is required")),
        _ => Err(ApiError::invalid("input", "must be a string or a list of input items")),
    }
}

/// Chat messages from `items` (the first `stored` of them from `previous_response_id`), with
/// the item each message came from; `instructions` become a system message first.
pub struct Converted {
    pub messages: Vec<ChatMessage>,
    /// For each message, the index of its item among the request's own input, or `None` for
    /// the instructions and stored items.
    pub sources: Vec<Option<usize>>,
}

fn message(role: &str, content: Option<MessageContent>) -> ChatMessage {
    ChatMessage { role: role.into(), content, tool_calls: None, tool_call_id: None }
}

fn string_field<'a>(item: &'a Value, key: &str, param: &str) -> Result<&'a str, ApiError> {
    item.get(key).and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{param}.{key}"), "must be a string"))
}

/// One content part of a message item.
fn part(part: &Value, param: &str) -> Result<ContentPart, ApiError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
    Ok(match kind {
        "input_text" | "output_text" | "text" => ContentPart::Text { text: string_field(part, "text", param)?.into() },
        "input_image" => {
            if part.get("file_id").is_some_and(|f| !f.is_null()) {
                return Err(ApiError::invalid(format!("{param}.file_id"), "files are not supported: send image_url"));
            }
            let url = string_field(part, "image_url", param)?.to_string();
            let detail = part.get("detail").and_then(Value::as_str).map(str::to_string);
            ContentPart::ImageUrl { image_url: ImageUrl { url, detail } }
        }
        // Weft's extension, as chat's `video_url` part.
        "input_video" => ContentPart::VideoUrl {
            video_url: VideoUrl {
                url: string_field(part, "video_url", param)?.to_string(),
                num_frames: part.get("num_frames").and_then(Value::as_i64),
            },
        },
        other => {
            return Err(ApiError::invalid(
                format!("{param}.type"),
                format!("unsupported content type {other:?} (expected input_text, input_image or input_video)"),
            ))
        }
    })
}

/// The items as chat messages: consecutive function calls join the assistant turn before
/// them; their outputs are `tool` messages.
pub fn to_messages(items: &[Value], stored: usize, instructions: Option<&str>) -> Result<Converted, ApiError> {
    let mut out = Converted { messages: Vec::new(), sources: Vec::new() };
    if let Some(text) = instructions {
        out.messages.push(message("system", Some(MessageContent::Text(text.into()))));
        out.sources.push(None);
    }
    for (i, item) in items.iter().enumerate() {
        let source = i.checked_sub(stored);
        let param = match source {
            Some(k) => format!("input[{k}]"),
            None => "previous_response_id".into(),
        };
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let role = string_field(item, "role", &param)?;
                let content = match item.get("content") {
                    Some(Value::String(text)) => MessageContent::Text(text.clone()),
                    Some(Value::Array(parts)) => MessageContent::Parts(
                        parts
                            .iter()
                            .enumerate()
                            .map(|(j, p)| part(p, &format!("{param}.content[{j}]")))
                            .collect::<Result<_, _>>()?,
                    ),
                    _ => return Err(ApiError::invalid(format!("{param}.content"), "must be a string or a list")),
                };
                out.messages.push(message(role, Some(content)));
                out.sources.push(source);
            }
            "function_call" => {
                let call = PastToolCall {
                    function: PastFunctionCall {
                        name: string_field(item, "name", &param)?.into(),
                        arguments: string_field(item, "arguments", &param)?.into(),
                    },
                };
                match out.messages.last_mut() {
                    Some(last) if last.role == "assistant" => last.tool_calls.get_or_insert_with(Vec::new).push(call),
                    _ => {
                        let mut m = message("assistant", None);
                        m.tool_calls = Some(vec![call]);
                        out.messages.push(m);
                        out.sources.push(source);
                    }
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    Some(other) if !other.is_null() => other.to_string(),
                    _ => return Err(ApiError::invalid(format!("{param}.output"), "must be a string")),
                };
                let mut m = message("tool", Some(MessageContent::Text(output)));
                m.tool_call_id = item.get("call_id").and_then(Value::as_str).map(str::to_string);
                out.messages.push(m);
                out.sources.push(source);
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{param}.type"),
                    format!(
                        "unsupported item type {other:?} (expected message, function_call or function_call_output)"
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// A refusal from the chat pipeline, renamed to the Responses field: `messages[m]...` is the
/// item message `m` came from, and image and video URLs are strings of their parts there.
pub fn rename_param(mut error: ApiError, sources: &[Option<usize>]) -> ApiError {
    let Some(param) = error.param.take() else { return error };
    let renamed = param
        .strip_prefix("messages[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(m, rest)| {
            let source = sources.get(m.parse::<usize>().ok()?).copied().flatten();
            Some(match source {
                Some(k) => format!("input[{k}]{rest}"),
                None => "previous_response_id".to_string(),
            })
        })
        .unwrap_or_else(|| if param == "messages" { "input".to_string() } else { param.clone() });
    error.param = Some(
        renamed
            .replace(".image_url.url", ".image_url")
            .replace(".video_url.url", ".video_url")
            .replace(".video_url.num_frames", ".num_frames"),
    );
    error
}

/// Function tools (flat, as the Responses API writes them) in chat's shape.
pub fn tools(tools: &[Value]) -> Result<Vec<Tool>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!("only \"function\" tools are supported, not {kind:?}"),
                ));
            }
            let name = string_field(t, "name", &format!("tools[{i}]"))?.to_string();
            let text = |key: &str| t.get(key).and_then(Value::as_str).map(str::to_string);
            Ok(Tool {
                kind: "function".into(),
                function: FunctionDefinition {
                    name,
                    description: text("description"),
                    parameters: t.get("parameters").filter(|p| !p.is_null()).cloned(),
                    strict: t.get("strict").and_then(Value::as_bool),
                },
            })
        })
        .collect()
}

/// `tool_choice` in chat's shape (`{"type": "function", "name": ...}` names a function).
pub fn tool_choice(choice: Option<&Value>) -> Result<Option<ToolChoice>, ApiError> {
    match choice {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(mode)) => Ok(Some(ToolChoice::Mode(mode.clone()))),
        Some(named) if named.get("type").and_then(Value::as_str) == Some("function") => {
            let name = string_field(named, "name", "tool_choice")?.to_string();
            Ok(Some(ToolChoice::Named { kind: "function".into(), function: NamedFunction { name } }))
        }
        Some(_) => Err(ApiError::invalid("tool_choice", "expected \"auto\", \"none\", \"required\" or a function")),
    }
}

/// An answer's output as input items, for the conversation a follow-up continues.
pub fn as_input(output: &[OutputItem]) -> Vec<Value> {
    output
        .iter()
        .map(|item| match item {
            OutputItem::Message { content, .. } => {
                let text: String = content.iter().map(|c| c.text.as_str()).collect();
                json!({"role": "assistant", "content": [{"type": "output_text", "text": text}]})
            }
            OutputItem::FunctionCall { call_id, name, arguments, .. } => {
                json!({"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments})
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_chat_messages_and_refusals_name_the_input() {
        let items = vec![
            json!({"role": "user", "content": "Hi"}),
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Look"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}),
            json!({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}),
            json!({"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"}),
            json!({"type": "function_call_output", "call_id": "c1", "output": "done"}),
        ];
        let c = to_messages(&items, 1, Some("Be brief.")).unwrap();
        let roles: Vec<&str> = c.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "user", "assistant", "tool"]);
        assert_eq!(c.messages[3].tool_calls.as_ref().unwrap().len(), 2, "consecutive calls, one turn");
        assert_eq!(c.sources, [None, None, Some(0), Some(1), Some(3)]);
        let error = ApiError::invalid("messages[2].content[1].image_url.url", "bad");
        assert_eq!(rename_param(error, &c.sources).param.as_deref(), Some("input[0].content[1].image_url"));
        let bad = [json!({"role": "user", "content": [{"type": "input_file", "file_id": "x"}]})];
        assert_eq!(to_messages(&bad, 0, None).err().unwrap().param.as_deref(), Some("input[0].content[0].type"));
        assert_eq!(input_items(&json!(7)).unwrap_err().param.as_deref(), Some("input"));
    }
}
