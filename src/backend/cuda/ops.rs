//! `Backend` for CUDA: checks each op's sizes against its buffers (a bad size is an error here,
//! not an out-of-bounds access on the device), fills the kernel's params block (the structs of
//! src/backend/params.rs, mirrored in shaders/cuda/common.cuh) and picks the launch shape.

use super::graph::POS_BUCKET;
use super::launch::{arg, cuda_err, DevBuf, Scratch};
use super::{fused, Cuda};
use crate::backend::checks;
use crate::backend::params::*;
use crate::backend::{
    ffn_gate_up_unfused, matmul_residual_unfused, norm_qkv_unfused, Backend, Heads, KvSlot, KvView,
    PendingRead, RmsNormed, RopeArgs, SampleOp, Weight,
};
use crate::batch::{BatchView, RowsView};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::{Buf, Pool};
use cudarc::driver::result;
use std::sync::Arc;

/// Threads per block of the one-thread-per-element kernels.
const BLOCK: u32 = 256;
/// Up to this many rows, matmul runs the mat-vec kernel (4 rows per pass over the weights).
const MATVEC_MAX_ROWS: usize = 8;
/// Up to this many query rows, attention runs the split-KV decode kernel.
const DECODE_MAX_ROWS: usize = 4;
/// attention.cu limits: query heads per kv head in the decode kernel, head_dim overall.
const DECODE_MAX_GROUP: usize = 16;
pub(super) const HEAD_DIM_MAX: usize = 256;
/// attention.cu's decode kernel: lanes hold 4 dims each (DEC_DIMS).
const DECODE_MAX_HEAD_DIM: usize = 128;
/// From this many query rows on, attention runs as cuBLAS GEMMs (attention_gemm.rs).
const GEMM_ATTENTION_MIN_ROWS: usize = 32;
/// Blocks the split-KV decode kernel aims for, so that one query row fills the GPU.
const DECODE_TARGET_BLOCKS: usize = 264;
/// Contexts up to which attention_decode_f16 runs one block per query head (no splits, no
/// combine pass) by default. On an H200 (bench/NOTES.md, speed pass 5) that decoded faster than
/// split-KV at 900 and at 1800 positions on the 135M, 1B and 8B shapes (by 4-39%).
pub(super) const SHORT_DECODE_DEFAULT: usize = 2048;
/// Threads of attention_decode_f16 (DEC16_THREADS).
const DEC16_THREADS: u32 = 512;

/// How decode attention runs (decode_plan): the kernel and its splits of `split_len` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DecodePlan {
    /// attention_decode_f16, one block per (query head, row, split); one split writes the output
    /// itself (its split_len covers the context), several are merged by attention_combine.
    F16 { splits: usize, split_len: usize },
    /// attention_decode, one block per (kv head, row, split), merged by attention_combine.
    Grouped { splits: usize, split_len: usize },
}

/// The decode-attention plan for `rows` query rows over `n_pos` positions (a bucket's end while
/// recording, so that every step of the bucket traces alike), or None when the prefill paths
/// take the rows. An f16 cache with a head_dim its lanes can split (a power of two, 8 values a
/// lane, at most one warp a row) runs attention_decode_f16: unsplit up to `short` positions,
/// else about DECODE_TARGET_BLOCKS blocks in all (rounded down: a block takes a whole SM's
/// registers, so a partial last wave would cost a split's time). Anything else within the
/// grouped kernel's limits runs attention_decode, ~DECODE_TARGET_BLOCKS blocks rounded up.
/// Splits are a multiple of 32 positions long.
fn decode_plan(
    rows: usize,
    n_pos: usize,
    h: Heads,
    kv_f16: bool,
    short: usize,
) -> Option<DecodePlan> {
    if rows > DECODE_MAX_ROWS {
        return None;
    }
    plan_splits(rows, n_pos, h, kv_f16, short)
}

/// decode_plan's kernel and splits for any number of rows (batched decoding runs every row,
/// prompt rows included, through the decode kernels).
pub(super) fn plan_splits(
    rows: usize,
    n_pos: usize,
    h: Heads,
    kv_f16: bool,
    short: usize,
) -> Option<DecodePlan> {
    let split = |want: usize| {
        let splits = want.clamp(1, n_pos.div_ceil(32).max(1));
        let split_len = n_pos.div_ceil(splits).next_multiple_of(32);
        (n_pos.div_ceil(split_len).max(1), split_len)
    };
    if kv_f16 && h.head_dim.is_power_of_two() && (8..=256).contains(&h.head_dim) {
        let (splits, split_len) = if n_pos <= short {
            (1, n_pos)
        } else {
            split(DECODE_TARGET_BLOCKS / (h.n_heads * rows).max(1))
        };
        return Some(DecodePlan::F16 { splits, split_len });
    }
    let group = h.n_heads / h.n_kv_heads;
    if group > DECODE_MAX_GROUP || h.head_dim > DECODE_MAX_HEAD_DIM {
        return None;
    }
    let (splits, split_len) = split(DECODE_TARGET_BLOCKS.div_ceil((h.n_kv_heads * rows).max(1)));
    Some(DecodePlan::Grouped { splits, split_len })
}

