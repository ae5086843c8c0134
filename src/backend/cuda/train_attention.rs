//! The packed-batch ops of training on CUDA: rope_rows and its backward (shaders/cuda/rope.cu),
//! attention_packed and attention_backward. Two sets of attention kernels, neither writing a
//! score matrix to memory:
//! - shaders/cuda/attention_train_mma.cu: bf16 tiles on tensor cores (mma.sync, f32
//!   accumulation) for head sizes 64 and 128 on the default variant. Grid (heads, tiles of 64
//!   rows, sequences) for the forward and dq, 128 threads; (kv heads, tiles of 64 keys,
//!   sequences) for dk/dv, 256 threads.
//! - shaders/cuda/attention_train.cu: f32 on CUDA cores, for `CudaOptions::exact` and every
//!   other head size (and buffers the mma kernels' 16-byte loads cannot read). Grid (tiles of
//!   16 rows over the longest sequence, heads, sequences), 128 threads.
//!
//! Blocks past their sequence's end exit at once. Both backward paths share attention_bwd_delta
//! (D = rowsum(dout * out), f32).

use super::launch::{arg, Scratch};
use super::ops::{u32_of, HEAD_DIM_MAX};
use super::train_params::{PackedAttnParams, RopeRowsParams};
use super::Cuda;
use crate::backend::{checks, Heads};
use crate::batch::BatchView;
use crate::error::{Error, Result};
use crate::pool::Buf;
use cudarc::driver::sys::CUfunction_attribute;

/// attention_train.cu: rows a block owns (AT_BR), rows staged per step (AT_BC), threads.
const AT_BR: usize = 16;
const AT_BC: usize = 32;
const AT_THREADS: u32 = 128;

/// The forward, dq and dk/dv kernels for head_dim `hd`: each lane holds hd / 32 dims rounded
/// up to 2, 4 or 8.
fn kernels(hd: usize) -> [&'static str; 3] {
    match hd {
        0..=64 => [
            "attention_packed_64",
            "attention_bwd_dq_64",
            "attention_bwd_dkdv_64",
        ],
        65..=128 => [
            "attention_packed_128",
            "attention_bwd_dq_128",
            "attention_bwd_dkdv_128",
        ],
        _ => [
            "attention_packed_256",
            "attention_bwd_dq_256",
            "attention_bwd_dkdv_256",
        ],
    }
}

/// attention_train_mma.cu: rows (queries or keys) a block owns.
const MMA_ROWS: usize = 64;
/// attention_train_mma.cu: bf16 padding per staged row.
const MMA_PAD: usize = 8;
/// attention_train_mma.cu: threads of the dk/dv kernel (two warpgroups).
const MMA_DKDV_THREADS: u32 = 256;

/// The tensor-core kernels of one head size, with the tiles that size their shared memory
/// (DQ_KEYS and DKDV_QUERIES of attention_train_mma.cu).
struct MmaKernels {
    forward: &'static str,
    dq: &'static str,
    dkdv: &'static str,
    dq_keys: usize,
    dkdv_queries: usize,
}

impl MmaKernels {
    fn of(hd: usize) -> Option<MmaKernels> {
        match hd {
            64 => Some(MmaKernels {
                forward: "attention_packed_mma_64",
                dq: "attention_bwd_dq_mma_64",
                dkdv: "attention_bwd_dkdv_mma_64",
                dq_keys: 64,
                dkdv_queries: 64,
            }),
            128 => Some(MmaKernels {
                forward: "attention_packed_mma_128",
                dq: "attention_bwd_dq_mma_128",
                dkdv: "attention_bwd_dkdv_mma_128",
                dq_keys: 32,
                dkdv_queries: 32,
            }),
            _ => None,
        }
    }

    /// Dynamic shared memory of each kernel: tiles of bf16 rows of hd + MMA_PAD values; dk/dv
    /// has the block's K and V and, per warpgroup, a query tile of q and dout with its lse and
    /// D.
    fn shared(&self, hd: usize) -> [usize; 3] {
        let row = (hd + MMA_PAD) * 2;
        let bq = self.dkdv_queries;
        [
            2 * MMA_ROWS * row,
            2 * self.dq_keys * row,
            2 * MMA_ROWS * row + 2 * (2 * bq * row + 2 * bq * 4),
        ]
    }
}

