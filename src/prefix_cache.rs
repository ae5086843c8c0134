//! Automatic prefix caching for the paged KV cache (the serving engine turns it on): a full
//! block of KV_BLOCK positions is named by the chain hash of every token up to its end, so a new
//! sequence whose prompt starts with the same tokens (a system prompt, a chat's earlier turns)
//! takes those blocks instead of computing them again. Only full blocks are shared and a
//! sequence only writes past its shared ones, so no block is ever written while shared (no
//! copy-on-write is needed). Blocks are reference-counted; a cached block that no sequence
//! holds stays cached until a new block is needed and none is free (least recently released
//! first). A hit is checked against the block's stored tokens, not trusted to the hash alone.

use crate::backend::params::KV_BLOCK;
use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The hash of a block whose predecessors hash to `parent`, holding `tokens`.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The chain hash before a sequence's first block.
pub const ROOT: u64 = 0x9e37_79b9_7f4a_7c15;

pub struct PrefixCache {
    /// Chain hash -> the block holding it.
    by_hash: HashMap<u64, u32>,
    /// Per block: its chain hash and tokens, while it is cached.
    of_block: Vec<Option<(u64, [u32; KV_BLOCK])>>,
    /// Cached blocks no sequence holds, least recently released first.
    idle: VecDeque<u32>,
}

impl PrefixCache {
    pub fn new(n_blocks: usize) -> Self {
        PrefixCache {
            by_hash: HashMap::new(),
            of_block: vec![None; n_blocks],
            idle: VecDeque::new(),
        }
    }

    /// The cached block that follows `parent` with `tokens` (a full block), if any.
    pub fn find(&self, parent: u64, tokens: &[u32]) -> Option<(u32, u64)> {
        let h = chain_hash(parent, tokens);
        let &block = self.by_hash.get(&h)?;
        let (_, stored) = self.of_block[block as usize].as_ref()?;
        (stored[..] == *tokens).then_some((block, h))
    }

    /// Records that `block` holds `tokens` after `parent`; returns its chain hash. A block
    /// already cached, or a hash another block holds, stays as it is.
    pub fn insert(&mut self, block: u32, parent: u64, tokens: &[u32]) -> u64 {
        let h = chain_hash(parent, tokens);
        if self.of_block[block as usize].is_none() && !self.by_hash.contains_key(&h) {
            let mut t = [0u32; KV_BLOCK];
            t.copy_from_slice(tokens);
            self.of_block[block as usize] = Some((h, t));
            self.by_hash.insert(h, block);
        }
        h
    }

    pub fn is_cached(&self, block: u32) -> bool {
        self.of_block[block as usize].is_some()
    }

    /// A cached block nobody holds any more: it may be taken again, or evicted.
    pub fn release(&mut self, block: u32) {
        self.idle.push_back(block);
    }

    /// A sequence takes an idle cached block again.
    pub fn reuse(&mut self, block: u32) {
        if let Some(i) = self.idle.iter().position(|&b| b == block) {
            self.idle.remove(i);
        }
    }

    /// Evicts the least recently released idle block and hands it out as a new one.
    pub fn evict(&mut self) -> Option<u32> {
        let block = self.idle.pop_front()?;
        if let Some((h, _)) = self.of_block[block as usize].take() {
            self.by_hash.remove(&h);
        }
        Some(block)
    }

    /// Cached blocks nobody holds (free for new use).
    pub fn idle(&self) -> usize {
        self.idle.len()
    }
}
