//! Paged KV cache, one structure for every backend (layout in backend/mod.rs and DESIGN.md).
//!
//! Per layer one K and one V pool of `n_blocks` blocks `[KV_BLOCK][n_kv_heads][head_dim]`. A
//! `Sequence` owns an ordered list of block ids (its block table, mirrored in a device buffer
//! that attention reads); blocks are taken from the free list as the sequence grows and given
//! back by `release`. Running out of blocks is an error, never an overwrite. With the prefix
//! cache on (`enable_prefix_cache`, the serving engine), full blocks are shared between
//! sequences by reference count (prefix_cache.rs).

use crate::backend::params::KV_BLOCK;
use crate::backend::{Backend, Heads, KvView};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::Buf;
use crate::prefix_cache::{PrefixCache, ROOT};

pub struct KvCache<B: Backend> {
    k: Vec<Buf<B>>,
    v: Vec<Buf<B>>,
    pub dtype: DType,
    pub heads: Heads,
    n_blocks: usize,
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    prefix: Option<PrefixCache>,
}

/// One sequence's place in the cache: `len` positions stored, in the blocks of `table`.
pub struct Sequence<B: Backend> {
    table: Vec<u32>,
    device_table: Buf<B>,
    max_blocks: usize,
    pub len: usize,
    /// Leading blocks registered in the prefix cache, and the chain hash after them.
    hashed: usize,
    chain: u64,
}

