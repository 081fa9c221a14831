//! Tool calls in the model family's (Qwen's Hermes-style) format: the tools written into the
//! system prompt, past calls and tool results written back for the next turn, and answers split
//! into content and calls, whole or as they stream. A call is
//! `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`, the JSON laid out as the
//! grammar writes it (`", "`, `": "`); several calls follow one another on new lines.

use crate::wire::Tool;
use serde_json::{json, Value};

const OPEN: &str = "<tool_call>\n";
const NAME_PREFIX: &str = "{\"name\": \"";
const ARGUMENTS_PREFIX: &str = "\", \"arguments\": ";
/// The wrapper's closing brace, then the closing tag.
const CLOSE: &str = "}\n</tool_call>";
const NEXT: &str = "\n<tool_call>\n";

/// The system prompt's section on tools, as Qwen2.5's chat template writes it.
pub fn tools_section(tools: &[Tool]) -> String {
    let mut out = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with \
         function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in tools {
        let f = &tool.function;
        let mut function = json!({"name": f.name});
        if let Some(description) = &f.description {
            function["description"] = json!(description);
        }
        function["parameters"] = f.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        out.push('\n');
        out.push_str(&json!({"type": "function", "function": function}).to_string());
    }
    out.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within \
         <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": \
         <args-json-object>}\n</tool_call>",
    );
    out
}

/// A past call as the model writes it (`arguments` is the JSON text the client sent back).
pub fn written_call(name: &str, arguments: &str) -> String {
    format!("<tool_call>\n{{\"name\": {}, \"arguments\": {arguments}}}\n</tool_call>", Value::String(name.into()))
}

/// A tool's result as the next turn shows it.
pub fn written_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// What a piece of generated text adds to the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    /// Call `index` begins: its function's name.
    Call {
        index: usize,
        name: String,
    },
    /// More argument text of call `index`.
    Arguments {
        index: usize,
        text: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Content,
    Header,
    Arguments,
    Between,
}

/// Splits one choice's answer into content and calls as the text arrives, holding back what
/// may be the start of a tag. A call cut off by `max_tokens` is still a call, with the
/// arguments written so far, once its function is known, as OpenAI returns one.
#[derive(Debug)]
pub struct ToolCallSplitter {
    /// The tools the grammar allows, to name a call whose name was cut short.
    names: Vec<String>,
    text: String,
    /// Bytes of `text` handed out (or consumed as tags).
    pos: usize,
    stage: Stage,
    /// Where the call being read began (its `<tool_call>` tag), and its arguments.
    call_start: usize,
    arguments_start: usize,
    /// Calls begun so far.
    calls: usize,
}

impl ToolCallSplitter {
    pub fn new(names: Vec<String>) -> Self {
        ToolCallSplitter {
            names,
            text: String::new(),
            pos: 0,
            stage: Stage::Content,
            call_start: 0,
            arguments_start: 0,
            calls: 0,
        }
    }

