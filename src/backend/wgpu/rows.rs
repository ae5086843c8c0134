//! The row ops of serving's batched decode (batch.rs RowsView): rope_rows.wgsl, and the ROWS
//! variants of kv_append.wgsl, attention_decode.wgsl and attention_combine.wgsl, which read each
//! row's position and block table from the batch's layout instead of one sequence's pos0 and
//! table. Every row, a decode token or a row of a prompt chunk, runs the split-KV decode kernel
//! over its own context, so a row's result is the same whatever else the batch holds.

use super::ops::{decode_plan, dev, SPLIT_MAX, WG};
use super::pipelines::Kernel;
use super::Wgpu;
use crate::backend::checks;
use crate::backend::params::{AttentionParams, KvAppendParams, RopeParams};
use crate::backend::{Heads, KvSlot, KvView};
use crate::batch::RowsView;
use crate::error::Result;
use crate::pool::Buf;

impl Wgpu {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_rows_kernel(
        &self,
        x: &mut Buf<Wgpu>,
        inv_freq: &Buf<Wgpu>,
        pos: &Buf<Wgpu>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        attn_scale: f32,
    ) -> Result<()> {
        const OP: &str = "rope_rows";
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(dev(format!("{OP}: head_dim {head_dim} must be even")));
        }
        let binds = [
            self.bind(x, rows * n_heads * head_dim * 4, "x", OP)?,
            self.bind(inv_freq, head_dim / 2 * 4, "inv_freq", OP)?,
            self.bind(pos, rows * 4, "the positions", OP)?,
        ];
        let params = RopeParams {
            rows: rows as u32,
            n_heads: n_heads as u32,
            n_kv_heads: 0,
            head_dim: head_dim as u32,
            pos0: 0,
            attn_scale,
            _pad: [0; 2],
        };
        let threads = rows * n_heads * head_dim / 2;
        self.run(
            Kernel::RopeRows,
            &params,
            &binds,
            self.grid(threads as u64, WG),
        )
    }

    pub(super) fn kv_append_rows_kernel(
        &self,
        cache: KvSlot<'_, Wgpu>,
        k: &Buf<Wgpu>,
        v: &Buf<Wgpu>,
        rows: RowsView<'_, Wgpu>,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "kv_append_rows";
        let f16 = checks::kv_is_f16(cache.dtype, OP)?;
        checks::heads(h, OP, usize::MAX)?;
        let (n, width) = (rows.rows, h.n_kv_heads * h.head_dim);
        let binds = [
            self.bind(cache.k, 0, "the K cache", OP)?,
            self.bind(cache.v, 0, "the V cache", OP)?,
            self.bind(cache.table, rows.meta_len * 4, "the batch layout", OP)?,
            self.bind(k, n * width * 4, "k", OP)?,
            self.bind(v, n * width * 4, "v", OP)?,
        ];
        let params = KvAppendParams {
            rows: n as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: 0,
            kv_f16: f16 as u32,
            _pad: [0; 3],
        };
        let groups = self.grid((n * width / 2) as u64, WG);
        self.run(
            Kernel::KvAppend { f16, rows: true },
            &params,
            &binds,
            groups,
        )
    }

    pub(super) fn attention_rows_kernel(
        &self,
        out: &mut Buf<Wgpu>,
        q: &Buf<Wgpu>,
        kv: KvView<'_, Wgpu>,
        rows: RowsView<'_, Wgpu>,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "attention_rows";
        let f16 = checks::kv_is_f16(kv.dtype, OP)?;
        checks::heads(h, OP, self.max_head_dim())?;
        let n = rows.rows;
        if n == 0 {
            return Ok(());
        }
        let width = n * h.n_heads * h.head_dim * 4;
        let o = self.bind(out, width, "out", OP)?;
        let q = self.bind(q, width, "q", OP)?;
        let k = self.bind(kv.k, 0, "the K cache", OP)?;
        let v = self.bind(kv.v, 0, "the V cache", OP)?;
        let t = self.bind(kv.table, rows.meta_len * 4, "the batch layout", OP)?;
        // Every row is planned as if it had the longest context (shorter rows leave their
        // last splits empty, which the combine skips), in splits of a length that depends on
        // neither the batch's rows nor its other contexts (one split up to decode_plan's
        // one-split limit, SPLIT_MAX positions past it), so that a row's sums run in the same
        // order whatever else the batch holds.
        let (one_split, _) = decode_plan(1, rows.max_ctx, h);
        let split_len = if one_split >= rows.max_ctx {
            one_split
        } else {
            SPLIT_MAX
        };
        let n_splits = rows.max_ctx.div_ceil(split_len);
        let params = AttentionParams {
            rows: n as u32,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: rows.max_ctx as u32,
            kv_f16: f16 as u32,
            scale: 1.0 / (h.head_dim as f32).sqrt(),
            split_len: split_len as u32,
        };
        self.attention_decode(OP, &params, n_splits, true, [o, q, k, v, t])
    }
}