impl<B: Backend> KvCache<B> {
    /// Allocates room for `n_blocks` blocks per layer, in f16 or f32.
    pub fn new(b: &B, cfg: &ModelConfig, n_blocks: usize, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F16 | DType::F32) {
            return Err(Error::Usage(format!(
                "KV cache dtype must be f16 or f32, not {dtype}"
            )));
        }
        let heads = Heads {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        let elem = if dtype == DType::F16 { 2 } else { 4 };
        let bytes = n_blocks * KV_BLOCK * cfg.kv_dim() * elem;
        let mut k = Vec::with_capacity(cfg.n_layers);
        let mut v = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            k.push(Buf::exact(b, bytes)?);
            v.push(Buf::exact(b, bytes)?);
        }
        let free = (0..n_blocks as u32).rev().collect();
        Ok(KvCache {
            k,
            v,
            dtype,
            heads,
            n_blocks,
            free,
            refs: vec![0; n_blocks],
            prefix: None,
        })
    }

    /// Bytes the cache takes on the device.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len()).sum()
    }

    /// Blocks a sequence may take: free ones and cached ones no sequence holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, |p| p.idle())
    }

    /// Turns on prefix caching (for sequences that only grow: never `truncate` one).
    pub fn enable_prefix_cache(&mut self) {
        self.prefix = Some(PrefixCache::new(self.n_blocks));
    }

    /// Starts the empty `seq` with the cached blocks of the longest prefix of `tokens` made
    /// of whole blocks, leaving at least the last token to compute (its logits are wanted).
    /// Returns the positions it shares (0 without the prefix cache).
    pub fn share_prefix(&mut self, b: &B, seq: &mut Sequence<B>, tokens: &[u32]) -> Result<usize> {
        let Some(prefix) = self.prefix.as_mut() else {
            return Ok(0);
        };
        debug_assert!(seq.table.is_empty() && seq.len == 0);
        let whole = tokens.len().saturating_sub(1) / KV_BLOCK;
        for chunk in tokens
            .chunks_exact(KV_BLOCK)
            .take(whole.min(seq.max_blocks))
        {
            let Some((block, h)) = prefix.find(seq.chain, chunk) else {
                break;
            };
            if self.refs[block as usize] == 0 {
                prefix.reuse(block);
            }
            self.refs[block as usize] += 1;
            seq.table.push(block);
            seq.chain = h;
        }
        seq.hashed = seq.table.len();
        seq.len = seq.table.len() * KV_BLOCK;
        if !seq.table.is_empty() {
            b.upload(&mut seq.device_table, 0, bytemuck::cast_slice(&seq.table))?;
        }
        Ok(seq.len)
    }

    /// Registers the blocks of `seq` that are full (positions below seq.len, whose tokens are
    /// `tokens[..seq.len]`) in the prefix cache, so that later sequences can share them.
    pub fn cache_full_blocks(&mut self, seq: &mut Sequence<B>, tokens: &[u32]) {
        let Some(prefix) = self.prefix.as_mut() else {
            return;
        };
        let full = seq.len.min(tokens.len()) / KV_BLOCK;
        while seq.hashed < full {
            let i = seq.hashed;
            let chunk = &tokens[i * KV_BLOCK..(i + 1) * KV_BLOCK];
            seq.chain = prefix.insert(seq.table[i], seq.chain, chunk);
            seq.hashed += 1;
        }
    }

    /// A new, empty sequence that may grow to `max_len` positions.
    pub fn new_sequence(&self, b: &B, max_len: usize) -> Result<Sequence<B>> {
        let max_blocks = max_len.div_ceil(KV_BLOCK).max(1);
        Ok(Sequence {
            table: Vec::new(),
            device_table: Buf::exact(b, max_blocks * 4)?,
            max_blocks,
            len: 0,
            hashed: 0,
            chain: ROOT,
        })
    }

    /// Makes room for positions up to `new_len` in `seq`, taking blocks from the free list and
    /// uploading the block table when it changes.
    pub fn reserve(&mut self, b: &B, seq: &mut Sequence<B>, new_len: usize) -> Result<()> {
        let need = new_len.div_ceil(KV_BLOCK);
        if need > seq.max_blocks {
            return Err(Error::Generation(format!(
                "sequence of {new_len} positions exceeds its context of {} positions",
                seq.max_blocks * KV_BLOCK
            )));
        }
        let old = seq.table.len();
        while seq.table.len() < need {
            let evicted = || self.prefix.as_mut().and_then(|p| p.evict());
            let Some(block) = self.free.pop().or_else(evicted) else {
                return Err(Error::Generation(format!(
                    "KV cache is full ({} blocks of {KV_BLOCK} positions in use)",
                    self.n_blocks
                )));
            };
            self.refs[block as usize] = 1;
            seq.table.push(block);
        }
        if seq.table.len() != old {
            b.upload(
                &mut seq.device_table,
                old * 4,
                bytemuck::cast_slice(&seq.table[old..]),
            )?;
        }
        Ok(())
    }

    /// Gives every block of `seq` back to the free list; the sequence is empty afterwards.
    /// A shared block goes back only when its last holder releases it; a cached one stays
    /// cached until it is needed for new positions.
    pub fn release(&mut self, seq: &mut Sequence<B>) {
        for block in seq.table.drain(..).rev() {
            let refs = &mut self.refs[block as usize];
            *refs = refs.saturating_sub(1);
            if *refs > 0 {
                continue;
            }
            match self.prefix.as_mut() {
                Some(p) if p.is_cached(block) => p.release(block),
                _ => self.free.push(block),
            }
        }
        seq.len = 0;
        seq.hashed = 0;
        seq.chain = ROOT;
    }

    /// Layer `layer`'s K and V pools, writable, plus the sequence's table (for kv_append).
    pub fn layer_mut<'a>(
        &'a mut self,
        layer: usize,
        seq: &'a Sequence<B>,
    ) -> (&'a mut Buf<B>, &'a mut Buf<B>, &'a Buf<B>) {
        (&mut self.k[layer], &mut self.v[layer], &seq.device_table)
    }

    /// Layer `layer`'s K and V pools, writable (a batch of many sequences brings its tables).
    pub fn pools_mut(&mut self, layer: usize) -> (&mut Buf<B>, &mut Buf<B>) {
        (&mut self.k[layer], &mut self.v[layer])
    }

    /// Layer `layer`'s K and V pools.
    pub fn pools(&self, layer: usize) -> (&Buf<B>, &Buf<B>) {
        (&self.k[layer], &self.v[layer])
    }

    /// Layer `layer` of the sequence as attention reads it.
    pub fn view<'a>(&'a self, layer: usize, seq: &'a Sequence<B>) -> KvView<'a, B> {
        KvView {
            k: &self.k[layer],
            v: &self.v[layer],
            table: &seq.device_table,
            dtype: self.dtype,
        }
    }
}

impl<B: Backend> Sequence<B> {
    /// Forgets positions from `len` on (their blocks stay with the sequence for reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The most positions this sequence can hold.
    pub fn capacity(&self) -> usize {
        self.max_blocks * KV_BLOCK
    }

    pub fn block_table(&self) -> &[u32] {
        &self.table
    }
}
