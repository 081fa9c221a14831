//! Constrained decoding (structured outputs) with llguidance: a grammar — a JSON schema, a
//! regular expression, a Lark grammar or a list of choices — is compiled once per request
//! into a token-level matcher; each choice holds its own copy, which masks the logits before
//! every draw and advances with every sampled token. Constrained and free sequences share a
//! batch: only the sampling of a constrained one changes.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;
use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use weft_model::tokenizer::PromptTokenizer;

/// What a request asks its answer to match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON schema (`{"type": "object"}` for any object).
    JsonSchema(Value),
    /// A regular expression (Rust `regex` syntax) the whole answer must match.
    Regex(String),
    /// A Lark grammar (llguidance's dialect, which also embeds JSON schemas and regexes).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// How JSON answers are laid out unless the schema says otherwise (`x-guidance`): one space
/// after `,` and `:`, as Python's `json.dumps` writes, and no other whitespace, so that a model
/// cannot spend its tokens on blank space. (Lark grammars that embed `%json` set it themselves.)
pub fn json_layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl Grammar {
    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(json_layout);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Grammar::Choice(choices) => {
                // Each choice as a JSON-quoted Lark literal, which escapes everything it needs.
                let alternatives: Vec<String> = choices.iter().map(|c| Value::String(c.clone()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
        }
    }
}

/// The model's vocabulary as llguidance sees it: every token's bytes (byte-level BPE decoded;
/// special tokens marked so that no grammar can produce them), over the rows of the logits.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<PromptTokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode(text).unwrap_or_default())
    }
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for the
/// code points from U+0100 on, in order.
fn byte_level_alphabet() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                next += 1;
                (char::from_u32(next - 1).expect("valid code point"), b)
            }
        })
        .collect()
}

/// Compiles grammars for one model; built once at start-up (building the token trie and the
/// mask slices takes a moment for a 150k vocabulary).
pub struct ConstraintCompiler {
    factory: ParserFactory,
}

impl ConstraintCompiler {
    /// `logit_rows`: the width of the logits (may exceed the tokenizer's vocabulary);
    /// `eos_ids`: the tokens that end an answer (the first is the grammar's end token).
    pub fn new(tokenizer: Arc<PromptTokenizer>, logit_rows: usize, eos_ids: &[u32]) -> Result<Self, String> {
        let eos = *eos_ids.first().ok_or("the model has no end-of-sequence token")?;
        let alphabet = byte_level_alphabet();
        let hf = tokenizer.inner();
        let specials: std::collections::HashSet<u32> =
            hf.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        let words: Vec<Vec<u8>> = (0..logit_rows as u32)
            .map(|id| {
                let special_word = |name: &str| [&[TokTrie::SPECIAL_TOKEN_MARKER][..], name.as_bytes()].concat();
                match hf.id_to_token(id) {
                    Some(name) if specials.contains(&id) => special_word(&name),
                    Some(name) => match name.chars().map(|c| alphabet.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                        Some(bytes) => bytes,
                        // An added, non-special token stored as plain text.
                        None => name.into_bytes(),
                    },
                    // Rows of the logits past the vocabulary: never allowed.
                    None => special_word(&format!("<[{id}]>")),
                }
            })
            .collect();
        let mut info = TokRxInfo::new(logit_rows as u32, eos);
        info.tok_end_of_turn = eos_ids.get(1).copied();
        let trie = TokTrie::from(&info, &words);
        let env: toktrie::TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(ConstraintCompiler { factory })
    }

    /// Compiles `grammar`; the error says what is wrong with it (for a 400).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let parser = self.factory.create_parser(grammar.to_llguidance()).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher })
    }
}

/// One choice's position in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    /// A fresh copy for another choice of the same request.
    fn clone(&self) -> Self {
        Constraint { matcher: self.matcher.deep_clone() }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// The tokens allowed next, as bits (bit `i % 32` of word `i / 32` allows token `i`); the
    /// end-of-sequence token is among them once the answer is complete.
    pub(crate) fn allowed(&mut self) -> Result<Vec<u32>, String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        Ok(mask.as_slice().to_vec())
    }

    /// Moves past a sampled token (never an end-of-sequence token).
    pub(crate) fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether the grammar admits nothing more.
    pub(crate) fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// How many of `tokens` the grammar accepts in a row, and whether it could end there (for
    /// checking a grammar against example answers).
    pub fn accepts(&mut self, tokens: &[u32]) -> (usize, bool) {
        let taken = tokens.iter().take_while(|&&t| self.matcher.consume_token(t).is_ok()).count();
        (taken, taken == tokens.len() && self.matcher.is_accepting().unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let a = byte_level_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[&'Ġ'], b' ');
        assert_eq!(a[&'Ċ'], b'\n');
        assert_eq!(a[&'A'], b'A');
        let mut bytes: Vec<u8> = a.values().copied().collect();
        bytes.sort();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
    }
}
