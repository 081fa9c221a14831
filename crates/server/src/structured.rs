//! Structured outputs on the OpenAI API: `response_format`, vLLM's `structured_outputs` and
//! `tools` with `tool_choice` become one engine grammar, compiled before admission (a bad schema
//! or grammar is a 400 naming the field); tool-call answers are split back into calls, whole
//! or as they stream.

use crate::error::ApiError;
use crate::state::Loaded;
use crate::wire::{ChatCompletionRequest, FunctionCall, ResponseFormat, StructuredOutputs, Tool, ToolChoice};
use serde_json::{json, Value};
use std::sync::Arc;
use weft_engine::{Constraint, Grammar};

/// How a constrained answer is returned.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// `tool_choice` named this function: the answer is its arguments.
    Named(String),
    /// `tool_choice: "required"`: the answer is `{"name": ..., "arguments": ...}` for one of
    /// the tools, which is what the grammar allows.
    AnyOf,
}

/// A grammar to enforce, the request field it came from, and whether the answer is a tool call.
#[derive(Debug, Clone)]
pub struct Plan {
    pub grammar: Grammar,
    pub param: String,
    pub tool: Option<ToolMode>,
}

fn any_object() -> Value {
    json!({"type": "object"})
}

/// vLLM's `structured_outputs`: exactly one constraint.
pub fn from_structured_outputs(so: &StructuredOutputs) -> Result<Plan, ApiError> {
    let param = |field: &str| format!("structured_outputs.{field}");
    let mut found = Vec::new();
    if let Some(schema) = &so.json {
        found.push(("json", Grammar::JsonSchema(schema.clone())));
    }
    if let Some(rx) = &so.regex {
        found.push(("regex", Grammar::Regex(rx.clone())));
    }
    if let Some(choices) = &so.choice {
        if choices.is_empty() {
            return Err(ApiError::invalid(param("choice"), "must list at least one choice"));
        }
        found.push(("choice", Grammar::Choice(choices.clone())));
    }
    if let Some(lark) = &so.grammar {
        found.push(("grammar", Grammar::Lark(lark.clone())));
    }
    if so.json_object == Some(true) {
        found.push(("json_object", Grammar::JsonSchema(any_object())));
    }
    if found.len() != 1 {
        return Err(ApiError::invalid(
            "structured_outputs",
            format!("give exactly one of json, regex, choice, grammar or json_object (got {})", found.len()),
        ));
    }
    let (field, grammar) = found.remove(0);
    Ok(Plan { grammar, param: param(field), tool: None })
}

/// OpenAI's rule for function names, which also keeps them free of JSON escapes.
fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parameters(tool: &Tool) -> Value {
    tool.function.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}))
}

/// `tools` and `tool_choice` -> a grammar for a tool call, or none (`"none"`).
fn from_tools(tools: &[Tool], choice: Option<&ToolChoice>) -> Result<Option<Plan>, ApiError> {
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(format!("tools[{i}].type"), "only \"function\" tools are supported"));
        }
        if !valid_function_name(&tool.function.name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].function.name"),
                "must be 1 to 64 letters, digits, underscores or dashes",
            ));
        }
    }
    match choice {
        None if tools.is_empty() => Ok(None),
        Some(ToolChoice::Mode(mode)) if mode == "none" => Ok(None),
        Some(ToolChoice::Mode(mode)) if mode == "required" => {
            if tools.is_empty() {
                return Err(ApiError::invalid("tool_choice", "\"required\" needs at least one tool in tools"));
            }
            let calls: Vec<Value> = tools
                .iter()
                .map(|t| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
                        "required": ["name", "arguments"],
                        "additionalProperties": false
                    })
                })
                .collect();
            let schema = json!({"anyOf": calls});
            Ok(Some(Plan { grammar: Grammar::JsonSchema(schema), param: "tools".into(), tool: Some(ToolMode::AnyOf) }))
        }
        Some(ToolChoice::Named { kind, function }) => {
            if kind != "function" {
                return Err(ApiError::invalid("tool_choice.type", "must be \"function\""));
            }
            let Some(i) = tools.iter().position(|t| t.function.name == function.name) else {
                return Err(ApiError::invalid(
                    "tool_choice.function.name",
                    format!("no tool named {:?} in tools", function.name),
                ));
            };
            Ok(Some(Plan {
                grammar: Grammar::JsonSchema(parameters(&tools[i])),
                param: format!("tools[{i}].function.parameters"),
                tool: Some(ToolMode::Named(function.name.clone())),
            }))
        }
        // `auto`, given or implied by tools without a tool_choice.
        _ => Err(ApiError::invalid(
            "tool_choice",
            "\"auto\" (the default when tools are given) is not supported: this model was not trained to decide \
             when to call a tool, so Weft cannot tell a call from an answer; send \"required\", \
             {\"type\": \"function\", \"function\": {\"name\": ...}} or \"none\"",
        )),
    }
}

/// The grammar of a chat request, if it asks for one.
pub fn chat_plan(req: &ChatCompletionRequest) -> Result<Option<Plan>, ApiError> {
    let tools = from_tools(req.tools.as_deref().unwrap_or_default(), req.tool_choice.as_ref())?;
    let format = match &req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => {
            Some(Plan { grammar: Grammar::JsonSchema(any_object()), param: "response_format".into(), tool: None })
        }
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(Plan {
            grammar: Grammar::JsonSchema(json_schema.schema.clone().unwrap_or_else(any_object)),
            param: "response_format.json_schema.schema".into(),
            tool: None,
        }),
    };
    let extension = req.structured_outputs.as_ref().map(from_structured_outputs).transpose()?;
    let plans: Vec<Plan> = [tools, format, extension].into_iter().flatten().collect();
    if plans.len() > 1 {
        let names: Vec<&str> = plans.iter().map(|p| p.param.split(['.', '[']).next().unwrap_or("")).collect();
        return Err(ApiError::invalid(
            plans[1].param.split(['.', '[']).next().unwrap_or("").to_string(),
            format!(
                "only one of a tool call, response_format and structured_outputs may constrain the answer (got {})",
                names.join(" and ")
            ),
        ));
    }
    Ok(plans.into_iter().next())
}

