//! KV caches of finished sequences, kept so that a later request sharing a token prefix (images
//! identified by content hash) reuses them instead of recomputing: the second turn of a chat
//! about an image skips both the vision encode and the prefill of the first turn.

use weft_model::KvCache;

/// A token's identity for prefix matching: its id, or for an image slot the image's content
/// hash and the slot's offset inside the image.
pub type TokenKey = u64;

pub fn text_key(id: u32) -> TokenKey {
    id as u64
}

pub fn image_key(hash: u64, slot: usize) -> TokenKey {
    (hash.rotate_left(17) ^ (slot as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | (1 << 63)
}

struct Entry {
    keys: Vec<TokenKey>,
    cache: KvCache,
    used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    tick: u64,
}

fn common_prefix(a: &[TokenKey], b: &[TokenKey]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new() -> Self {
        PrefixCache { entries: Vec::new(), tick: 0 }
    }

    /// Tokens held by all entries.
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|e| e.cache.len()).sum()
    }

    /// Length of the longest cached prefix of `keys`, at most `max_len`, without using it.
    pub fn peek(&self, keys: &[TokenKey], max_len: usize) -> usize {
        self.entries.iter().map(|e| common_prefix(&e.keys, keys).min(max_len).min(e.cache.len())).max().unwrap_or(0)
    }

    /// The longest cached prefix of `keys`, at most `max_len` tokens, as a private copy.
    pub fn lookup(&mut self, keys: &[TokenKey], max_len: usize) -> Option<(usize, KvCache)> {
        self.tick += 1;
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.keys, keys).min(max_len).min(e.cache.len())))
            .max_by_key(|&(_, len)| len)?;
        if len == 0 {
            return None;
        }
        let entry = &mut self.entries[best];
        entry.used = self.tick;
        let copy = entry.cache.fork(len).ok()?;
        Some((len, copy))
    }

    /// Keeps `cache`, whose tokens are `keys[..cache.len()]`. Entries it extends are replaced.
    pub fn insert(&mut self, mut keys: Vec<TokenKey>, cache: KvCache) {
        if cache.is_empty() {
            return;
        }
        keys.truncate(cache.len());
        self.tick += 1;
        self.entries.retain(|e| !(e.keys.len() <= keys.len() && keys.starts_with(&e.keys)));
        if self.entries.iter().any(|e| e.keys.starts_with(&keys)) {
            return; // an entry already covers it
        }
        self.entries.push(Entry { keys, cache, used: self.tick });
    }

    /// Drops least recently used entries until at most `max_tokens` remain.
    pub fn shrink_to(&mut self, max_tokens: usize) {
        while self.tokens() > max_tokens && !self.entries.is_empty() {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used).expect("non-empty");
            self.entries.swap_remove(oldest);
        }
    }
}

impl Default for PrefixCache {
    fn default() -> Self {
        Self::new()
    }
}
