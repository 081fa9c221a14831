//! Structured outputs on the OpenAI API: `response_format`, vLLM's `structured_outputs` and
//! `tools` with `tool_choice` become one engine grammar, compiled before admission (a bad schema
//! or grammar is a 400 naming the field). Tool calls are written in Qwen's Hermes-style tags
//! (`tool_calls.rs` splits the answers back into calls).

use crate::error::ApiError;
use crate::state::Loaded;
use crate::wire::{ChatCompletionRequest, ResponseFormat, StructuredOutputs, Tool, ToolChoice};
use serde_json::{json, Value};
use std::sync::Arc;
use weft_engine::{Constraint, Grammar};

/// A grammar to enforce, the request field it came from, and the tools the answer may call.
#[derive(Debug, Clone)]
pub struct Plan {
    pub grammar: Grammar,
    pub param: String,
    /// Set when the answer may hold tool calls: the names of the tools it may call.
    pub tools: Option<Vec<String>>,
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
    Ok(Plan { grammar, param: param(field), tools: None })
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

/// What `tool_choice` asks of the answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Calls {
    /// Text, or calls: the model decides (`"auto"`, the default when tools are given).
    Auto,
    /// At least one call of any of the tools (`"required"`).
    Required,
    /// One call of the tool at this index of `tools`.
    Named(usize),
}

/// The object a call of `tool` writes: its name, then its arguments.
fn call_schema(tool: &Tool) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": parameters(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": false
    })
}

/// The grammar of an answer with tool calls (the tags of `tool_calls.rs`): for `Auto`, free
/// text, or text up to `<tool_call>` and then calls only; otherwise calls only. Each call's
/// JSON is constrained by its tool's schema, so every call parses; the lazy `head` ends the
/// text at the first `<tool_call>`, after which only a call can follow.
fn calls_grammar(calls: Calls, bodies: &[Value], parallel: bool) -> Grammar {
    let mut body = if bodies.len() == 1 { bodies[0].clone() } else { json!({"anyOf": bodies}) };
    // The layout the splitter reads (`", "`, `": "`, no other whitespace).
    body["x-guidance"] = weft_engine::constraint::json_layout();
    let more = if parallel && !matches!(calls, Calls::Named(_)) { " more*" } else { "" };
    let start = match calls {
        Calls::Auto => format!("TEXT | first{more}"),
        Calls::Required | Calls::Named(_) => format!("call{more}"),
    };
    Grammar::Lark(format!(
        "%llguidance {{}}\nstart: {start}\nTEXT: /(.|\\n)*/\nhead[lazy]: TEXT \"<tool_call>\"\n\
         first: head \"\\n\" body \"\\n</tool_call>\"\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\n\
         more: \"\\n\" call\nbody: %json {body}\n"
    ))
}

/// Where tool `i`'s field (`type`, `name`, `parameters`) sits in a chat request.
fn chat_tool_field(i: usize, field: &str) -> String {
    match field {
        "type" => format!("tools[{i}].type"),
        _ => format!("tools[{i}].function.{field}"),
    }
}

/// Where tool `i`'s field sits in a Responses request (its tools are flat).
fn responses_tool_field(i: usize, field: &str) -> String {
    format!("tools[{i}].{field}")
}

/// `tools`, `tool_choice` and `parallel_tool_calls` -> the grammar of an answer that may (or
/// must) call them, or none (`"none"`, or no tools). `field` names a tool's fields in errors.
fn from_tools(
    tools: &[Tool],
    choice: Option<&ToolChoice>,
    parallel: bool,
    field: fn(usize, &str) -> String,
) -> Result<Option<Plan>, ApiError> {
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(field(i, "type"), "only \"function\" tools are supported"));
        }
        if !valid_function_name(&tool.function.name) {
            return Err(ApiError::invalid(field(i, "name"), "must be 1 to 64 letters, digits, underscores or dashes"));
        }
        if tool.function.strict == Some(true) {
            check_strict(&parameters(tool), &field(i, "parameters"))?;
        }
    }
    let calls = match choice {
        Some(ToolChoice::Mode(mode)) if mode == "none" => return Ok(None),
        Some(ToolChoice::Mode(mode)) if mode == "auto" => Calls::Auto,
        None => Calls::Auto,
        Some(ToolChoice::Mode(mode)) if mode == "required" => {
            if tools.is_empty() {
                return Err(ApiError::invalid("tool_choice", "\"required\" needs at least one tool in tools"));
            }
            Calls::Required
        }
        Some(ToolChoice::Mode(other)) => {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("unknown value {other:?} (expected \"none\", \"auto\", \"required\" or a named function)"),
            ))
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
            Calls::Named(i)
        }
    };
    if tools.is_empty() {
        return Ok(None); // "auto" with nothing to call
    }
    let (bodies, names, param): (Vec<Value>, Vec<String>, String) = match calls {
        Calls::Named(i) => (vec![call_schema(&tools[i])], vec![tools[i].function.name.clone()], field(i, "parameters")),
        _ => (
            tools.iter().map(call_schema).collect(),
            tools.iter().map(|t| t.function.name.clone()).collect(),
            "tools".into(),
        ),
    };
    Ok(Some(Plan { grammar: calls_grammar(calls, &bodies, parallel), param, tools: Some(names) }))
}