fn dev(msg: String) -> Error {
    Error::Device(msg)
}

pub(super) fn u32_of(v: usize, what: &str, op: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| dev(format!("{op}: {what} {v} does not fit the kernel's u32")))
}

impl Cuda {
    pub(super) fn upload_raw(&self, dst: u64, data: &[u8]) -> Result<()> {
        let _exclusive = self.graphs.exclusive();
        unsafe { result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }
            .map_err(cuda_err("upload"))
    }

    /// Enqueue-time checks for ops that cannot be recorded into a decode-step graph.
    fn outside_step(&self) -> bool {
        if self.graphs.recording() {
            self.graphs.not_graphable();
            return false;
        }
        true
    }

    /// Which kernel decode attention runs for `rows` query rows at `pos0` (tests check that
    /// they cover each), outside a graph (a recorded step sizes for its bucket's end):
    /// "attention_decode_f16" (one split), "attention_decode_f16 + combine" (several),
    /// "attention_decode" (split-KV over any cache, merged by the combine), or None for the
    /// prefill paths.
    pub fn decode_attention_kernel(
        &self,
        rows: usize,
        pos0: usize,
        h: Heads,
        kv: DType,
    ) -> Option<&'static str> {
        let plan = decode_plan(rows, pos0 + rows, h, kv == DType::F16, self.short_decode)?;
        Some(match plan {
            DecodePlan::F16 { splits: 1, .. } => "attention_decode_f16",
            DecodePlan::F16 { .. } => "attention_decode_f16 + combine",
            DecodePlan::Grouped { .. } => "attention_decode",
        })
    }

    /// Scratch for the partials of split decode attention: each (row, head, split)'s
    /// unnormalised output and its (max, sum) pair.
    pub(super) fn attention_parts(
        &self,
        rows: usize,
        h: Heads,
        splits: usize,
    ) -> Result<(u64, u64)> {
        let parts = rows * h.n_heads * splits;
        Ok((
            self.scratch(Scratch::AttnParts, parts * h.head_dim * 4)?,
            self.scratch(Scratch::AttnMl, parts * 2 * 4)?,
        ))
    }

    /// attention_combine: merges the splits' partials into the output `o`.
    pub(super) fn attention_combine(
        &self,
        o: u64,
        (po, pml): (u64, u64),
        p: &AttentionParams,
        rows: usize,
        n_splits: u32,
    ) -> Result<()> {
        let f = self.kernels.get("attention", "attention_combine")?;
        self.launch(
            &f,
            (p.n_heads, rows as u32, 1),
            128,
            0,
            &[arg(&o), arg(&po), arg(&pml), arg(p), arg(&n_splits)],
        )
    }
}

