//! Decode mat-vecs with the input's RMSNorm folded in (shaders/cuda/matmul.cu: `matvec_qkv`,
//! `matvec_swiglu`): each block stages the normed rows in shared memory, summing the squares
//! on the way, so the norm needs no kernel of its own. `norm_qkv` becomes one launch
//! instead of four, the feed-forward's norm + gate + up + swiglu one instead of five.

use super::launch::arg;
use super::ops::u32_of;
use super::Cuda;
use crate::backend::checks;
use crate::backend::params::NormMatvecParams;
use crate::backend::{RmsNormed, Weight};
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
}