    /// Calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Adds generated text.
    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        self.text.push_str(delta);
        let mut out = Vec::new();
        loop {
            let rest = &self.text[self.pos..];
            match self.stage {
                Stage::Content => {
                    if let Some(i) = rest.find(OPEN) {
                        self.emit_content(i, &mut out);
                        self.call_start = self.pos;
                        self.pos += OPEN.len();
                        self.stage = Stage::Header;
                        continue;
                    }
                    let held = held_back(rest, OPEN);
                    self.emit_content(rest.len() - held, &mut out);
                }
                Stage::Header => {
                    if let Some((name, len)) = header(rest) {
                        out.push(Piece::Call { index: self.calls, name });
                        self.calls += 1;
                        self.pos += len;
                        self.arguments_start = self.pos;
                        self.stage = Stage::Arguments;
                        continue;
                    }
                }
                Stage::Arguments => {
                    if let Some(i) = rest.find(CLOSE) {
                        self.emit_arguments(i, &mut out);
                        self.pos += CLOSE.len();
                        self.stage = Stage::Between;
                        continue;
                    }
                    let held = held_back(rest, CLOSE);
                    self.emit_arguments(rest.len() - held, &mut out);
                }
                Stage::Between => {
                    if rest.starts_with(NEXT) {
                        self.call_start = self.pos + 1;
                        self.pos += NEXT.len();
                        self.stage = Stage::Header;
                        continue;
                    }
                }
            }
            return out;
        }
    }

    /// The rest once the answer has ended; `cut` when `max_tokens` ended it.
    pub fn finish(&mut self, cut: bool) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest_len = self.text.len() - self.pos;
        match self.stage {
            Stage::Content => self.emit_content(rest_len, &mut out),
            Stage::Header => match cut.then(|| self.cut_name()).flatten() {
                Some(name) => {
                    out.push(Piece::Call { index: self.calls, name });
                    self.calls += 1;
                    self.pos = self.text.len();
                }
                None => {
                    // Which function it calls cannot be told: the text, as content.
                    self.pos = self.call_start;
                    self.emit_content(self.text.len() - self.call_start, &mut out);
                }
            },
            Stage::Arguments => {
                // Cut inside the closing `}\n</tool_call>`: it is not argument text. A lone `}`
                // is the wrapper's only if the arguments before it are whole JSON.
                let held = held_back(&self.text[self.pos..], CLOSE);
                let before_brace = &self.text[self.arguments_start..self.text.len() - held.min(1)];
                let closing = held > 1 || (held == 1 && serde_json::from_str::<Value>(before_brace).is_ok());
                self.emit_arguments(if closing { rest_len - held } else { rest_len }, &mut out);
            }
            Stage::Between => {}
        }
        out
    }

    /// The function a header cut short can still only be.
    fn cut_name(&self) -> Option<String> {
        let rest = &self.text[self.pos..];
        let Some(partial) = rest.strip_prefix(NAME_PREFIX) else {
            return (self.names.len() == 1).then(|| self.names[0].clone());
        };
        if let Some(end) = partial.find('"') {
            return Some(partial[..end].to_string());
        }
        let mut candidates = self.names.iter().filter(|n| n.starts_with(partial));
        match (candidates.next(), candidates.next()) {
            (Some(name), None) => Some(name.clone()),
            _ => None,
        }
    }

    fn emit_content(&mut self, len: usize, out: &mut Vec<Piece>) {
        if len > 0 {
            out.push(Piece::Content(self.text[self.pos..self.pos + len].to_string()));
            self.pos += len;
        }
    }

    fn emit_arguments(&mut self, len: usize, out: &mut Vec<Piece>) {
        if len > 0 {
            let text = self.text[self.pos..self.pos + len].to_string();
            out.push(Piece::Arguments { index: self.calls - 1, text });
            self.pos += len;
        }
    }
}

/// The name in a complete call header at the start of `text`, and the header's length.
fn header(text: &str) -> Option<(String, usize)> {
    let rest = text.strip_prefix(NAME_PREFIX)?;
    let end = rest.find('"')?;
    rest[end..]
        .starts_with(ARGUMENTS_PREFIX)
        .then(|| (rest[..end].to_string(), NAME_PREFIX.len() + end + ARGUMENTS_PREFIX.len()))
}

/// Bytes at the end of `text` that may be the start of `tag` (ASCII, so a char boundary).
fn held_back(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1)).rev().find(|&n| text.ends_with(&tag[..n])).unwrap_or(0)
}

/// A whole answer: its content and its calls (name, arguments).
#[derive(Debug, Default, PartialEq)]
pub struct SplitAnswer {
    pub content: String,
    pub calls: Vec<(String, String)>,
}