/// Compiles the grammar of a plan, if there is one, off the async threads (CPU work).
pub async fn compile_plan(state: &Arc<Loaded>, plan: Option<Plan>) -> Result<Option<Constraint>, ApiError> {
    let Some(plan) = plan else { return Ok(None) };
    let state = state.clone();
    tokio::task::spawn_blocking(move || compile(&state, &plan).map(Some))
        .await
        .map_err(|e| ApiError::new(crate::error::ErrorKind::Internal, e.to_string()))?
}

fn compile(state: &Loaded, plan: &Plan) -> Result<Constraint, ApiError> {
    let compiler = state.constraints.as_ref().map_err(|why| {
        ApiError::invalid(plan.param.clone(), format!("structured outputs are not available for this model: {why}"))
    })?;
    compiler.compile(&plan.grammar).map_err(|e| ApiError::invalid(plan.param.clone(), first_line(&e)))
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or(text).trim().to_string()
}

/// What the `AnyOf` grammar writes before the arguments (its layout is fixed: `", "`, `": "`).
const NAME_PREFIX: &str = "{\"name\": \"";
const ARGUMENTS_PREFIX: &str = "\", \"arguments\": ";

/// Splits one choice's tool-call answer into the function's name and its argument text, as
/// the text arrives.
#[derive(Debug)]
pub struct ToolCallSplitter {
    mode: ToolMode,
    text: String,
    named: bool,
    /// Bytes of argument text handed out so far.
    sent: usize,
}

/// What a piece of generated text added to a tool call.
#[derive(Debug, Default, PartialEq)]
pub struct ToolCallPiece {
    /// The function's name, once, as soon as it is known.
    pub name: Option<String>,
    pub arguments: String,
}

impl ToolCallSplitter {
    pub fn new(mode: ToolMode) -> Self {
        ToolCallSplitter { mode, text: String::new(), named: false, sent: 0 }
    }

    /// The name and where the arguments start, once the text holds them.
    fn header(&self) -> Option<(String, usize)> {
        match &self.mode {
            ToolMode::Named(name) => Some((name.clone(), 0)),
            ToolMode::AnyOf => {
                let rest = self.text.strip_prefix(NAME_PREFIX)?;
                let end = rest.find('"')?;
                let after = &rest[end..];
                after
                    .starts_with(ARGUMENTS_PREFIX)
                    .then(|| (rest[..end].to_string(), NAME_PREFIX.len() + end + ARGUMENTS_PREFIX.len()))
            }
        }
    }

    /// Adds generated text; `last` says it is the end of the answer.
    pub fn push(&mut self, delta: &str, last: bool) -> ToolCallPiece {
        self.text.push_str(delta);
        let Some((name, start)) = self.header() else { return ToolCallPiece::default() };
        let mut end = self.text.len();
        if self.mode == ToolMode::AnyOf {
            // Hold back the last character: it may be the wrapper's closing brace.
            end = if last && self.text.ends_with('}') {
                end - 1
            } else if last {
                end
            } else {
                self.text.char_indices().last().map_or(end, |(i, _)| i)
            };
        }
        let end = end.max(start + self.sent);
        let arguments = self.text[start + self.sent..end].to_string();
        self.sent += arguments.len();
        let name = (!self.named).then(|| {
            self.named = true;
            name
        });
        ToolCallPiece { name, arguments }
    }

    /// Whether the function's name has been handed out.
    pub fn named(&self) -> bool {
        self.named
    }

    /// All the text generated so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The whole call from a whole answer; `None` when the answer stopped before naming one.
    pub fn whole(mode: ToolMode, text: &str) -> Option<FunctionCall> {
        let mut splitter = ToolCallSplitter::new(mode);
        let piece = splitter.push(text, true);
        Some(FunctionCall { name: piece.name?, arguments: piece.arguments })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_calls_are_their_arguments() {
        let call = ToolCallSplitter::whole(ToolMode::Named("get".into()), "{\"a\": 1}").unwrap();
        assert_eq!((call.name.as_str(), call.arguments.as_str()), ("get", "{\"a\": 1}"));
    }

    #[test]
    fn any_of_calls_split_while_streaming_and_whole_alike() {
        let text = "{\"name\": \"weather\", \"arguments\": {\"city\": \"Zürich\"}}";
        let whole = ToolCallSplitter::whole(ToolMode::AnyOf, text).unwrap();
        assert_eq!(whole.name, "weather");
        assert_eq!(whole.arguments, "{\"city\": \"Zürich\"}");
        // Streamed one character at a time, the pieces add up to the same call.
        let mut s = ToolCallSplitter::new(ToolMode::AnyOf);
        let (mut name, mut args) = (None, String::new());
        let chars: Vec<char> = text.chars().collect();
        for (i, c) in chars.iter().enumerate() {
            let piece = s.push(&c.to_string(), i + 1 == chars.len());
            if piece.name.is_some() {
                assert!(name.is_none(), "the name comes once");
                assert!(args.is_empty(), "before any argument text");
                name = piece.name;
            }
            args.push_str(&piece.arguments);
        }
        assert_eq!(name.as_deref(), Some("weather"));
        assert_eq!(args, whole.arguments);
        assert_eq!(ToolCallSplitter::whole(ToolMode::AnyOf, "{\"name\": \"wea"), None);
    }
}