impl Cuda {
    /// rope_rows (sign +1) or rope_backward (the transposed rotation) on x in place.
    pub(super) fn rope_rows_kernel(
        &self,
        name: &'static str,
        x: &mut Buf<Cuda>,
        inv_freq: &Buf<Cuda>,
        pos: &Buf<Cuda>,
        (rows, n_heads, head_dim): (usize, usize, usize),
        attn_scale: f32,
    ) -> Result<()> {
        if head_dim == 0 || head_dim % 2 != 0 || n_heads == 0 {
            return Err(Error::Device(format!(
                "{name}: {n_heads} heads of head_dim {head_dim} (must be even)"
            )));
        }
        let xp = self.ptr(x, rows * n_heads * head_dim * 4, "x", name)?;
        let f = self.ptr(inv_freq, head_dim / 2 * 4, "inv_freq", name)?;
        let pp = self.ptr(pos, rows * 4, "pos", name)?;
        let p = RopeRowsParams {
            rows: u32_of(rows, "rows", name)?,
            n_heads: u32_of(n_heads, "n_heads", name)?,
            head_dim: u32_of(head_dim, "head_dim", name)?,
            attn_scale,
        };
        self.launch_1d(
            "rope",
            name,
            rows * n_heads * head_dim / 2,
            256,
            &[arg(&xp), arg(&f), arg(&pp), arg(&p)],
        )
    }

    /// The params and grid of the attention_train kernels for `batch`, after checking the
    /// sequence bounds buffer.
    fn packed_attn(
        &self,
        batch: &BatchView<'_, Cuda>,
        h: Heads,
        op: &str,
    ) -> Result<(PackedAttnParams, (u32, u32, u32), u64)> {
        checks::heads(h, op, HEAD_DIM_MAX)?;
        let cu = self.ptr(batch.cu_seqlens, (batch.n_seqs + 1) * 4, "cu_seqlens", op)?;
        let p = PackedAttnParams {
            rows: u32_of(batch.rows, "rows", op)?,
            n_seqs: u32_of(batch.n_seqs, "sequences", op)?,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            scale: 1.0 / (h.head_dim as f32).sqrt(),
            _pad: [0; 2],
        };
        if batch.n_seqs > 65535 {
            return Err(Error::Device(format!(
                "{op}: {} sequences in one batch (at most 65535)",
                batch.n_seqs
            )));
        }
        let tiles = u32_of(batch.max_len.div_ceil(AT_BR), "rows", op)?;
        Ok((p, (tiles, h.n_heads as u32, batch.n_seqs as u32), cu))
    }

    /// The tensor-core kernels for a call, when they apply: the default variant, head_dim 64 or
    /// 128, every f32 buffer they read or write by vectors 16-byte aligned, and at most 65535
    /// tiles of MMA_ROWS rows (the grid's y). With them, the number of tiles.
    fn mma_path(
        &self,
        batch: &BatchView<'_, Cuda>,
        h: Heads,
        ptrs: &[u64],
    ) -> Option<(MmaKernels, u32)> {
        if self.exact {
            return None;
        }
        let k = MmaKernels::of(h.head_dim)?;
        let tiles = batch.max_len.div_ceil(MMA_ROWS);
        if tiles > 65535 || ptrs.iter().any(|p| p % 16 != 0) {
            return None;
        }
        Some((k, tiles as u32))
    }

    /// Kernel `name` of `stem`.cu with `shared` bytes of dynamic shared memory allowed (past
    /// 48 KiB a kernel must opt in; the call costs far less than the kernel).
    fn with_shared(
        &self,
        stem: &'static str,
        name: &'static str,
        shared: usize,
    ) -> Result<cudarc::driver::CudaFunction> {
        let f = self.kernels.get(stem, name)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .map_err(|e| Error::Device(format!("{name}: shared memory of {shared} bytes: {e}")))?;
        Ok(f)
    }