impl SplitAnswer {
    pub fn of(names: Vec<String>, text: &str, cut: bool) -> SplitAnswer {
        let mut splitter = ToolCallSplitter::new(names);
        let mut pieces = splitter.push(text);
        pieces.extend(splitter.finish(cut));
        let mut answer = SplitAnswer::default();
        for piece in pieces {
            match piece {
                Piece::Content(t) => answer.content.push_str(&t),
                Piece::Call { name, .. } => answer.calls.push((name, String::new())),
                Piece::Arguments { index, text } => answer.calls[index].1.push_str(&text),
            }
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["weather".into(), "wake".into()]
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    const TWO: &str = "Let me check.<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Zürich\"}}\n\
                       </tool_call>\n<tool_call>\n{\"name\": \"wake\", \"arguments\": {\"h\": {}}}\n</tool_call>";

    #[test]
    fn content_and_calls_split_whole_and_streamed_alike() {
        let whole = SplitAnswer::of(names(), TWO, false);
        assert_eq!(whole.content, "Let me check.");
        assert_eq!(whole.calls, vec![call("weather", "{\"city\": \"Zürich\"}"), call("wake", "{\"h\": {}}")]);
        // One character at a time: the same pieces, each name before its arguments, no tag text.
        let mut s = ToolCallSplitter::new(names());
        let mut streamed = SplitAnswer::default();
        let mut pieces: Vec<Piece> = TWO.chars().flat_map(|c| s.push(&c.to_string())).collect();
        pieces.extend(s.finish(false));
        for piece in pieces {
            match piece {
                Piece::Content(t) => {
                    assert!(streamed.calls.is_empty() && !t.contains('<'), "{t:?}");
                    streamed.content.push_str(&t);
                }
                Piece::Call { index, name } => {
                    assert_eq!(index, streamed.calls.len());
                    streamed.calls.push((name, String::new()));
                }
                Piece::Arguments { index, text } => streamed.calls[index].1.push_str(&text),
            }
        }
        assert_eq!(streamed, whole);
        // Text only, with a `<` that starts no tag.
        assert_eq!(
            SplitAnswer::of(names(), "a <b> c <tool", false),
            SplitAnswer { content: "a <b> c <tool".into(), calls: vec![] }
        );
    }

    #[test]
    fn a_call_cut_off_is_a_call_once_its_function_is_known() {
        let cut = |text: &str| SplitAnswer::of(names(), text, true);
        let open = "Hm.<tool_call>\n";
        // Inside the arguments: all of them so far, a closing brace included (it is theirs).
        let inside = cut(&format!("{open}{{\"name\": \"wake\", \"arguments\": {{\"h\": {{\"x\": 1}}"));
        assert_eq!((inside.content.as_str(), inside.calls), ("Hm.", vec![call("wake", "{\"h\": {\"x\": 1}")]));
        // After the name, before the arguments: the call with no argument text.
        assert_eq!(cut(&format!("{open}{{\"name\": \"weather\", \"argum")).calls, vec![call("weather", "")]);
        // Inside the name: the one tool it can still be; if several, the text as content.
        assert_eq!(cut(&format!("{open}{{\"name\": \"wea")).calls, vec![call("weather", "")]);
        let ambiguous = cut(&format!("{open}{{\"name\": \"w"));
        assert_eq!((ambiguous.content, ambiguous.calls), (format!("{open}{{\"name\": \"w"), vec![]));
        let one = SplitAnswer::of(vec!["weather".into()], "<tool_call>\n{\"na", true);
        assert_eq!(one.calls, vec![call("weather", "")]);
        // Cut inside the closing tag or at the wrapper's brace: the arguments, whole.
        let args = "{\"h\": {\"x\": 1}}";
        for end in ["}", "}\n</tool_c"] {
            let text = format!("{open}{{\"name\": \"wake\", \"arguments\": {args}{end}");
            assert_eq!(cut(&text).calls, vec![call("wake", args)], "{end:?}");
        }
        // Cut inside a second call's tag: the first call whole.
        let first = cut(&TWO[..TWO.find("</tool_call>\n<tool").unwrap() + 16]);
        assert_eq!(first.calls, vec![call("weather", "{\"city\": \"Zürich\"}")]);
    }

    #[test]
    fn prompt_sections_are_qwens() {
        let tool: Tool = serde_json::from_value(json!({"type": "function", "function": {"name": "f",
            "description": "Does f.", "parameters": {"type": "object", "properties": {}}}}))
        .unwrap();
        let section = tools_section(&[tool]);
        assert!(section
            .contains("<tools>\n{\"type\":\"function\",\"function\":{\"name\":\"f\",\"description\":\"Does f.\""));
        assert_eq!(
            written_call("f", "{\"a\": 1}"),
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"
        );
        assert_eq!(
            SplitAnswer::of(vec!["f".into()], &written_call("f", "{\"a\": 1}"), false).calls,
            vec![call("f", "{\"a\": 1}")]
        );
    }
}