impl Cuda {
    /// The decode attention kernels of `plan` over pointers [out, q, K cache, V cache, table]:
    /// one attention_decode_f16 split writes the output itself, more splits (and the grouped
    /// kernel) write partials that attention_combine merges. `(pos_dev, rows_mode)`: the
    /// device position word of a recorded step, and the rows of many sequences (rows.rs).
    pub(super) fn attention_decode(
        &self,
        plan: DecodePlan,
        [o, qp, kc, vc, t]: [u64; 5],
        mut p: AttentionParams,
        (pos_dev, rows_mode): (u64, u32),
    ) -> Result<()> {
        let (rows, h) = (p.rows as usize, p.n_heads as usize);
        let heads = Heads {
            n_heads: h,
            n_kv_heads: p.n_kv_heads as usize,
            head_dim: p.head_dim as usize,
        };
        let (splits, split_len) = match plan {
            DecodePlan::F16 { splits, split_len } | DecodePlan::Grouped { splits, split_len } => {
                (splits, split_len)
            }
        };
        p.split_len = split_len as u32;
        let n_splits = splits as u32;
        let f16_one_split = matches!(plan, DecodePlan::F16 { splits: 1, .. });
        let parts = if f16_one_split {
            (0, 0)
        } else {
            self.attention_parts(rows, heads, splits)?
        };
        // The arguments both kernels end with.
        let [pp, ns, pd, rm] = [arg(&p), arg(&n_splits), arg(&pos_dev), arg(&rows_mode)];
        if let DecodePlan::F16 { .. } = plan {
            let f = self.kernels.get("attention", "attention_decode_f16")?;
            let args = [
                arg(&o),
                arg(&parts.0),
                arg(&parts.1),
                arg(&qp),
                arg(&kc),
                arg(&vc),
                arg(&t),
                pp,
                ns,
                pd,
                rm,
            ];
            self.launch(
                &f,
                (h as u32, rows as u32, n_splits),
                DEC16_THREADS,
                0,
                &args,
            )?;
            if f16_one_split {
                return Ok(());
            }
        } else {
            let group = h / heads.n_kv_heads;
            let scores = group * heads.head_dim + group * 128 + 3 * group;
            let shared = (scores.max(4 * group * heads.head_dim) * 4) as u32;
            let f = self.kernels.get("attention", "attention_decode")?;
            let args = [
                arg(&parts.0),
                arg(&parts.1),
                arg(&qp),
                arg(&kc),
                arg(&vc),
                arg(&t),
                pp,
                ns,
                pd,
                rm,
            ];
            let grid = (n_splits, heads.n_kv_heads as u32, rows as u32);
            self.launch(&f, grid, 128, shared, &args)?;
        }
        self.attention_combine(o, parts, &p, rows, n_splits)
    }
}

/// Whether matmul runs `rows` rows through `w` on cuBLAS: all but decode row counts, except
/// rows the widening kernel cannot take (k not a multiple of 8), which the mat-vec kernel
/// takes (it checks its own arguments and runs any row count, 4 per pass).
fn takes_gemm(rows: usize, w: &Weight<Cuda>) -> bool {
    rows > MATVEC_MAX_ROWS && (w.cols % 8 == 0 || w.dtype == DType::F32)
}

impl Cuda {
    /// out (+)= x . w^T on cuBLAS (gemm.rs); `accumulate` adds into out (beta = 1).
    fn matmul_gemm(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "matmul";
        let (n, k) = (w.rows, w.cols);
        let rb = checks::row_bytes(w.dtype, k, OP)?;
        let wp = self.ptr(&w.buf, n * rb, "the weights", OP)?;
        let o = self.ptr(out, rows * n * 4, "out", OP)?;
        let xp = self.ptr(x, rows * k * 4, "x", OP)?;
        self.gemm(o, xp, wp, w.dtype, rows, n, k, rb, accumulate)
    }

    /// The mat-vec kernel: out (+)= x . w^T; `accumulate` adds into out (the residual
    /// epilogue).
    fn matvec(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "matmul";
        let (n, k, dtype) = (w.rows, w.cols, w.dtype);
        let rb = checks::row_bytes(dtype, k, OP)?;
        let wp = self.ptr(&w.buf, n * rb, "the weights", OP)?;
        let o = self.ptr(out, rows * n * 4, "out", OP)?;
        let xp = self.ptr(x, rows * k * 4, "x", OP)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let p = MatmulParams {
            rows: u32_of(rows, "rows", OP)?,
            n: u32_of(n, "n", OP)?,
            k: u32_of(k, "k", OP)?,
            out_stride: u32_of(n, "n", OP)?,
            col0: 0,
            accumulate: accumulate as u32,
            _pad: [0; 2],
        };
        let grid = (
            u32_of(n.div_ceil(8), "n", OP)?,
            u32_of(rows.div_ceil(4), "rows", OP)?,
            1,
        );
        let f = self.kernels.get("matmul", by_dtype!("matvec_", dtype))?;
        self.launch(&f, grid, 256, 0, &[arg(&o), arg(&xp), arg(&wp), arg(&p)])
    }
}

impl Backend for Cuda {
    type Raw = DevBuf;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_name(&self) -> String {
        let mut v = 0;
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        format!(
            "{} ({}, CUDA driver {}.{})",
            self.name,
            self.arch,
            v / 1000,
            (v % 1000) / 10
        )
    }

    /// Total and free device memory from the driver; CUDA allocations have no size cap below
    /// the device's memory.
    fn memory_limits(&self) -> crate::backend::MemoryLimits {
        let (free, total) = self.memory_info().unwrap_or((0, 0));
        let known = |v: usize| (v > 0).then_some(v as u64);
        crate::backend::MemoryLimits {
            total: known(total),
            available: known(free),
            max_buffer: known(total),
        }
    }

