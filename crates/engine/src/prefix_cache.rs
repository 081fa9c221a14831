//! KV caches of finished sequences, kept so that a later request sharing a token prefix (images
//! identified by content hash) reuses them instead of recomputing: the second turn of a chat
//! about an image skips both the vision encode and the prefill of the first turn. Entries are
//! counted by the storage they really reserve.

use weft_model::KvCache;

/// A token's identity for prefix matching: its id, or for an image slot the image's 128-bit
/// keyed content hash plus the slot's offset inside the image (top bit set, so no text key
/// can equal an image key).
pub type TokenKey = u128;

const IMAGE_BIT: u128 = 1 << 127;

pub fn text_key(id: u32) -> TokenKey {
    id as u128
}

pub fn image_key(hash: u128, slot: usize) -> TokenKey {
    // The hash is keyed with a per-process secret, so no client can aim two images at keys
    // that differ by less than an image's slot count.
    hash.wrapping_add(slot as u128) | IMAGE_BIT
}

struct Entry {
    keys: Vec<TokenKey>,
    cache: KvCache,
    used: u64,
}

#[derive(Default)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    tick: u64,
    /// Tokens of storage reserved by all entries.
    reserved: usize,
}

fn common_prefix(a: &[TokenKey], b: &[TokenKey]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens of KV storage held by all entries (capacity, not length).
    pub fn reserved_tokens(&self) -> usize {
        self.reserved
    }

    /// Bytes of KV storage held by all entries.
    pub fn reserved_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.reserved_bytes()).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = e.keys.len() <= keys.len() && keys.starts_with(&e.keys);
            if covered {
                freed += e.cache.capacity();
            }
            !covered
        });
        self.reserved -= freed;
        if self.entries.iter().any(|e| e.keys.starts_with(&keys)) {
            return; // an entry already covers it
        }
        self.reserved += cache.capacity();
        self.entries.push(Entry { keys, cache, used: self.tick });
    }

    /// Drops least recently used entries until at most `max_tokens` of storage remain.
    pub fn shrink_to(&mut self, max_tokens: usize) -> bool {
        let before = self.entries.len();
        while self.reserved > max_tokens && !self.entries.is_empty() {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used).expect("non-empty");
            let gone = self.entries.swap_remove(oldest);
            self.reserved -= gone.cache.capacity();
        }
        self.entries.len() != before
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.reserved = 0;
    }
}
