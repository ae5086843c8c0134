//! Decode mat-vecs with the input's RMSNorm folded in (shaders/cuda/matmul.cu: `matvec_qkv`,
//! `matvec_swiglu`): each block stages the normed rows in shared memory, summing the squares
//! on the way, so the norm needs no kernel of its own. `norm_qkv` becomes one launch
//! instead of four, the feed-forward's norm + gate + up + swiglu one instead of five.
//! Also `rope_kv_append` (shaders/cuda/rope_kv_append.cu): RoPE on q and k and the KV-cache
//! store in one launch instead of two, for any row count. And the prefill side of `norm_qkv`
//! and `ffn_gate_up` on half-precision GEMMs: the norm kernel writes its output already
//! rounded to the GEMMs' type, and every projection reads that one copy (gemm.rs).

use super::gemm::{Elem, GemmW};
use super::launch::arg;
use super::ops::{u32_of, HEAD_DIM_MAX};
use super::Cuda;
use crate::backend::checks;
use crate::backend::params::{NormMatvecParams, RopeParams, KV_BLOCK};
use crate::backend::{Backend, Heads, KvSlot, RmsNormed, RopeArgs, Weight};
use crate::dtype::DType;
use crate::error::Result;
use crate::pool::Buf;

/// Shared memory a fused block may use without opting in to more.
const MAX_STAGED_BYTES: usize = 48 * 1024;

/// Whether the fused kernels take `rows` input rows of `dim`: each block stages up to 4 normed
/// rows in shared memory.
pub(super) fn fusable(rows: usize, dim: usize) -> bool {
    rows.min(4).saturating_mul(dim).saturating_mul(4) <= MAX_STAGED_BYTES
}

fn staged_bytes(rows: usize, dim: usize) -> u32 {
    (rows.min(4) * dim * 4) as u32
}

impl Cuda {
    /// Pointers of x [rows, k] and the norm weight [k], checked.
    fn normed_ptrs(
        &self,
        x: RmsNormed<'_, Cuda>,
        rows: usize,
        k: usize,
        op: &str,
    ) -> Result<(u64, u64)> {
        Ok((
            self.ptr(x.x, rows * k * 4, "x", op)?,
            self.ptr(x.weight, k * 4, "the norm weight", op)?,
        ))
    }

    /// q, k, v = rms_norm(x) . (wq, wk, wv)^T in one launch (same dtype and k for all three).
    pub(super) fn norm_qkv_fused(
        &self,
        [q, k, v]: [&mut Buf<Cuda>; 3],
        x: RmsNormed<'_, Cuda>,
        w: [&Weight<Cuda>; 3],
        rows: usize,
    ) -> Result<()> {
        const OP: &str = "norm_qkv";
        let (dim, dtype) = (w[0].cols, w[0].dtype);
        let rb = checks::row_bytes(dtype, dim, OP)?;
        let mut wp = [0u64; 3];
        for (p, m) in wp.iter_mut().zip(w) {
            *p = self.ptr(&m.buf, m.rows * rb, "the weights", OP)?;
        }
        let outs = [
            self.ptr(q, rows * w[0].rows * 4, "q", OP)?,
            self.ptr(k, rows * w[1].rows * 4, "k", OP)?,
            self.ptr(v, rows * w[2].rows * 4, "v", OP)?,
        ];
        let (xp, gp) = self.normed_ptrs(x, rows, dim, OP)?;
        let features = w[0].rows + w[1].rows + w[2].rows;
        if rows == 0 || features == 0 {
            return Ok(());
        }
        let p = NormMatvecParams {
            rows: u32_of(rows, "rows", OP)?,
            k: u32_of(dim, "k", OP)?,
            n0: u32_of(w[0].rows, "n", OP)?,
            n1: u32_of(w[1].rows, "n", OP)?,
            n2: u32_of(w[2].rows, "n", OP)?,
            eps: x.eps,
            _pad: [0; 2],
        };
        let grid = (
            u32_of(features.div_ceil(8), "n", OP)?,
            u32_of(rows.div_ceil(4), "rows", OP)?,
            1,
        );
        let f = self
            .kernels
            .get("matmul", by_dtype!("matvec_qkv_", dtype))?;
        self.launch(
            &f,
            grid,
            256,
            staged_bytes(rows, dim),
            &[
                arg(&outs[0]),
                arg(&outs[1]),
                arg(&outs[2]),
                arg(&xp),
                arg(&gp),
                arg(&wp[0]),
                arg(&wp[1]),
                arg(&wp[2]),
                arg(&p),
            ],
        )
    }