    fn alloc_raw(&self, bytes: usize) -> Result<DevBuf> {
        match self.alloc_dev(bytes) {
            Ok(b) => Ok(b),
            Err(_) => {
                // Pooled free buffers may hold what is needed: free them, retry.
                self.pool.trim();
                self.sync()?;
                self.alloc_dev(bytes)
            }
        }
    }

    fn pool(&self) -> &Arc<Pool<Self>> {
        &self.pool
    }

    fn decode_step(&self, ops: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.run_step(ops)
    }

    fn upload(&self, dst: &mut Buf<Self>, offset: usize, data: &[u8]) -> Result<()> {
        let end = offset.saturating_add(data.len());
        let d = self.ptr(dst, end, "dst", "upload")?;
        if !self.outside_step() || data.is_empty() {
            return Ok(());
        }
        self.upload_raw(d + offset as u64, data)
    }

    fn copy(
        &self,
        dst: &mut Buf<Self>,
        dst_offset: usize,
        src: &Buf<Self>,
        src_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        let d = self.ptr(dst, dst_offset.saturating_add(bytes), "dst", "copy")?;
        let s = self.ptr(src, src_offset.saturating_add(bytes), "src", "copy")?;
        if !self.outside_step() || bytes == 0 {
            return Ok(());
        }
        let _exclusive = self.graphs.exclusive();
        unsafe {
            result::memcpy_dtod_async(
                d + dst_offset as u64,
                s + src_offset as u64,
                bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(cuda_err("copy"))
    }

    fn read(&self, src: &Buf<Self>, offset: usize, out: &mut [u8]) -> Result<()> {
        let s = self.ptr(src, offset.saturating_add(out.len()), "src", "read")?;
        if !self.outside_step() {
            return Ok(());
        }
        if !out.is_empty() {
            let _exclusive = self.graphs.exclusive();
            unsafe { result::memcpy_dtoh_async(out, s + offset as u64, self.stream.cu_stream()) }
                .map_err(cuda_err("read"))?;
        }
        self.sync()
    }

    fn read_start(&self, src: &Buf<Self>, offset: usize, bytes: usize) -> Result<PendingRead> {
        let s = self.ptr(src, offset.saturating_add(bytes), "src", "read")?;
        if !self.outside_step() || bytes == 0 {
            return Ok(PendingRead::Done(vec![0; bytes]));
        }
        self.read_start_raw(s + offset as u64, bytes)
    }

    fn read_finish(&self, read: PendingRead, out: &mut [u8]) -> Result<()> {
        match read {
            PendingRead::InFlight { ticket, .. } => self.read_finish_raw(ticket, out),
            done => done.take_done(out),
        }
    }

    fn sync(&self) -> Result<()> {
        if !self.outside_step() {
            return Ok(());
        }
        self.stream.synchronize().map_err(|e| {
            dev(format!(
                "CUDA (a kernel failed or the device was lost): {e}"
            ))
        })?;
        if let Some(p) = &self.profile {
            p.collect();
        }
        Ok(())
    }

    fn embedding(
        &self,
        out: &mut Buf<Self>,
        tokens: &Buf<Self>,
        table: &Weight<Self>,
        n_tokens: usize,
    ) -> Result<()> {
        const OP: &str = "embedding";
        let dim = table.cols;
        let rb = checks::row_bytes(table.dtype, dim, OP)?;
        let w = self.ptr(&table.buf, table.rows * rb, "the table", OP)?;
        let o = self.ptr(out, n_tokens * dim * 4, "out", OP)?;
        let t = self.ptr(tokens, n_tokens * 4, "tokens", OP)?;
        let per_row = if table.dtype.block_elems() > 1 || dim % 8 == 0 {
            dim / 8
        } else {
            dim
        };
        let p = EmbeddingParams {
            n_tokens: u32_of(n_tokens, "n_tokens", OP)?,
            dim: u32_of(dim, "dim", OP)?,
            row0: 0,
            chunk_rows: u32_of(table.rows, "rows", OP)?,
            vocab: u32_of(table.rows, "rows", OP)?,
            _pad: [0; 3],
        };
        let name = by_dtype!("embedding_", table.dtype);
        self.launch_1d(
            "embedding",
            name,
            n_tokens * per_row,
            BLOCK,
            &[arg(&o), arg(&t), arg(&w), arg(&p)],
        )
    }

    fn rms_norm(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Buf<Self>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rms_norm";
        let o = self.ptr(out, rows * dim * 4, "out", OP)?;
        let xp = self.ptr(x, rows * dim * 4, "x", OP)?;
        let wp = self.ptr(w, dim * 4, "w", OP)?;
        let p = RmsNormParams {
            rows: u32_of(rows, "rows", OP)?,
            dim: u32_of(dim, "dim", OP)?,
            eps,
            _pad: 0,
        };
        let block = (dim / 4).next_power_of_two().clamp(32, 1024) as u32;
        let f = self.kernels.get("rms_norm", "rms_norm")?;
        self.launch(
            &f,
            (p.rows, 1, 1),
            block,
            0,
            &[arg(&o), arg(&xp), arg(&wp), arg(&p)],
        )
    }

    fn matmul(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
    ) -> Result<()> {
        if takes_gemm(rows, w) {
            return self.matmul_gemm(out, x, w, rows, false);
        }
        self.matvec(out, x, w, rows, false)
    }

    /// Without a bias: the mat-vec's epilogue (decode) or the GEMM's beta = 1 (prefill) adds
    /// into the residual stream, with no temporary. With one: the unfused ops.
    fn matmul_residual(
        &self,
        resid: &mut Buf<Self>,
        tmp: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        bias: Option<&Buf<Self>>,
        rows: usize,
    ) -> Result<()> {
        if bias.is_some() {
            return matmul_residual_unfused(self, resid, tmp, x, w, bias, rows);
        }
        if takes_gemm(rows, w) {
            return self.matmul_gemm(resid, x, w, rows, true);
        }
        self.matvec(resid, x, w, rows, true)
    }

    /// Decode: one fused mat-vec (fused.rs). Prefill: the norm writes its output rounded for
    /// the GEMMs, once for all three, when they share the rounding (fused.rs).
    fn norm_qkv(
        &self,
        qkv: [&mut Buf<Self>; 3],
        xb: &mut Buf<Self>,
        x: RmsNormed<'_, Self>,
        w: [&Weight<Self>; 3],
        rows: usize,
    ) -> Result<()> {
        let same = w
            .iter()
            .all(|m| m.dtype == w[0].dtype && m.cols == w[0].cols);
        if rows <= MATVEC_MAX_ROWS && same && fused::fusable(rows, w[0].cols) {
            return self.norm_qkv_fused(qkv, x, w, rows);
        }
        if rows > MATVEC_MAX_ROWS {
            if let Some(elem) = self.shared_half_input(&w) {
                return self.norm_qkv_gemm(qkv, x, w, rows, elem);
            }
        }
        norm_qkv_unfused(self, qkv, xb, x, w, rows)
    }

    /// As norm_qkv: one fused mat-vec for decode, one rounded norm output for both GEMMs of a
    /// prefill.
    fn ffn_gate_up(
        &self,
        out: &mut Buf<Self>,
        scratch: [&mut Buf<Self>; 3],
        x: RmsNormed<'_, Self>,
        w: (&Weight<Self>, &Weight<Self>),
        bias: (Option<&Buf<Self>>, Option<&Buf<Self>>),
        rows: usize,
    ) -> Result<()> {
        let same = w.0.dtype == w.1.dtype && w.0.rows == w.1.rows && w.0.cols == w.1.cols;
        let plain = bias.0.is_none() && bias.1.is_none() && fused::fusable(rows, w.0.cols);
        if rows <= MATVEC_MAX_ROWS && plain && same {
            return self.gate_up_fused(out, x, w, rows);
        }
        if rows > MATVEC_MAX_ROWS && w.0.rows == w.1.rows {
            if let Some(elem) = self.shared_half_input(&[w.0, w.1]) {
                return self.gate_up_gemm(out, scratch, x, w, bias, rows, elem);
            }
        }
        ffn_gate_up_unfused(self, out, scratch, x, w, bias, rows)
    }

    /// One launch (fused.rs) instead of rope + kv_append.
    fn rope_kv_append(
        &self,
        q: &mut Buf<Self>,
        k: &mut Buf<Self>,
        v: &Buf<Self>,
        cache: KvSlot<'_, Self>,
        rope: RopeArgs<'_, Self>,
        rows: usize,
        pos0: usize,
        heads: Heads,
    ) -> Result<()> {
        self.rope_kv_append_fused(q, k, v, cache, rope, rows, pos0, heads)
    }

    fn add_bias(&self, x: &mut Buf<Self>, bias: &Buf<Self>, rows: usize, n: usize) -> Result<()> {
        const OP: &str = "add_bias";
        let xp = self.ptr(x, rows * n * 4, "x", OP)?;
        let b = self.ptr(bias, n * 4, "bias", OP)?;
        let p = AddBiasParams {
            rows: u32_of(rows, "rows", OP)?,
            n: u32_of(n, "n", OP)?,
            _pad: [0; 2],
        };
        self.launch_1d(
            "add_bias",
            "add_bias",
            rows * n,
            BLOCK,
            &[arg(&xp), arg(&b), arg(&p)],
        )
    }

    fn rope(
        &self,
        q: &mut Buf<Self>,
        k: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
        attn_scale: f32,
    ) -> Result<()> {
        const OP: &str = "rope";
        checks::heads(h, OP, HEAD_DIM_MAX)?;
        let qp = self.ptr(q, rows * h.n_heads * h.head_dim * 4, "q", OP)?;
        let kp = self.ptr(k, rows * h.n_kv_heads * h.head_dim * 4, "k", OP)?;
        let f = self.ptr(inv_freq, h.head_dim / 2 * 4, "inv_freq", OP)?;
        let (pos, pos_dev) = self.step_pos(pos0)?;
        let p = RopeParams {
            rows: u32_of(rows, "rows", OP)?,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: pos,
            attn_scale,
            _pad: [0; 2],
        };
        let threads = rows * (h.n_heads + h.n_kv_heads) * h.head_dim / 2;
        self.launch_1d(
            "rope",
            "rope",
            threads,
            BLOCK,
            &[arg(&qp), arg(&kp), arg(&f), arg(&p), arg(&pos_dev)],
        )
    }

    fn kv_append(
        &self,
        k_cache: &mut Buf<Self>,
        v_cache: &mut Buf<Self>,
        kv_dtype: DType,
        table: &Buf<Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "kv_append";
        checks::heads(h, OP, HEAD_DIM_MAX)?;
        let f16 = checks::kv_is_f16(kv_dtype, OP)? as u32;
        let width = h.n_kv_heads * h.head_dim;
        let end = pos0 + rows;
        let blocks = end.div_ceil(KV_BLOCK);
        let t = self.ptr(table, blocks * 4, "the block table", OP)?;
        // Every block id the table may hold must address inside the cache.
        let block_bytes = KV_BLOCK * width * if f16 == 1 { 2 } else { 4 };
        let kc = self.ptr(k_cache, block_bytes, "the K cache", OP)?;
        let vc = self.ptr(v_cache, block_bytes, "the V cache", OP)?;
        let kp = self.ptr(k, rows * width * 4, "k", OP)?;
        let vp = self.ptr(v, rows * width * 4, "v", OP)?;
        let (pos, pos_dev) = self.step_pos(pos0)?;
        let p = KvAppendParams {
            rows: u32_of(rows, "rows", OP)?,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: pos,
            kv_f16: f16,
            _pad: [0; 3],
        };
        self.launch_1d(
            "kv_append",
            "kv_append",
            rows * width,
            BLOCK,
            &[
                arg(&kc),
                arg(&vc),
                arg(&t),
                arg(&kp),
                arg(&vp),
                arg(&p),
                arg(&pos_dev),
                arg(&0u32),
            ],
        )
    }

    fn attention(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "attention";
        checks::heads(h, OP, HEAD_DIM_MAX)?;
        let f16 = checks::kv_is_f16(kv.dtype, OP)? as u32;
        let width = h.n_heads * h.head_dim;
        let o = self.ptr(out, rows * width * 4, "out", OP)?;
        let qp = self.ptr(q, rows * width * 4, "q", OP)?;
        let n_pos = pos0 + rows;
        let t = self.ptr(
            kv.table,
            n_pos.div_ceil(KV_BLOCK) * 4,
            "the block table",
            OP,
        )?;
        let kc = kv.k.raw().ptr;
        let vc = kv.v.raw().ptr;
        let mut p = AttentionParams {
            rows: u32_of(rows, "rows", OP)?,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: u32_of(pos0, "pos0", OP)?,
            kv_f16: f16,
            scale: 1.0 / (h.head_dim as f32).sqrt(),
            split_len: 0,
        };
        // While recording, decode sizes for the end of the position bucket.
        let n_ref = if self.graphs.recording() {
            n_pos.next_multiple_of(POS_BUCKET)
        } else {
            n_pos
        };
        if let Some(plan) = decode_plan(rows, n_ref, h, f16 == 1, self.short_decode) {
            let (pos, pos_dev) = self.step_pos(pos0)?;
            p.pos0 = pos;
            return self.attention_decode(plan, [o, qp, kc, vc, t], p, (pos_dev, 0));
        }
        if rows >= GEMM_ATTENTION_MIN_ROWS && !self.graphs.recording() {
            return self.attention_gemm(o, qp, (kc, vc, t), p);
        }
        let name = match h.head_dim {
            0..=64 => "attention_prefill_16",
            65..=128 => "attention_prefill_32",
            _ => "attention_prefill_64",
        };
        let f = self.kernels.get("attention", name)?;
        let shared = (2 * 16 * h.head_dim * 4) as u32;
        let grid = (u32_of(rows.div_ceil(32), "rows", OP)?, h.n_heads as u32, 1);
        self.launch(
            &f,
            grid,
            128,
            shared,
            &[arg(&o), arg(&qp), arg(&kc), arg(&vc), arg(&t), arg(&p)],
        )
    }

    fn swiglu(
        &self,
        out: &mut Buf<Self>,
        gate: &Buf<Self>,
        up: &Buf<Self>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu";
        let o = self.ptr(out, n * 4, "out", OP)?;
        let g = self.ptr(gate, n * 4, "gate", OP)?;
        let u = self.ptr(up, n * 4, "up", OP)?;
        let p = ElementwiseParams {
            n: u32_of(n, "n", OP)?,
            _pad: [0; 3],
        };
        self.launch_1d(
            "swiglu",
            "swiglu",
            n.div_ceil(4), // four elements a thread
            BLOCK,
            &[arg(&o), arg(&g), arg(&u), arg(&p)],
        )
    }

    fn add(&self, x: &mut Buf<Self>, y: &Buf<Self>, n: usize) -> Result<()> {
        const OP: &str = "add";
        let xp = self.ptr(x, n * 4, "x", OP)?;
        let yp = self.ptr(y, n * 4, "y", OP)?;
        let p = ElementwiseParams {
            n: u32_of(n, "n", OP)?,
            _pad: [0; 3],
        };
        self.launch_1d("add", "add", n, BLOCK, &[arg(&xp), arg(&yp), arg(&p)])
    }

    /// add.cu's dropout (LoRA's input dropout in training).
    fn dropout(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        p: f32,
        seed: u32,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "dropout";
        let op = self.ptr(out, n * 4, "out", OP)?;
        let xp = self.ptr(x, n * 4, "x", OP)?;
        let params = super::train_params::DropoutParams {
            n: u32_of(n, "n", OP)?,
            threshold: crate::backend::dropout_threshold(p),
            seed,
            scale: 1.0 / (1.0 - p),
        };
        self.launch_1d(
            "add",
            "dropout",
            n,
            BLOCK,
            &[arg(&op), arg(&xp), arg(&params)],
        )
    }

    /// Outside exact mode one TF32 GEMM (train.rs's `sgemm`), as LoRA's other thin products:
    /// cuBLAS's f32 SGEMM reads x at a fraction of the bandwidth with so few output columns.
    fn lora_down(
        &self,
        u: &mut Buf<Self>,
        x: &Buf<Self>,
        a: &Weight<Self>,
        rows: usize,
    ) -> Result<()> {
        const OP: &str = "lora_down";
        let (n, k) = (a.rows, a.cols);
        if self.exact || !takes_gemm(rows, a) || a.dtype != DType::F32 || k == 0 {
            return self.matmul(u, x, a, rows);
        }
        let up = self.ptr(u, rows * n * 4, "u", OP)?;
        let xp = self.ptr(x, rows * k * 4, "x", OP)?;
        let ap = self.ptr(&a.buf, n * k * 4, "the weights", OP)?;
        let (am, xm) = ((ap, k), (xp, k));
        self.sgemm((true, false), (n, rows, k), 1.0, am, xm, 0.0, (up, n), OP)
    }

    /// Prefill through f32 weights (LoRA's B): one SGEMM with alpha and beta = 1 into out;
    /// otherwise (decode's mat-vecs, other dtypes) matmul and add_scaled.
    fn matmul_add_scaled(
        &self,
        out: &mut Buf<Self>,
        tmp: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "matmul_add_scaled";
        let (n, k) = (w.rows, w.cols);
        if !takes_gemm(rows, w) || w.dtype != DType::F32 || k == 0 {
            self.matmul(tmp, x, w, rows)?;
            return self.add_scaled(out, tmp, alpha, rows * n);
        }
        let op = self.ptr(out, rows * n * 4, "out", OP)?;
        let xp = self.ptr(x, rows * k * 4, "x", OP)?;
        let wp = self.ptr(&w.buf, n * k * 4, "the weights", OP)?;
        let (a, b) = ((wp, k), (xp, k));
        self.sgemm((true, false), (n, rows, k), alpha, a, b, 1.0, (op, n), OP)
    }

    /// add.cu's axpy (LoRA's scaled product into its projection's output).
    fn add_scaled(&self, x: &mut Buf<Self>, y: &Buf<Self>, alpha: f32, n: usize) -> Result<()> {
        crate::backend::train::TrainBackend::axpy(self, x, y, alpha, n)
    }

    fn kv_append_rows(
        &self,
        cache: KvSlot<'_, Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        rows: RowsView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        self.kv_append_rows_kernel(cache, k, v, rows, heads)
    }

    fn attention_rows(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: RowsView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        self.attention_rows_kernel(out, q, kv, rows, heads)
    }

    /// train_attention.rs: rope.cu's rope_rows, one thread per rotated pair.
    fn rope_rows(
        &self,
        x: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        pos: &Buf<Self>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        attn_scale: f32,
    ) -> Result<()> {
        let shape = (rows, n_heads, head_dim);
        self.rope_rows_kernel("rope_rows", x, inv_freq, pos, shape, attn_scale)
    }

    /// train_attention.rs: attention_train.cu's flash-style f32 kernel over the packed rows.
    fn attention_packed(
        &self,
        out: &mut Buf<Self>,
        lse: Option<&mut Buf<Self>>,
        q: &Buf<Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        batch: BatchView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        self.attention_packed_kernel(out, lse, q, k, v, batch, heads)
    }

    fn sample(
        &self,
        out: &mut Buf<Self>,
        out_index: usize,
        logits: &Buf<Self>,
        vocab: usize,
        s: SampleOp,
    ) -> Result<()> {
        const OP: &str = "sample";
        if vocab == 0 {
            return Err(dev(format!("{OP}: empty vocabulary")));
        }
        let o = self.ptr(out, (out_index + 1) * 4, "out", OP)?;
        let l = self.ptr(logits, vocab * 4, "logits", OP)?;
        let probs = self.scratch(Scratch::SampleProbs, (vocab + 1) * 4)?;
        let p = SampleParams {
            vocab: u32_of(vocab, "vocab", OP)?,
            top_k: s.top_k.min(u32::MAX as usize) as u32,
            top_p: s.top_p,
            min_p: s.min_p,
            temperature: s.temperature,
            uniform: s.uniform,
            out_index: u32_of(out_index, "out_index", OP)?,
            _pad: 0,
        };
        let f = self.kernels.get("sample", "sample")?;
        self.launch(
            &f,
            (1, 1, 1),
            1024,
            0,
            &[arg(&o), arg(&l), arg(&probs), arg(&p)],
        )?;
        let f = self.kernels.get("sample_walk", "sample_walk")?;
        self.launch(&f, (1, 1, 1), 1024, 0, &[arg(&o), arg(&probs), arg(&p)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Heads {
        Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    #[test]
    fn decode_plan_picks_the_kernel_and_covers_the_context() {
        let h8b = heads(32, 8, 128);
        // f16 cache: one split (covering the context) up to the limit, then ~264 blocks.
        assert_eq!(
            decode_plan(1, 2048, h8b, true, 2048),
            Some(DecodePlan::F16 {
                splits: 1,
                split_len: 2048
            })
        );
        assert_eq!(
            decode_plan(1, 8192, h8b, true, 2048),
            Some(DecodePlan::F16 {
                splits: 8,
                split_len: 1024
            })
        );
        // An f32 cache, or a head_dim that is not a power of two: the grouped kernel.
        assert!(matches!(
            decode_plan(1, 300, h8b, false, 2048),
            Some(DecodePlan::Grouped { .. })
        ));
        assert!(matches!(
            decode_plan(1, 300, heads(8, 1, 96), true, 2048),
            Some(DecodePlan::Grouped { .. })
        ));
        // Prefill row counts, and shapes beyond the grouped kernel: neither decode kernel.
        assert_eq!(decode_plan(5, 300, h8b, true, 2048), None);
        assert_eq!(decode_plan(1, 300, heads(34, 2, 96), false, 2048), None);
        // Every split plan covers the context in splits of whole warps of positions.
        for n_pos in [1, 31, 33, 997, 2049, 8192, 100_000] {
            for (h, f16, short) in [(h8b, true, 0), (heads(9, 3, 64), false, 2048)] {
                let (DecodePlan::F16 { splits, split_len }
                | DecodePlan::Grouped { splits, split_len }) =
                    decode_plan(1, n_pos, h, f16, short).unwrap();
                assert_eq!(split_len % 32, 0, "{n_pos} {h:?}");
                assert!(splits * split_len >= n_pos && (splits - 1) * split_len < n_pos);
            }
        }
    }
}
