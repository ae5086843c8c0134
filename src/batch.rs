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
