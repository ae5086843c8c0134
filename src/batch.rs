//! A batch: the rows of one or more sequences packed one after another, no padding
//! (FlashAttention's varlen form). Row r belongs to the sequence s with
//! `cu_seqlens[s] <= r < cu_seqlens[s + 1]` and sits at position `pos[r]`; attention is causal
//! within each sequence and never crosses into another. Training packs B samples of up to T
//! tokens this way; a batch of one sequence is the plain prefill of generation.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::pool::Buf;

/// One sequence of a batch, as the host knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First row of the sequence in the batch.
    pub first_row: usize,
    /// Rows it has in the batch.
    pub rows: usize,
    /// Position of its first row (0 for a training sample).
    pub pos0: usize,
}

/// A batch's layout on the host and on the device.
pub struct Batch<B: Backend> {
    pub spans: Vec<Span>,
    pub rows: usize,
    /// u32 [rows]: each row's position.
    pub pos: Buf<B>,
    /// u32 [n_seqs + 1]: first row of each sequence, then the row count.
    pub cu_seqlens: Buf<B>,
}

/// What the batched ops read of a batch.
#[derive(Clone, Copy)]
pub struct BatchView<'a, B: Backend> {
    pub rows: usize,
    pub n_seqs: usize,
    /// Rows of the longest sequence (kernels size their grids by it).
    pub max_len: usize,
    pub pos: &'a Buf<B>,
    pub cu_seqlens: &'a Buf<B>,
}

impl<B: Backend> Batch<B> {
    /// Packs sequences of `lens[i]` rows starting at positions `pos0[i]`.
    pub fn new(b: &B, lens: &[usize], pos0: &[usize]) -> Result<Self> {
        if lens.is_empty() || lens.len() != pos0.len() || lens.contains(&0) {
            return Err(Error::Usage(
                "a batch needs at least one sequence, each with at least one row".into(),
            ));
        }
        let mut spans = Vec::with_capacity(lens.len());
        let (mut pos, mut cu) = (Vec::new(), vec![0u32]);
        let mut first_row = 0;
        for (&rows, &p0) in lens.iter().zip(pos0) {
            spans.push(Span {
                first_row,
                rows,
                pos0: p0,
            });
            pos.extend((p0..p0 + rows).map(|p| p as u32));
            first_row += rows;
            cu.push(first_row as u32);
        }
        let mut pos_buf = b.alloc(pos.len() * 4)?;
        b.upload(&mut pos_buf, 0, bytemuck::cast_slice(&pos))?;
        let mut cu_buf = b.alloc(cu.len() * 4)?;
        b.upload(&mut cu_buf, 0, bytemuck::cast_slice(&cu))?;
        Ok(Batch {
            spans,
            rows: first_row,
            pos: pos_buf,
            cu_seqlens: cu_buf,
        })
    }

    pub fn view(&self) -> BatchView<'_, B> {
        BatchView {
            rows: self.rows,
            n_seqs: self.spans.len(),
            max_len: self.spans.iter().map(|s| s.rows).max().unwrap_or(0),
            pos: &self.pos,
            cu_seqlens: &self.cu_seqlens,
        }
    }
}

/// What the row ops (`rope_rows`, `kv_append_rows`, `attention_rows`) read of a batch of many
/// sequences' rows over the paged cache (serving: the decode rows of every running sequence
/// and chunks of prompts, in one forward call). Its layout is one u32 buffer, `meta`:
/// `[pos: rows][table offset: rows][block tables]`. Row r sits at position `meta[r]` of the
/// sequence whose block table starts at `meta[meta[rows + r]]`. The ops that take a KV table
/// (`KvSlot::table`, `KvView::table`) are given `meta`; `rope_rows` reads its first `rows`
/// values as the positions.
pub struct RowsView<'a, B: Backend> {
    pub rows: usize,
    pub meta: &'a Buf<B>,
    /// The largest pos + 1 of the batch (kernels size their grids by it).
    pub max_ctx: usize,
    /// u32s of `meta` in use.
    pub meta_len: usize,
}

impl<B: Backend> Clone for RowsView<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for RowsView<'_, B> {}

/// One sequence's part of a `RowsBatch`.
#[derive(Clone, Copy, Debug)]
pub struct SeqRows<'a> {
    /// The sequence's block table, covering pos0 + rows positions.
    pub table: &'a [u32],
    /// Position of its first row (the positions already in the cache).
    pub pos0: usize,
    pub rows: usize,
}

/// Rows of several sequences over the paged cache, with the device layout (`RowsView::meta`)
/// allocated once for up to `max_rows` rows and `max_blocks` block ids and refilled for
/// every forward call.
pub struct RowsBatch<B: Backend> {
    /// (first row, rows) of each sequence, in the order given.
    pub spans: Vec<(usize, usize)>,
    pub rows: usize,
    max_ctx: usize,
    max_rows: usize,
    max_blocks: usize,
    host: Vec<u32>,
    meta: Buf<B>,
}

impl<B: Backend> RowsBatch<B> {
    pub fn new(b: &B, max_rows: usize, max_blocks: usize) -> Result<Self> {
        Ok(RowsBatch {
            spans: Vec::new(),
            rows: 0,
            max_ctx: 0,
            max_rows,
            max_blocks,
            host: Vec::new(),
            meta: b.alloc((2 * max_rows + max_blocks).max(1) * 4)?,
        })
    }

    /// Lays out `seqs` (each with at least one row) and uploads the layout.
    pub fn set(&mut self, b: &B, seqs: &[SeqRows<'_>]) -> Result<()> {
        let rows: usize = seqs.iter().map(|s| s.rows).sum();
        let blocks: usize = seqs.iter().map(|s| s.table.len()).sum();
        if seqs.is_empty() || seqs.iter().any(|s| s.rows == 0) {
            return Err(Error::Usage(
                "a batch needs at least one sequence, each with at least one row".into(),
            ));
        }
        if rows > self.max_rows || blocks > self.max_blocks {
            return Err(Error::Usage(format!(
                "a batch of {rows} rows and {blocks} blocks exceeds its buffers ({} rows, {} \
                 blocks)",
                self.max_rows, self.max_blocks
            )));
        }
        let m = &mut self.host;
        m.clear();
        m.resize(2 * rows, 0);
        self.spans.clear();
        self.max_ctx = 0;
        let mut row = 0;
        for s in seqs {
            let end = s.pos0 + s.rows;
            if end.div_ceil(crate::backend::params::KV_BLOCK) > s.table.len() {
                return Err(Error::Usage(format!(
                    "a block table of {} blocks does not cover position {}",
                    s.table.len(),
                    end - 1
                )));
            }
            self.spans.push((row, s.rows));
            let table_at = m.len() as u32;
            for (i, p) in (s.pos0..end).enumerate() {
                m[row + i] = p as u32;
                m[rows + row + i] = table_at;
            }
            m.extend_from_slice(s.table);
            row += s.rows;
            self.max_ctx = self.max_ctx.max(end);
        }
        b.upload(&mut self.meta, 0, bytemuck::cast_slice(m))?;
        self.rows = rows;
        Ok(())
    }

    pub fn view(&self) -> RowsView<'_, B> {
        RowsView {
            rows: self.rows,
            meta: &self.meta,
            max_ctx: self.max_ctx,
            meta_len: self.host.len(),
        }
    }

    /// Whether every sequence has exactly one row (pure decode).
    pub fn one_row_each(&self) -> bool {
        self.spans.len() == self.rows
    }
}