    /// out = silu(h . w1^T) * (h . w3^T), h = rms_norm(x), in one launch (w1, w3 alike).
    pub(super) fn gate_up_fused(
        &self,
        out: &mut Buf<Cuda>,
        x: RmsNormed<'_, Cuda>,
        (w1, w3): (&Weight<Cuda>, &Weight<Cuda>),
        rows: usize,
    ) -> Result<()> {
        const OP: &str = "ffn_gate_up";
        let (n, dim, dtype) = (w1.rows, w1.cols, w1.dtype);
        let rb = checks::row_bytes(dtype, dim, OP)?;
        let p1 = self.ptr(&w1.buf, n * rb, "the weights", OP)?;
        let p3 = self.ptr(&w3.buf, n * rb, "the weights", OP)?;
        let o = self.ptr(out, rows * n * 4, "out", OP)?;
        let (xp, gp) = self.normed_ptrs(x, rows, dim, OP)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let p = NormMatvecParams {
            rows: u32_of(rows, "rows", OP)?,
            k: u32_of(dim, "k", OP)?,
            n0: u32_of(n, "n", OP)?,
            eps: x.eps,
            ..Default::default()
        };
        let grid = (
            u32_of(n.div_ceil(8), "n", OP)?,
            u32_of(rows.div_ceil(4), "rows", OP)?,
            1,
        );
        let f = self
            .kernels
            .get("matmul", by_dtype!("matvec_swiglu_", dtype))?;
        self.launch(
            &f,
            grid,
            256,
            staged_bytes(rows, dim),
            &[arg(&o), arg(&xp), arg(&p1), arg(&p3), arg(&gp), arg(&p)],
        )
    }

