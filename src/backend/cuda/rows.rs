//! The row ops of serving's batched decode (batch.rs RowsView) on CUDA: kv_append.cu and the
//! decode kernels of attention.cu in rows mode, which read each row's position and block table
//! from the batch's layout (row_pos / row_blocks in common.cuh). Every row, a decode token or
//! a row of a prompt chunk, runs the split-KV decode kernels over its own context, so a row's
//! result is the same whatever else the batch holds. rope_rows is training's (rope.cu).

use super::graph::POS_BUCKET;
use super::launch::arg;
use super::ops::{plan_splits, DecodePlan};
use super::Cuda;
use crate::backend::checks;
use crate::backend::params::{AttentionParams, KvAppendParams, KV_BLOCK};
use crate::backend::{Heads, KvSlot, KvView};
use crate::batch::RowsView;
use crate::error::{Error, Result};
use crate::pool::Buf;

/// rows_mode of the kernels.
const ROWS: u32 = 1;
/// Split lengths of the rows' decode attention: attention_decode_f16 past the one-split limit,
/// and attention_decode (multiples of its 32-position granularity).
const F16_SPLIT: usize = 1024;
const GROUPED_SPLIT: usize = 256;

/// The decode kernel and its splits for rows over up to `n_ctx` positions: the kernel
/// decode_plan picks, with split lengths fixed as above.
fn rows_plan(n_ctx: usize, h: Heads, kv_f16: bool, short: usize) -> Option<DecodePlan> {
    let plan = plan_splits(1, n_ctx, h, kv_f16, short)?;
    let fixed = |split_len: usize| (n_ctx.div_ceil(split_len).max(1), split_len);
    Some(match plan {
        DecodePlan::F16 { splits: 1, .. } => DecodePlan::F16 {
            splits: 1,
            split_len: n_ctx,
        },
        DecodePlan::F16 { .. } => {
            let (splits, split_len) = fixed(F16_SPLIT);
            DecodePlan::F16 { splits, split_len }
        }
        DecodePlan::Grouped { .. } => {
            let (splits, split_len) = fixed(GROUPED_SPLIT);
            DecodePlan::Grouped { splits, split_len }
        }
    })
}

impl Cuda {
    pub(super) fn kv_append_rows_kernel(
        &self,
        cache: KvSlot<'_, Cuda>,
        k: &Buf<Cuda>,
        v: &Buf<Cuda>,
        rows: RowsView<'_, Cuda>,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "kv_append_rows";
        checks::heads(h, OP, super::ops::HEAD_DIM_MAX)?;
        let f16 = checks::kv_is_f16(cache.dtype, OP)? as u32;
        let (n, width) = (rows.rows, h.n_kv_heads * h.head_dim);
        let t = self.ptr(cache.table, rows.meta_len * 4, "the batch layout", OP)?;
        let block_bytes = KV_BLOCK * width * if f16 == 1 { 2 } else { 4 };
        let kc = self.ptr(cache.k, block_bytes, "the K cache", OP)?;
        let vc = self.ptr(cache.v, block_bytes, "the V cache", OP)?;
        let kp = self.ptr(k, n * width * 4, "k", OP)?;
        let vp = self.ptr(v, n * width * 4, "v", OP)?;
        let p = KvAppendParams {
            rows: n as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: 0,
            kv_f16: f16,
            _pad: [0; 3],
        };
        let no_pos = 0u64;
        self.launch_1d(
            "kv_append",
            "kv_append",
            n * width,
            256,
            &[
                arg(&kc),
                arg(&vc),
                arg(&t),
                arg(&kp),
                arg(&vp),
                arg(&p),
                arg(&no_pos),
                arg(&ROWS),
            ],
        )
    }

    pub(super) fn attention_rows_kernel(
        &self,
        out: &mut Buf<Cuda>,
        q: &Buf<Cuda>,
        kv: KvView<'_, Cuda>,
        rows: RowsView<'_, Cuda>,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "attention_rows";
        checks::heads(h, OP, super::ops::HEAD_DIM_MAX)?;
        let f16 = checks::kv_is_f16(kv.dtype, OP)?;
        let n = rows.rows;
        if n == 0 {
            return Ok(());
        }
        let width = h.n_heads * h.head_dim;
        let o = self.ptr(out, n * width * 4, "out", OP)?;
        let qp = self.ptr(q, n * width * 4, "q", OP)?;
        let t = self.ptr(kv.table, rows.meta_len * 4, "the batch layout", OP)?;
        let (kc, vc) = (kv.k.raw().ptr, kv.v.raw().ptr);
        let p = AttentionParams {
            rows: n as u32,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: 0,
            kv_f16: f16 as u32,
            scale: 1.0 / (h.head_dim as f32).sqrt(),
            split_len: 0,
        };
        // Every row is planned as if it had the longest context (shorter rows leave their last
        // splits empty, which the combine skips), in splits of a length that depends on neither
        // the batch's rows nor its other contexts, so that a row's sums run in the same order
        // whatever else the batch holds. A recorded step plans for its bucket's end, so that
        // consecutive steps replay one graph.
        let n_ctx = if self.graphs.recording() {
            rows.max_ctx.next_multiple_of(POS_BUCKET)
        } else {
            rows.max_ctx
        };
        let Some(plan) = rows_plan(n_ctx, h, f16, self.short_decode) else {
            return Err(Error::Device(format!(
                "{OP}: {} query heads per kv head with head_dim {} over an f32 cache are past \
                 the decode kernels' limits; use --kv-dtype f16",
                h.n_heads / h.n_kv_heads,
                h.head_dim
            )));
        };
        self.attention_decode(plan, [o, qp, kc, vc, t], p, (0, ROWS))
    }
}
