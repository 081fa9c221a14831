//! Structured outputs in the engine on the tiny fixture, whose random weights would never
//! write JSON by themselves: every answer under a grammar matches it, greedy or sampled, for
//! every choice, while free requests in the same batch are unchanged.

use serde_json::{json, Value};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use weft_engine::{
    Constraint, ConstraintCompiler, Engine, EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest, Grammar,
    PromptBuilder,
};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{Message, Part, PromptRenderer};
use weft_model::tokenizer::{stop_token_ids, PromptTokenizer};
use weft_model::{LlavaModel, LoadOptions};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v5")
}

struct Setup {
    handle: EngineHandle,
    prompts: PromptBuilder,
    compiler: ConstraintCompiler,
}

fn start() -> Setup {
    let dir = fixture();
    let model = LlavaModel::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = model.config().clone();
    let tokenizer = Arc::new(PromptTokenizer::from_dir(&dir, cfg.image_token_id, cfg.tokens_per_image()).unwrap());
    let eos = stop_token_ids(&dir, &tokenizer).unwrap();
    let compiler = ConstraintCompiler::new(tokenizer.clone(), cfg.text.vocab_size, &eos).unwrap();
    let config = EngineConfig { eos_token_ids: eos, ..EngineConfig::default() };
    let processor = ImageProcessor::from_dir(&dir, cfg.vision.image_size).unwrap();
    let prompts = PromptBuilder::new(tokenizer.clone(), PromptRenderer::BuiltIn, processor, &cfg);
    Setup { handle: Engine::start(model, tokenizer, config).unwrap(), prompts, compiler }
}

fn request(s: &Setup, question: &str, constraint: Option<Constraint>, max_tokens: usize) -> GenerateRequest {
    let messages = [Message { role: "user".into(), parts: vec![Part::Text(question.into())] }];
    let prompt = s.prompts.chat(&messages, &[], true).unwrap();
    let mut r = GenerateRequest::new(prompt, NonZeroUsize::new(max_tokens).unwrap());
    r.sampling.temperature = 0.0;
    r.constraint = constraint;
    r
}

/// Text and finish reason of every choice.
fn run(s: &Setup, r: GenerateRequest) -> Vec<(String, FinishReason)> {
    let n = r.n.get();
    let mut stream = s.handle.submit(r).unwrap();
    let mut out = vec![(String::new(), FinishReason::Length); n];
    while let Some(event) = stream.blocking_next() {
        match event {
            Event::Token { index, text, .. } => out[index].0.push_str(&text),
            Event::Finished { index, reason, text, .. } => {
                out[index].0.push_str(&text);
                out[index].1 = reason;
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    out
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog", "bird"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 12},
            "where": {"type": "object", "properties": {"room": {"type": "string", "maxLength": 8}}, "required": ["room"], "additionalProperties": false},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
            "indoor": {"type": "boolean"}
        },
        "required": ["kind", "count", "where", "tags", "indoor"],
        "additionalProperties": false
    })
}

fn check_against_schema(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 5, "{text}");
    assert!(["cat", "dog", "bird"].contains(&obj["kind"].as_str().unwrap()), "{text}");
    let count = obj["count"].as_i64().unwrap();
    assert!((1..=12).contains(&count), "{text}");
    assert!(obj["where"]["room"].as_str().unwrap().chars().count() <= 8, "{text}");
    let tags = obj["tags"].as_array().unwrap();
    assert!(tags.len() <= 3 && tags.iter().all(|t| t.as_str().unwrap().chars().count() <= 5), "{text}");
    assert!(obj["indoor"].is_boolean(), "{text}");
}

#[test]
fn json_schema_answers_validate_greedy_and_sampled_for_every_choice() {
    let s = start();
    let constraint = s.compiler.compile(&Grammar::JsonSchema(schema())).unwrap();
    let (text, reason) = run(&s, request(&s, "Describe the animal as JSON.", Some(constraint.clone()), 200)).remove(0);
    check_against_schema(&text);
    assert_eq!(reason, FinishReason::Stop, "the grammar ends the answer");
    let mut sampled = request(&s, "Describe the animal as JSON.", Some(constraint), 200);
    sampled.sampling.temperature = 1.0;
    sampled.sampling.seed = Some(5);
    sampled.n = NonZeroUsize::new(3).unwrap();
    for (text, reason) in run(&s, sampled) {
        check_against_schema(&text);
        assert_eq!(reason, FinishReason::Stop);
    }
}

#[test]
fn regex_choice_and_lark_answers_match() {
    let s = start();
    let rx = s.compiler.compile(&Grammar::Regex("[0-9]{3}-[a-z]{2,4}".into())).unwrap();
    let mut r = request(&s, "A code please.", Some(rx), 50);
    r.sampling.temperature = 1.0;
    r.sampling.seed = Some(1);
    r.n = NonZeroUsize::new(4).unwrap();
    for (text, _) in run(&s, r) {
        let (digits, letters) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
        assert!(digits.len() == 3 && digits.chars().all(|c| c.is_ascii_digit()), "{text:?}");
        assert!((2..=4).contains(&letters.len()) && letters.chars().all(|c| c.is_ascii_lowercase()), "{text:?}");
    }
    let choices = vec!["yes".to_string(), "no".to_string(), "say \"maybe\"".to_string()];
    let choice = s.compiler.compile(&Grammar::Choice(choices.clone())).unwrap();
    let mut r = request(&s, "Well?", Some(choice), 50);
    r.sampling.temperature = 1.0;
    r.sampling.seed = Some(2);
    r.n = NonZeroUsize::new(4).unwrap();
    for (text, reason) in run(&s, r) {
        assert!(choices.contains(&text), "{text:?}");
        assert_eq!(reason, FinishReason::Stop);
    }
    let lark = s.compiler.compile(&Grammar::Lark("start: \"(\" NUM (\"+\" NUM)* \")\"\nNUM: /[1-9]/".into())).unwrap();
    let (text, _) = run(&s, request(&s, "Add.", Some(lark), 40)).remove(0);
    let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')')).unwrap_or_else(|| panic!("{text:?}"));
    assert!(inner.split('+').all(|n| n.len() == 1 && n != "0"), "{text:?}");
}

#[test]
fn free_requests_batched_with_constrained_ones_are_unchanged() {
    let s = start();
    let free = request(&s, "Write a short poem about the sea.", None, 24);
    let alone = run(&s, free.clone());
    let constraint = s.compiler.compile(&Grammar::JsonSchema(schema())).unwrap();
    let streams: Vec<_> = (0..3)
        .map(|i| {
            let r = if i == 1 { free.clone() } else { request(&s, "JSON.", Some(constraint.clone()), 200) };
            s.handle.submit(r).unwrap()
        })
        .collect();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let mut text = String::new();
        while let Some(event) = stream.blocking_next() {
            match event {
                Event::Token { text: t, .. } | Event::Finished { text: t, .. } => text.push_str(&t),
                Event::Error(e) => panic!("{e}"),
            }
        }
        if i == 1 {
            assert_eq!(text, alone[0].0);
        } else {
            check_against_schema(&text);
        }
    }
}

#[test]
fn bad_grammars_are_refused_with_the_reason() {
    let s = start();
    for bad in [
        Grammar::Regex("[0-9".into()),
        Grammar::Lark("start: missing_rule".into()),
        Grammar::JsonSchema(json!({"type": "no-such-type"})),
    ] {
        let err = s.compiler.compile(&bad).unwrap_err();
        assert!(!err.is_empty(), "{bad:?}");
    }
}
