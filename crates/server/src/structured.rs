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
    /// these tools, which is what the grammar allows.
    AnyOf(Vec<String>),
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

/// OpenAI's rules for a `strict: true` schema: every object is closed (`additionalProperties:
/// false`) and requires all of its properties. `path` names the schema in errors; the walk
/// covers properties, items, the combinators and definitions.
fn check_strict(schema: &Value, path: &str) -> Result<(), ApiError> {
    let Some(object) = schema.as_object() else { return Ok(()) };
    let is_object =
        object.get("type").is_some_and(|t| t == "object" || t.as_array().is_some_and(|a| a.contains(&json!("object"))))
            || object.contains_key("properties");
    if is_object {
        if object.get("additionalProperties") != Some(&Value::Bool(false)) {
            return Err(ApiError::invalid(path, "strict: true needs \"additionalProperties\": false on every object"));
        }
        let required: Vec<&str> =
            object.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let properties = object.get("properties").and_then(Value::as_object);
        if let Some(missing) = properties.into_iter().flat_map(|p| p.keys()).find(|k| !required.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                path,
                format!(
                    "strict: true needs every property in \"required\"; {missing:?} is not (make it nullable instead)"
                ),
            ));
        }
    }
    for (key, value) in object {
        match key.as_str() {
            "properties" | "$defs" | "definitions" | "patternProperties" => {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    check_strict(sub, &format!("{path}.{key}.{name}"))?;
                }
            }
            "anyOf" | "allOf" | "oneOf" | "prefixItems" => {
                for (i, sub) in value.as_array().into_iter().flatten().enumerate() {
                    check_strict(sub, &format!("{path}.{key}[{i}]"))?;
                }
            }
            "items" | "not" | "additionalProperties" | "if" | "then" | "else" => {
                check_strict(value, &format!("{path}.{key}"))?
            }
            _ => {}
        }
    }
    Ok(())
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
        if tool.function.strict == Some(true) {
            check_strict(&parameters(tool), &format!("tools[{i}].function.parameters"))?;
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
            let names = tools.iter().map(|t| t.function.name.clone()).collect();
            Ok(Some(Plan {
                grammar: Grammar::JsonSchema(schema),
                param: "tools".into(),
                tool: Some(ToolMode::AnyOf(names)),
            }))
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
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema.schema.clone().unwrap_or_else(any_object);
            let param = "response_format.json_schema.schema";
            if json_schema.strict == Some(true) {
                check_strict(&schema, param)?;
            }
            Some(Plan { grammar: Grammar::JsonSchema(schema), param: param.into(), tool: None })
        }
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
/// the text arrives. An answer cut off (`max_tokens`) is still a call, with the arguments
/// written so far, once its function is known, as OpenAI returns one.
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

    /// The name and where the arguments start, once the text holds them; with `cut`, from
    /// what there is: a name cut short is the one tool it can still be (if only one), and the
    /// arguments start at the end when their key is not complete.
    fn header(&self, cut: bool) -> Option<(String, usize)> {
        let names = match &self.mode {
            ToolMode::Named(name) => return Some((name.clone(), 0)),
            ToolMode::AnyOf(names) => names,
        };
        let Some(rest) = self.text.strip_prefix(NAME_PREFIX) else {
            let one = cut && NAME_PREFIX.starts_with(self.text.as_str()) && names.len() == 1;
            return one.then(|| (names[0].clone(), self.text.len()));
        };
        match rest.find('"') {
            Some(end) if rest[end..].starts_with(ARGUMENTS_PREFIX) => {
                Some((rest[..end].to_string(), NAME_PREFIX.len() + end + ARGUMENTS_PREFIX.len()))
            }
            Some(end) if cut => Some((rest[..end].to_string(), self.text.len())),
            None if cut => {
                let mut candidates = names.iter().filter(|n| n.starts_with(rest));
                match (candidates.next(), candidates.next()) {
                    (Some(name), None) => Some((name.clone(), self.text.len())),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, delta: &str) -> ToolCallPiece {
        self.text.push_str(delta);
        // Hold back the last character: it may be the wrapper's closing brace.
        let held = self.text.char_indices().last().map_or(0, |(i, _)| i);
        self.take(false, held)
    }

    /// The rest of the call once the answer has ended: whole (`cut` false; the grammar closed
    /// the wrapper's brace, which is not an argument), or cut off by `max_tokens`.
    pub fn finish(&mut self, cut: bool) -> ToolCallPiece {
        let wrapper_brace = matches!(self.mode, ToolMode::AnyOf(_)) && !cut && self.text.ends_with('}');
        let end = self.text.len() - usize::from(wrapper_brace);
        self.take(cut, end)
    }

    /// Hands out the argument text up to `end` (all of it for a named call, which has no
    /// wrapper) and the name, the first time it is known.
    fn take(&mut self, cut: bool, end: usize) -> ToolCallPiece {
        let Some((name, start)) = self.header(cut) else { return ToolCallPiece::default() };
        let end = if matches!(self.mode, ToolMode::Named(_)) { self.text.len() } else { end };
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

    /// The whole call from a whole answer (`cut` as for [`Self::finish`]); `None` when the
    /// answer does not say which function it calls.
    pub fn whole(mode: ToolMode, text: &str, cut: bool) -> Option<FunctionCall> {
        let mut splitter = ToolCallSplitter::new(mode);
        let mut piece = splitter.push(text);
        let rest = splitter.finish(cut);
        piece.arguments.push_str(&rest.arguments);
        Some(FunctionCall { name: piece.name.or(rest.name)?, arguments: piece.arguments })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_schemas_follow_openais_rules() {
        let closed = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
            "required": ["b"], "additionalProperties": false}}, "required": ["a"], "additionalProperties": false});
        assert!(check_strict(&closed, "s").is_ok());
        let mut open = closed.clone();
        open["properties"]["a"].as_object_mut().unwrap().remove("additionalProperties");
        assert_eq!(check_strict(&open, "s").unwrap_err().param.as_deref(), Some("s.properties.a"));
        let mut optional = closed.clone();
        optional["required"] = json!([]);
        let err = check_strict(&optional, "s").unwrap_err();
        assert!(err.message.contains("\"a\""), "{}", err.message);
        let defs = json!({"$defs": {"Room": {"type": "object", "properties": {}}}, "type": "array", "items": {"$ref": "#/$defs/Room"}});
        assert_eq!(check_strict(&defs, "s").unwrap_err().param.as_deref(), Some("s.$defs.Room"));
        let nested = json!({"anyOf": [{"type": "string"}, {"type": ["object", "null"], "properties": {"x": {}}, "required": ["x"]}]});
        assert_eq!(check_strict(&nested, "s").unwrap_err().param.as_deref(), Some("s.anyOf[1]"));
    }

    fn any_of() -> ToolMode {
        ToolMode::AnyOf(vec!["weather".into(), "wake".into()])
    }

    #[test]
    fn named_calls_are_their_arguments() {
        let call = ToolCallSplitter::whole(ToolMode::Named("get".into()), "{\"a\": 1}", false).unwrap();
        assert_eq!((call.name.as_str(), call.arguments.as_str()), ("get", "{\"a\": 1}"));
        let cut = ToolCallSplitter::whole(ToolMode::Named("get".into()), "{\"a\": ", true).unwrap();
        assert_eq!((cut.name.as_str(), cut.arguments.as_str()), ("get", "{\"a\": "));
    }

    #[test]
    fn any_of_calls_split_while_streaming_and_whole_alike() {
        let text = "{\"name\": \"weather\", \"arguments\": {\"city\": \"Zürich\"}}";
        let whole = ToolCallSplitter::whole(any_of(), text, false).unwrap();
        assert_eq!(whole.name, "weather");
        assert_eq!(whole.arguments, "{\"city\": \"Zürich\"}");
        // Streamed one character at a time, the pieces add up to the same call.
        let mut s = ToolCallSplitter::new(any_of());
        let (mut name, mut args) = (None, String::new());
        let pieces = text.chars().map(|c| s.push(&c.to_string())).collect::<Vec<_>>();
        for piece in pieces.into_iter().chain([s.finish(false)]) {
            if piece.name.is_some() {
                assert!(name.is_none(), "the name comes once");
                assert!(args.is_empty(), "before any argument text");
                name = piece.name;
            }
            args.push_str(&piece.arguments);
        }
        assert_eq!(name.as_deref(), Some("weather"));
        assert_eq!(args, whole.arguments);
    }

    #[test]
    fn a_call_cut_off_is_a_call_once_its_function_is_known() {
        let cut = |text: &str| ToolCallSplitter::whole(any_of(), text, true).map(|c| (c.name, c.arguments));
        let call = |name: &str, args: &str| Some((name.to_string(), args.to_string()));
        // Inside the arguments: all of them so far, a closing brace included (it is theirs).
        assert_eq!(cut("{\"name\": \"wake\", \"arguments\": {\"h\": {\"x\": 1}"), call("wake", "{\"h\": {\"x\": 1}"));
        // Before the arguments, after the name: the call with no argument text.
        assert_eq!(cut("{\"name\": \"weather\", \"argum"), call("weather", ""));
        assert_eq!(cut("{\"name\": \"weather\""), call("weather", ""));
        // Inside the name: the one tool it can still be, or none.
        assert_eq!(cut("{\"name\": \"wea"), call("weather", ""));
        assert_eq!(cut("{\"name\": \"w"), None);
        assert_eq!(cut("{\"na"), None);
        let one = ToolMode::AnyOf(vec!["weather".into()]);
        assert_eq!(ToolCallSplitter::whole(one, "{\"na", true).map(|c| c.name), Some("weather".into()));
        // Not cut: an unfinished header says nothing yet.
        assert_eq!(ToolCallSplitter::whole(any_of(), "{\"name\": \"wea", false), None);
    }
}
