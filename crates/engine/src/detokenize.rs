//! Incremental detokenization: text deltas that never split a UTF-8 character and add up to
//! exactly what decoding all ids at once gives.

/// Decodes ids to text (the tokenizer, or a stand-in in tests).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> String;
}

impl Decode for weft_model::tokenizer::PromptTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        weft_model::tokenizer::PromptTokenizer::decode(self, ids, true).unwrap_or_default()
    }
}

/// The offsets technique of TGI and vLLM: re-decode a short window of recent ids, because
/// byte-level BPE tokens only form valid text together with their neighbours.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that is re-decoded for context.
    prefix_offset: usize,
    /// End of the ids whose text has already been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id and returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32, tok: &impl Decode) -> String {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tok: &impl Decode) -> String {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level stand-in: each id is one byte, invalid UTF-8 shows as U+FFFD.
    pub struct Bytes;
    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned()
        }
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = "a€b😀c";
        let mut d = IncrementalDecoder::new();
        let mut out = String::new();
        for b in text.bytes() {
            let delta = d.push(b as u32, &Bytes);
            assert!(!delta.contains('\u{FFFD}'));
            out.push_str(&delta);
        }
        out.push_str(&d.flush(&Bytes));
        assert_eq!(out, text);
    }
}