    /// attention_packed_*: out and (when given) lse.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_packed_kernel(
        &self,
        out: &mut Buf<Cuda>,
        lse: Option<&mut Buf<Cuda>>,
        q: &Buf<Cuda>,
        k: &Buf<Cuda>,
        v: &Buf<Cuda>,
        batch: BatchView<'_, Cuda>,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "attention_packed";
        let (p, grid, cu) = self.packed_attn(&batch, h, OP)?;
        let rows = batch.rows;
        let (qw, kw) = (h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim);
        let o = self.ptr(out, rows * qw * 4, "out", OP)?;
        let qp = self.ptr(q, rows * qw * 4, "q", OP)?;
        let kp = self.ptr(k, rows * kw * 4, "k", OP)?;
        let vp = self.ptr(v, rows * kw * 4, "v", OP)?;
        let lp = match lse {
            Some(l) => self.ptr(l, rows * h.n_heads * 4, "lse", OP)?,
            None => 0,
        };
        let hd = h.head_dim;
        let args = [
            arg(&o),
            arg(&lp),
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&cu),
            arg(&p),
        ];
        if let Some((mk, tiles)) = self.mma_path(&batch, h, &[o, qp, kp, vp]) {
            let shared = mk.shared(hd)[0];
            let f = self.with_shared("attention_train_mma", mk.forward, shared)?;
            let grid = (h.n_heads as u32, tiles, grid.2);
            return self.launch(&f, grid, AT_THREADS, shared as u32, &args);
        }
        let shared = (AT_BR * hd + AT_BC * (hd + 1) + AT_BC * hd) * 4;
        let f = self.with_shared("attention_train", kernels(hd)[0], shared)?;
        self.launch(&f, grid, AT_THREADS, shared as u32, &args)
    }

    /// attention_bwd_delta, then dq over query tiles and dk, dv over key tiles (one block per
    /// kv head, walking its group's query heads).
    pub(super) fn attention_backward_kernels(
        &self,
        [dq, dk, dv]: [&mut Buf<Cuda>; 3],
        [dout, q, k, v, out, lse]: [&Buf<Cuda>; 6],
        batch: BatchView<'_, Cuda>,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let (p, grid, cu) = self.packed_attn(&batch, h, OP)?;
        let rows = batch.rows;
        let (qw, kw) = (h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim);
        let dqp = self.ptr(dq, rows * qw * 4, "dq", OP)?;
        let dkp = self.ptr(dk, rows * kw * 4, "dk", OP)?;
        let dvp = self.ptr(dv, rows * kw * 4, "dv", OP)?;
        let dop = self.ptr(dout, rows * qw * 4, "dout", OP)?;
        let qp = self.ptr(q, rows * qw * 4, "q", OP)?;
        let kp = self.ptr(k, rows * kw * 4, "k", OP)?;
        let vp = self.ptr(v, rows * kw * 4, "v", OP)?;
        let op = self.ptr(out, rows * qw * 4, "out", OP)?;
        let lp = self.ptr(lse, rows * h.n_heads * 4, "lse", OP)?;
        if rows == 0 {
            return Ok(());
        }
        let delta = self.scratch(Scratch::TrainDelta, rows * h.n_heads * 4)?;
        self.launch_1d(
            "attention_train",
            "attention_bwd_delta",
            rows * h.n_heads * 32,
            256,
            &[arg(&delta), arg(&dop), arg(&op), arg(&p)],
        )?;
        let hd = h.head_dim;
        let dq_args = [
            arg(&dqp),
            arg(&dop),
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&lp),
            arg(&delta),
            arg(&cu),
            arg(&p),
        ];
        let dkdv_args = [
            arg(&dkp),
            arg(&dvp),
            arg(&dop),
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&lp),
            arg(&delta),
            arg(&cu),
            arg(&p),
        ];
        let vectors = [dqp, dkp, dvp, dop, qp, kp, vp];
        if let Some((mk, tiles)) = self.mma_path(&batch, h, &vectors) {
            const STEM: &str = "attention_train_mma";
            let [_, dq_shared, dkdv_shared] = mk.shared(hd);
            let f = self.with_shared(STEM, mk.dq, dq_shared)?;
            let grid_dq = (h.n_heads as u32, tiles, grid.2);
            self.launch(&f, grid_dq, AT_THREADS, dq_shared as u32, &dq_args)?;
            let f = self.with_shared(STEM, mk.dkdv, dkdv_shared)?;
            let grid_dkdv = (h.n_kv_heads as u32, tiles, grid.2);
            return self.launch(
                &f,
                grid_dkdv,
                MMA_DKDV_THREADS,
                dkdv_shared as u32,
                &dkdv_args,
            );
        }
        let [_, dq_name, dkdv_name] = kernels(hd);
        let shared = (2 * AT_BR * hd + 2 * AT_BC * (hd + 1)) * 4;
        let f = self.with_shared("attention_train", dq_name, shared)?;
        self.launch(&f, grid, AT_THREADS, shared as u32, &dq_args)?;
        let shared = shared + 2 * AT_BC * 4;
        let f = self.with_shared("attention_train", dkdv_name, shared)?;
        let grid_dkdv = (grid.0, h.n_kv_heads as u32, grid.2);
        self.launch(&f, grid_dkdv, AT_THREADS, shared as u32, &dkdv_args)
    }
}