/// A JSON answer: any object, or `schema` (held to OpenAI's strict rules when `strict`).
fn json_plan(schema: Option<Value>, strict: bool, param: &str) -> Result<Plan, ApiError> {
    let schema = schema.unwrap_or_else(any_object);
    if strict {
        check_strict(&schema, param)?;
    }
    Ok(Plan { grammar: Grammar::JsonSchema(schema), param: param.into(), tools: None })
}

/// At most one of `plans` may constrain an answer.
fn at_most_one(plans: Vec<Option<Plan>>, fields: &str) -> Result<Option<Plan>, ApiError> {
    let plans: Vec<Plan> = plans.into_iter().flatten().collect();
    if plans.len() > 1 {
        let names: Vec<&str> = plans.iter().map(|p| p.param.split(['.', '[']).next().unwrap_or("")).collect();
        return Err(ApiError::invalid(
            plans[1].param.split(['.', '[']).next().unwrap_or("").to_string(),
            format!("only one of {fields} may constrain the answer (got {})", names.join(" and ")),
        ));
    }
    Ok(plans.into_iter().next())
}

/// The grammar of a chat request, if it asks for one.
pub fn chat_plan(req: &ChatCompletionRequest) -> Result<Option<Plan>, ApiError> {
    let parallel = req.parallel_tool_calls != Some(false);
    let tools = req.tools.as_deref().unwrap_or_default();
    let tools = from_tools(tools, req.tool_choice.as_ref(), parallel, chat_tool_field)?;
    let format = match &req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(json_plan(None, false, "response_format")?),
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(json_plan(
            json_schema.schema.clone(),
            json_schema.strict == Some(true),
            "response_format.json_schema.schema",
        )?),
    };
    let extension = req.structured_outputs.as_ref().map(from_structured_outputs).transpose()?;
    at_most_one(vec![tools, format, extension], "a tool call, response_format and structured_outputs")
}

/// The grammar of a Responses request (`tools` already in chat's shape), if it asks for one:
/// `text.format` is `{"type": "text" | "json_object" | "json_schema", "schema", "strict"}`.
pub fn responses_plan(
    tools: &[Tool],
    choice: Option<&ToolChoice>,
    parallel: bool,
    text: Option<&Value>,
) -> Result<Option<Plan>, ApiError> {
    let tools = from_tools(tools, choice, parallel, responses_tool_field)?;
    let format = match text.and_then(|t| t.get("format")) {
        None => None,
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(json_plan(None, false, "text.format")?),
            Some("json_schema") => {
                let strict = format.get("strict").and_then(Value::as_bool) == Some(true);
                Some(json_plan(format.get("schema").cloned(), strict, "text.format.schema")?)
            }
            _ => {
                return Err(ApiError::invalid(
                    "text.format.type",
                    "expected \"text\", \"json_object\" or \"json_schema\"",
                ))
            }
        },
    };
    at_most_one(vec![tools, format], "a tool call and text.format")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Example answers against the tool-call grammars, tokenized by the tiny fixture.
    #[test]
    fn tool_call_grammars_take_text_or_calls_that_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v5");
        let tokenizer = std::sync::Arc::new(weft_model::tokenizer::PromptTokenizer::from_dir(&dir, 545, 729).unwrap());
        let eos = weft_model::tokenizer::stop_token_ids(&dir, &tokenizer).unwrap();
        let compiler = weft_engine::ConstraintCompiler::new(tokenizer.clone(), 546, &eos).unwrap();
        let tool = |name: &str| -> Tool {
            serde_json::from_value(json!({"type": "function", "function": {"name": name, "parameters": {
                "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                "additionalProperties": false}}}))
            .unwrap()
        };
        let tools = [tool("f"), tool("g")];
        let check = |choice: Option<ToolChoice>, parallel: bool, text: &str| {
            let plan = from_tools(&tools, choice.as_ref(), parallel, chat_tool_field).unwrap().unwrap();
            let mut constraint = compiler.compile(&plan.grammar).unwrap();
            let ids = tokenizer.encode(text).unwrap();
            constraint.accepts(&ids) == (ids.len(), true)
        };
        let call = |name: &str, n: i32| {
            format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {{\"n\": {n}}}}}\n</tool_call>")
        };
        let auto = |text: &str| check(None, true, text);
        assert!(auto("Just text, a <b> tag and <tool_ca."));
        assert!(auto(&format!("Let me see.{}", call("g", 2))));
        assert!(auto(&format!("{}\n{}", call("f", 1), call("g", 2))), "parallel calls");
        assert!(!check(None, false, &format!("{}\n{}", call("f", 1), call("g", 2))), "one call only");
        assert!(!auto("<tool_call>\nnot json"), "after the tag, only a call");
        assert!(!auto(&format!("{}{}", "<tool_call>\n{\"name\": \"h\"", "")), "only the tools given");
        assert!(!auto(&format!("{} and more text", call("f", 1))), "nothing after the calls");
        assert!(
            !auto("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": \"x\"}}\n</tool_call>"),
            "the schema holds"
        );
        let required = Some(ToolChoice::Mode("required".into()));
        assert!(check(required.clone(), true, &call("g", 3)));
        assert!(!check(required, true, "No call."), "required: a call");
        let named: ToolChoice = serde_json::from_value(json!({"type": "function", "function": {"name": "g"}})).unwrap();
        assert!(check(Some(named.clone()), true, &call("g", 3)));
        assert!(!check(Some(named), true, &call("f", 3)), "the named function only");
        assert!(from_tools(&tools, Some(&ToolChoice::Mode("none".into())), true, chat_tool_field).unwrap().is_none());
    }

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
}
