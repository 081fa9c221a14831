//! What a prefix is, for the prefix cache inside the KV pool: each token's identity (its id, or
//! for an image slot the image's content hash and the slot) and each full block's hash,
//! chained over its parent block's hash and its tokens' identities. A later request that
//! shares a prompt prefix (the same text and pictures) finds its blocks by these hashes and
//! skips both the vision encode and the prefill of that prefix.

use std::hash::{BuildHasher, Hasher, RandomState};

/// A token's identity for prefix matching: its id, or for an image slot the image's 128-bit
/// keyed content hash plus the slot's offset inside the image (top bit set, so no text key
/// can equal an image key).
pub type TokenKey = u128;

/// A full block's identity: its tokens and everything before them.
pub type BlockHash = u128;

const IMAGE_BIT: u128 = 1 << 127;

pub fn text_key(id: u32) -> TokenKey {
    id as u128
}

pub fn image_key(hash: u128, slot: usize) -> TokenKey {
    // The hash is keyed with a per-process secret, so no client can aim two images at keys
    // that differ by less than an image's slot count.
    hash.wrapping_add(slot as u128) | IMAGE_BIT
}

/// Block hashes, keyed with secrets drawn when the engine starts (two SipHash keys, 128 bits
/// in all): a client cannot craft a prompt whose blocks collide with another's, and a chance
/// collision among the blocks one pool holds is about 2^-100.
pub struct BlockHasher {
    keys: [RandomState; 2],
    block_size: usize,
}

impl BlockHasher {
    pub fn new(block_size: usize) -> Self {
        BlockHasher { keys: [RandomState::new(), RandomState::new()], block_size }
    }

    /// The hash of a block holding `keys`, after the block whose hash is `parent`.
    fn chain(&self, parent: Option<BlockHash>, keys: &[TokenKey]) -> BlockHash {
        let half = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write_u128(parent.unwrap_or(0));
            h.write_u8(parent.is_some() as u8);
            for &k in keys {
                h.write_u128(k);
            }
            h.finish() as u128
        };
        (half(&self.keys[0]) << 64) | half(&self.keys[1])
    }

    /// Appends to `hashes` (the hashes of the first `hashes.len()` blocks of `keys`) those of
    /// the remaining full blocks of `keys`.
    pub fn extend(&self, hashes: &mut Vec<BlockHash>, keys: impl Fn(usize) -> TokenKey, len: usize) {
        let bs = self.block_size;
        let mut block = Vec::with_capacity(bs);
        for j in hashes.len()..len / bs {
            block.clear();
            block.extend((j * bs..(j + 1) * bs).map(&keys));
            let parent = j.checked_sub(1).map(|p| hashes[p]);
            hashes.push(self.chain(parent, &block));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes_of(hasher: &BlockHasher, keys: &[TokenKey]) -> Vec<BlockHash> {
        let mut hashes = Vec::new();
        hasher.extend(&mut hashes, |i| keys[i], keys.len());
        hashes
    }

    #[test]
    fn a_block_s_hash_depends_on_everything_before_it() {
        let hasher = BlockHasher::new(4);
        let a: Vec<TokenKey> = (0..10).map(text_key).collect();
        let hashes = hashes_of(&hasher, &a);
        assert_eq!(hashes.len(), 2, "only full blocks");
        // Extending in steps gives the same hashes as all at once.
        let mut stepwise = Vec::new();
        for len in [3, 5, 9] {
            hasher.extend(&mut stepwise, |i| a[i], len);
        }
        assert_eq!(stepwise, hashes);
        // A change in the first block changes the second block's hash too.
        let mut b = a.clone();
        b[0] = text_key(99);
        let other = hashes_of(&hasher, &b);
        assert!(other[0] != hashes[0] && other[1] != hashes[1]);
        // The same tokens as an image's slots are another prefix.
        let images: Vec<TokenKey> = (0..8).map(|slot| image_key(0, slot)).collect();
        assert_ne!(hashes_of(&hasher, &images)[0], hashes[0]);
        assert_ne!(hashes_of(&BlockHasher::new(4), &a), hashes, "keyed per engine");
    }
}