    /// rope(q, k) then kv_append(k, v) in one launch, with the checks of both ops.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_kv_append_fused(
        &self,
        q: &mut Buf<Cuda>,
        k: &mut Buf<Cuda>,
        v: &Buf<Cuda>,
        cache: KvSlot<'_, Cuda>,
        rope: RopeArgs<'_, Cuda>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "rope_kv_append";
        checks::heads(h, OP, HEAD_DIM_MAX)?;
        let f16 = checks::kv_is_f16(cache.dtype, OP)? as u32;
        let width = h.n_kv_heads * h.head_dim;
        let qp = self.ptr(q, rows * h.n_heads * h.head_dim * 4, "q", OP)?;
        let kp = self.ptr(k, rows * width * 4, "k", OP)?;
        let vp = self.ptr(v, rows * width * 4, "v", OP)?;
        let f = self.ptr(rope.inv_freq, h.head_dim / 2 * 4, "inv_freq", OP)?;
        let end = pos0 + rows;
        u32_of(end, "the last position", OP)?;
        let t = self.ptr(
            cache.table,
            end.div_ceil(KV_BLOCK) * 4,
            "the block table",
            OP,
        )?;
        // As kv_append: the cache must hold at least one block.
        let block_bytes = KV_BLOCK * width * if f16 == 1 { 2 } else { 4 };
        let kc = self.ptr(cache.k, block_bytes, "the K cache", OP)?;
        let vc = self.ptr(cache.v, block_bytes, "the V cache", OP)?;
        let (pos, pos_dev) = self.step_pos(pos0)?;
        let p = RopeParams {
            rows: u32_of(rows, "rows", OP)?,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: pos,
            attn_scale: rope.attn_scale,
            _pad: [0; 2],
        };
        let threads = rows * (h.n_heads + h.n_kv_heads) * h.head_dim / 2;
        self.launch_1d(
            "rope_kv_append",
            "rope_kv_append",
            threads,
            256,
            &[
                arg(&qp),
                arg(&kp),
                arg(&vp),
                arg(&kc),
                arg(&vc),
                arg(&t),
                arg(&f),
                arg(&p),
                arg(&f16),
                arg(&pos_dev),
            ],
        )
    }

    /// The GEMM operand of weights `w`, checked.
    fn gemm_operand(&self, w: &Weight<Cuda>, op: &str) -> Result<GemmW> {
        let row_bytes = checks::row_bytes(w.dtype, w.cols, op)?;
        Ok(GemmW {
            ptr: self.ptr(&w.buf, w.rows * row_bytes, "the weights", op)?,
            dtype: w.dtype,
            n: w.rows,
            k: w.cols,
            row_bytes,
        })
    }

    /// Prefill q, k, v = rms_norm(x) . (wq, wk, wv)^T: the norm rounded to `elem` once
    /// (shared_half_input picked it), then three GEMMs on that copy.
    pub(super) fn norm_qkv_gemm(
        &self,
        [q, k, v]: [&mut Buf<Cuda>; 3],
        x: RmsNormed<'_, Cuda>,
        w: [&Weight<Cuda>; 3],
        rows: usize,
        elem: Elem,
    ) -> Result<()> {
        const OP: &str = "norm_qkv";
        let dim = w[0].cols;
        let outs = [
            self.ptr(q, rows * w[0].rows * 4, "q", OP)?,
            self.ptr(k, rows * w[1].rows * 4, "k", OP)?,
            self.ptr(v, rows * w[2].rows * 4, "v", OP)?,
        ];
        let ws = [
            self.gemm_operand(w[0], OP)?,
            self.gemm_operand(w[1], OP)?,
            self.gemm_operand(w[2], OP)?,
        ];
        let (xp, gp) = self.normed_ptrs(x, rows, dim, OP)?;
        if self.graphs.recording() {
            self.graphs.not_graphable();
            return Ok(());
        }
        let xg = self.norm_for_gemm((xp, gp, x.eps), rows, dim, elem, OP)?;
        for (o, m) in outs.into_iter().zip(&ws) {
            self.gemm_input(o, xg, m, rows, false)?;
        }
        Ok(())
    }

    /// Prefill out = silu(h . w1^T + b1) * (h . w3^T + b3), h = rms_norm(x): the norm rounded
    /// to `elem` once, two GEMMs on it into the (gate, up) scratch, biases, swiglu.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gate_up_gemm(
        &self,
        out: &mut Buf<Cuda>,
        [gate, up, _]: [&mut Buf<Cuda>; 3],
        x: RmsNormed<'_, Cuda>,
        (w1, w3): (&Weight<Cuda>, &Weight<Cuda>),
        bias: (Option<&Buf<Cuda>>, Option<&Buf<Cuda>>),
        rows: usize,
        elem: Elem,
    ) -> Result<()> {
        const OP: &str = "ffn_gate_up";
        let (n, dim) = (w1.rows, w1.cols);
        self.ptr(out, rows * n * 4, "out", OP)?;
        let gp = self.ptr(gate, rows * n * 4, "gate", OP)?;
        let up_p = self.ptr(up, rows * n * 4, "up", OP)?;
        let (m1, m3) = (self.gemm_operand(w1, OP)?, self.gemm_operand(w3, OP)?);
        let (xp, np) = self.normed_ptrs(x, rows, dim, OP)?;
        if self.graphs.recording() {
            self.graphs.not_graphable();
            return Ok(());
        }
        let xg = self.norm_for_gemm((xp, np, x.eps), rows, dim, elem, OP)?;
        self.gemm_input(gp, xg, &m1, rows, false)?;
        self.gemm_input(up_p, xg, &m3, rows, false)?;
        if let Some(b1) = bias.0 {
            self.add_bias(gate, b1, rows, n)?;
        }
        if let Some(b3) = bias.1 {
            self.add_bias(up, b3, rows, n)?;
        }
        self.swiglu(out, gate, up, rows * n)
    }
}
