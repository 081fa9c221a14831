//! The request fields Weft accepts without acting on them, each with its reason; every other
//! field it does not implement is refused with a 400 naming it (as OpenAI's API refuses an
//! unrecognized argument). `docs/api.md` repeats these tables, and the SDK test walks OpenAI's
//! own request schema against the server.

use crate::error::ApiError;
use serde_json::{Map, Value};

/// How a field outside the typed request is treated.
enum Policy {
    /// Accepted and ignored, for this reason; the check refuses values Weft cannot honour.
    Ignored(&'static str, fn(&Value) -> Result<(), String>),
    /// Part of OpenAI's API but not supported, for this reason.
    Refused(&'static str),
}

use Policy::*;

fn any(_: &Value) -> Result<(), String> {
    Ok(())
}

fn false_only(v: &Value) -> Result<(), String> {
    if v == &Value::Bool(true) {
        return Err("Weft does not store completions".into());
    }
    Ok(())
}

fn text_only(v: &Value) -> Result<(), String> {
    match v.as_array() {
        Some(list) if list.iter().all(|m| m == "text") => Ok(()),
        _ => Err("this model produces text only: [\"text\"] is the one accepted value".into()),
    }
}

fn one_only(v: &Value) -> Result<(), String> {
    if v.as_i64() == Some(1) {
        return Ok(());
    }
    Err("only 1 is supported (n gives several choices)".into())
}

/// Chat completion fields beyond the ones `wire::ChatCompletionRequest` implements.
const CHAT: &[(&str, Policy)] = &[
    ("metadata", Ignored("Weft keeps no stored completions for metadata to label", any)),
    ("store", Ignored("Weft keeps no completions; `true` is refused", false_only)),
    ("service_tier", Ignored("there is one tier: every request is scheduled alike", any)),
    ("prompt_cache_key", Ignored("the prefix cache is automatic and keyed by content", any)),
    (
        "prompt_cache_retention",
        Ignored("the prefix cache is automatic: full blocks stay in the KV pool until their blocks are needed", any),
    ),
    ("safety_identifier", Ignored("no abuse monitoring runs here to read it", any)),
    ("reasoning_effort", Ignored("the model has no reasoning mode", any)),
    ("verbosity", Ignored("the model has no verbosity control", any)),
    ("modalities", Ignored("text is the only output; anything else is refused", text_only)),
    ("audio", Refused("this model produces no audio")),
    ("prediction", Refused("predicted outputs are not supported")),
    ("web_search_options", Refused("Weft has no web search")),
    ("functions", Refused("deprecated by OpenAI: send tools")),
    ("function_call", Refused("deprecated by OpenAI: send tool_choice")),
];

/// Text completion fields beyond the ones `wire::CompletionRequest` implements.
const COMPLETIONS: &[(&str, Policy)] = &[
    ("best_of", Ignored("1 is the only value accepted (n gives several choices)", one_only)),
    ("suffix", Refused("insertion (a suffix after the completion) is not supported")),
];

fn disabled_only(v: &Value) -> Result<(), String> {
    if v != "disabled" {
        return Err("Weft never drops input to fit the context: \"disabled\" is the one accepted value".into());
    }
    Ok(())
}

fn false_only_background(v: &Value) -> Result<(), String> {
    if v == &Value::Bool(true) {
        return Err("responses run while the client waits: background mode is not supported".into());
    }
    Ok(())
}

/// Responses API fields beyond the ones `responses_wire::ResponsesRequest` implements.
const RESPONSES: &[(&str, Policy)] = &[
    ("truncation", Ignored("Weft never drops input to fit the context; \"auto\" is refused", disabled_only)),
    ("include", Ignored("there is nothing extra to include: no reasoning, files or searches", any)),
    ("reasoning", Ignored("the model has no reasoning mode", any)),
    ("background", Ignored("responses run while the client waits; `true` is refused", false_only_background)),
    ("stream_options", Ignored("events are never obfuscated here", any)),
    ("service_tier", Ignored("there is one tier: every request is scheduled alike", any)),
    ("prompt_cache_key", Ignored("the prefix cache is automatic and keyed by content", any)),
    ("safety_identifier", Ignored("no abuse monitoring runs here to read it", any)),
    ("top_logprobs", Refused("use /v1/chat/completions for logprobs")),
    ("conversation", Refused("conversations are not kept: continue with previous_response_id")),
    ("prompt", Refused("stored prompt templates are not supported")),
    ("max_tool_calls", Refused("not supported: parallel_tool_calls false allows one call")),
];

/// Every accepted-and-ignored field with its reason (chat, completions, then responses), as
/// `docs/api.md` must list them.
#[cfg(test)]
fn ignored_fields() -> Vec<(&'static str, &'static str)> {
    CHAT.iter()
        .chain(COMPLETIONS)
        .chain(RESPONSES)
        .filter_map(|(name, p)| match p {
            Ignored(why, _) => Some((*name, *why)),
            Refused(_) => None,
        })
        .collect()
}

fn check(other: &Map<String, Value>, table: &[(&str, Policy)]) -> Result<(), ApiError> {
    for (field, value) in other {
        // An explicit null is the same as leaving the field out.
        if value.is_null() {
            continue;
        }
        match table.iter().find(|(name, _)| name == field) {
            Some((_, Ignored(reason, check))) => {
                check(value).map_err(|why| ApiError::invalid(field.clone(), why))?;
                tracing::debug!(field, reason, "request field accepted and ignored");
            }
            Some((_, Refused(why))) => return Err(ApiError::invalid(field.clone(), format!("not supported: {why}"))),
            None => {
                return Err(ApiError::invalid(
                    field.clone(),
                    format!("unrecognized request argument supplied: {field}"),
                ))
            }
        }
    }
    Ok(())
}

/// Refuses the chat fields Weft does not implement and does not ignore.
pub fn check_chat(other: &Map<String, Value>) -> Result<(), ApiError> {
    check(other, CHAT)
}

/// Refuses the completion fields Weft does not implement and does not ignore.
pub fn check_completions(other: &Map<String, Value>) -> Result<(), ApiError> {
    check(other, COMPLETIONS)
}

/// Refuses the Responses API fields Weft does not implement and does not ignore.
pub fn check_responses(other: &Map<String, Value>) -> Result<(), ApiError> {
    check(other, RESPONSES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// docs/api.md lists every ignored field with its reason, word for word.
    #[test]
    fn the_api_doc_lists_every_ignored_field() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).unwrap();
        for (name, why) in ignored_fields() {
            assert!(doc.contains(&format!("| `{name}` | {why} |")), "docs/api.md does not list `{name}`: {why}");
        }
    }

    #[test]
    fn unknown_and_refused_fields_name_themselves() {
        let map = |v: Value| v.as_object().unwrap().clone();
        assert!(check_chat(&map(json!({"metadata": {"a": "b"}, "store": false, "audio": null}))).is_ok());
        for (body, field) in [
            (json!({"store": true}), "store"),
            (json!({"audio": {"voice": "alloy"}}), "audio"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"no_such_field": 1}), "no_such_field"),
        ] {
            let err = check_chat(&map(body)).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field));
        }
        assert!(check_completions(&map(json!({"best_of": 1}))).is_ok());
        assert_eq!(check_completions(&map(json!({"best_of": 3}))).unwrap_err().param.as_deref(), Some("best_of"));
    }
}
