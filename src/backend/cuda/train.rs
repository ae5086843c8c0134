//! `TrainBackend` for CUDA: the backward ops, the fused loss and the optimizer (train.rs has the
//! contract). Kernels sit beside their forwards (rms_norm.cu, rope.cu, swiglu.cu, embedding.cu,
//! add.cu) or in their own files (attention_train.cu, cross_entropy.cu, adamw.cu).
//! The matmul backward's GEMMs: in exact mode cuBLAS SGEMMs in f32 (no TF32), every weight
//! dtype widened to f32 first, so gradients match the CPU reference to f32 rounding. By default
//! (not exact) they run on bf16 tensor cores with f32 accumulation and f32 output: matmul_dx
//! reads bf16 weights as stored and dequantizes f16 and block-format weights to bf16 slices,
//! with dy rounded to bf16; matmul_dw rounds dy and x to bf16 and adds into the f32 dW
//! (beta = 1). bf16 rather than f16 for every half operand: gradients of a mean loss are
//! routinely below f16's normal range (6e-5) and would lose their bits or flush to zero.
//! f32 weights (LoRA adapters, f32 checkpoints), widths that are not multiples of 8, and
//! small weight-gradient products (`half_dw`) stay on SGEMM. The loss's GEMMs (train_loss.rs)
//! are f32. Attention: train_attention.rs; the loss: train_loss.rs.

use super::gemm::Elem;
use super::launch::{arg, Scratch};
use super::ops::u32_of;
use super::train_params::{AdamWParams, AxpyParams};
use super::Cuda;
use crate::backend::checks;
use crate::backend::params::{ElementwiseParams, EmbeddingParams, RmsNormParams};
use crate::backend::train::{AdamW, TrainBackend};
use crate::backend::{Backend, Heads, Weight};
use crate::batch::BatchView;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::Buf;
use cudarc::cublas::{result as blas, sys as bsys};
use std::ffi::c_void;

/// Threads per block of the one-thread-per-element kernels.
const BLOCK: u32 = 256;
/// Most bytes of a weight widened to f32 at once (matmul_dx, cross_entropy).
const WIDEN_SCRATCH: usize = 256 << 20;
/// Most bytes of a weight dequantized to bf16 at once (matmul_dx's tensor-core path).
const HALF_SCRATCH: usize = 256 << 20;
/// matmul_dw's rows and narrower side from which it runs on bf16 tensor cores (`half_dw`).
const HALF_DW_MIN_ROWS: usize = 64;
const HALF_DW_MIN_SIDE: usize = 65;
/// Blocks of sum_squares_partial (a fixed grid, so the sum's order is fixed).
const SUM_BLOCKS: usize = 512;
/// Rows per chunk of rms_norm_backward's weight-gradient column sums (at most DW_CHUNKS).
const DW_CHUNK_ROWS: usize = 64;
const DW_CHUNKS: usize = 256;

fn elementwise(n: usize, op: &str) -> Result<ElementwiseParams> {
    Ok(ElementwiseParams {
        n: u32_of(n, "n", op)?,
        _pad: [0; 3],
    })
}

fn i32_of(v: usize, op: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Device(format!("{op}: GEMM dimension {v} past i32")))
}

/// A column-major operand of `sgemm`: device address and leading dimension.
pub(super) type Mat = (u64, usize);

impl Cuda {
    /// C (m x n) = alpha op(A) op(B) + beta C, column-major f32 operands and result. `trans`
    /// says which of A, B are transposed; row-major callers pass their matrices as the
    /// column-major transposes they are. Exact mode computes in f32 (SGEMM's arithmetic); the
    /// default variant lets cuBLAS round the operands to TF32 (10-bit mantissa, f32
    /// accumulation) on tensor cores, finer than the bf16 of the step's big products: LoRA's
    /// thin products ran 1.12x faster a whole step at Llama-3.2-1B batch 4 x 2048 on an H200.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm(
        &self,
        trans: (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, lda): Mat,
        (b, ldb): Mat,
        beta: f32,
        (c, ldc): Mat,
        op: &str,
    ) -> Result<()> {
        if self.graphs.recording() {
            self.graphs.not_graphable();
            return Ok(());
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let t = |yes: bool| {
            if yes {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (mi, ni, ki) = (i32_of(m, op)?, i32_of(n, op)?, i32_of(k, op)?);
        let (la, lb, lc) = (i32_of(lda, op)?, i32_of(ldb, op)?, i32_of(ldc, op)?);
        let compute = match self.exact {
            true => bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            false => bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        let f32_ty = bsys::cudaDataType::CUDA_R_32F;
        let _exclusive = self.graphs.exclusive();
        let name = self.profile_name("cublas f32/tf32", op);
        self.timed(&name, || unsafe {
            blas::gemm_ex(
                self.blas.handle,
                t(trans.0),
                t(trans.1),
                mi,
                ni,
                ki,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                f32_ty,
                la,
                b as *const c_void,
                f32_ty,
                lb,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                f32_ty,
                lc,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
        .map_err(|e| Error::Device(format!("{op}: cuBLAS GEMM (f32): {e:?}")))
    }

    /// Runs `f(n0, nc, w)` over row slices n0..n0 + nc of `w` with `w` an f32 [nc, w.cols]
    /// matrix: f32 weights as they are (one slice), every other dtype widened into scratch,
    /// at most WIDEN_SCRATCH bytes at a time.
    pub(super) fn f32_weight_slices(
        &self,
        w: &Weight<Cuda>,
        op: &str,
        mut f: impl FnMut(usize, usize, u64) -> Result<()>,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        let rb = checks::row_bytes(w.dtype, k, op)?;
        let wp = self.ptr(&w.buf, n * rb, "the weights", op)?;
        if w.dtype == DType::F32 {
            return f(0, n, wp);
        }
        let chunk = (WIDEN_SCRATCH / (k * 4).max(1)).clamp(1, n.max(1));
        let mut n0 = 0;
        while n0 < n {
            let nc = chunk.min(n - n0);
            let src = wp + (n0 * rb) as u64;
            let dst = self.scratch(Scratch::TrainW, nc * k * 4)?;
            let (nn, kk) = (u32_of(nc, "rows", op)?, u32_of(k, "cols", op)?);
            if k % 8 == 0 {
                let name = by_dtype!("widen_", w.dtype, "_f32");
                self.launch_1d(
                    "matmul",
                    name,
                    nc * k / 8,
                    BLOCK,
                    &[arg(&dst), arg(&src), arg(&nn), arg(&kk)],
                )?;
            } else {
                // Only f16 / bf16 rows can be other than whole octets (blocks are 32 wide).
                let name = match w.dtype {
                    DType::F16 => "widen1_f16_f32",
                    DType::BF16 => "widen1_bf16_f32",
                    other => return Err(Error::Device(format!("{op}: {other} rows of {k}"))),
                };
                let count = u32_of(nc * k, "elements", op)?;
                self.launch_1d(
                    "matmul",
                    name,
                    nc * k,
                    BLOCK,
                    &[arg(&dst), arg(&src), arg(&count)],
                )?;
            }
            f(n0, nc, dst)?;
            n0 += nc;
        }
        Ok(())
    }
}

impl Cuda {
    /// Whether matmul_dx through a weight of `dtype` [n, k] runs on bf16 tensor cores: not in
    /// exact mode, not for f32 weights, and rows of both dy (n) and dx (k) whole octets, so
    /// every half operand's rows and slices start 16-byte aligned. Always faster than the f32
    /// path when it applies: the weight is read as 2-byte values (bf16 as stored, others
    /// dequantized once per call into a 2-byte scratch) instead of widened to 4-byte ones.
    pub(super) fn half_dx(&self, dtype: DType, n: usize, k: usize) -> bool {
        !self.exact && dtype != DType::F32 && n % 8 == 0 && k % 8 == 0
    }

    /// Whether matmul_dw of dy [rows, n] and x [rows, k] runs on bf16 tensor cores. Size rule:
    /// rows >= 64 and min(n, k) >= 65 (and n, k multiples of 8), else f32 SGEMM. The bf16 path
    /// moves ~8 bytes per operand value (the rounding pass reads 4 and writes 2, the GEMM reads
    /// 2), while f32 SGEMM (~50 TFLOP/s, no tensor cores) spends 2 n k / (n + k) flops per
    /// operand value: at ~4 TB/s they break even near n k / (n + k) = 50, a narrow side of ~50
    /// against a wide one, so products with a LoRA rank (n or k <= 64) on one side stay f32.
    /// With few rows both paths read and write dW (8 bytes per element) and the product adds
    /// only 2 rows flops per element: below ~50 rows that traffic dominates either way.
    fn half_dw(&self, rows: usize, n: usize, k: usize) -> bool {
        !self.exact
            && rows >= HALF_DW_MIN_ROWS
            && n.min(k) >= HALF_DW_MIN_SIDE
            && n % 8 == 0
            && k % 8 == 0
    }

    /// Runs `f(n0, nc, w)` over row slices n0..n0 + nc of `w` with `w` a bf16 [nc, w.cols]
    /// matrix: bf16 weights as stored (one slice), f16 and block-format weights dequantized
    /// to bf16 into scratch, at most HALF_SCRATCH bytes (and a multiple of 8 rows) at a time.
    /// The caller has checked that rows are whole octets (w.cols % 8 == 0) and that `w` is
    /// not f32.
    pub(super) fn bf16_weight_slices(
        &self,
        w: &Weight<Cuda>,
        op: &str,
        mut f: impl FnMut(usize, usize, u64) -> Result<()>,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        let rb = checks::row_bytes(w.dtype, k, op)?;
        let wp = self.ptr(&w.buf, n * rb, "the weights", op)?;
        if w.dtype == DType::BF16 {
            return f(0, n, wp);
        }
        let chunk = (HALF_SCRATCH / (k * 2).max(1) / 8 * 8).clamp(8, n.max(8));
        let name = by_dtype!("widen_", w.dtype, "_bf16");
        let mut n0 = 0;
        while n0 < n {
            let nc = chunk.min(n - n0);
            let src = wp + (n0 * rb) as u64;
            let dst = self.scratch(Scratch::GemmW, nc * k * 2)?;
            let (nn, kk) = (u32_of(nc, "rows", op)?, u32_of(k, "cols", op)?);
            self.launch_1d(
                "matmul",
                name,
                nc * k / 8,
                BLOCK,
                &[arg(&dst), arg(&src), arg(&nn), arg(&kk)],
            )?;
            f(n0, nc, dst)?;
            n0 += nc;
        }
        Ok(())
    }

    /// matmul_dx on bf16 tensor cores (half_dx said yes): dx^T (k x rows) = alpha W^T-as-stored
    /// (k x n) . dy^T (n x rows), one GEMM per bf16 slice of W (bf16_weight_slices), the slices
    /// after the first adding in; dy rounded to bf16 once.
    fn matmul_dx_half(
        &self,
        (dxp, dyp): (u64, u64),
        w: &Weight<Cuda>,
        rows: usize,
        alpha: f32,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "matmul_dx";
        let (n, k) = (w.rows, w.cols);
        let dyg = self.round_half(Scratch::GemmX, dyp, rows * n, Elem::BF16, OP)?;
        self.bf16_weight_slices(w, OP, |n0, nc, wg| {
            let beta = if n0 == 0 && !accumulate { 0.0 } else { 1.0 };
            let dys = dyg + (n0 * 2) as u64;
            self.half_gemm(
                Elem::BF16,
                (false, false),
                (k, rows, nc),
                alpha,
                (wg, k),
                (dys, n),
                beta,
                (dxp, k),
                OP,
            )
        })
    }
}

impl TrainBackend for Cuda {
    fn zero(&self, x: &mut Buf<Self>, n: usize) -> Result<()> {
        const OP: &str = "zero";
        let xp = self.ptr(x, n * 4, "x", OP)?;
        let p = elementwise(n, OP)?;
        self.launch_1d("add", "zero", n, BLOCK, &[arg(&xp), arg(&p)])
    }

    fn axpy(&self, y: &mut Buf<Self>, x: &Buf<Self>, alpha: f32, n: usize) -> Result<()> {
        const OP: &str = "axpy";
        let yp = self.ptr(y, n * 4, "y", OP)?;
        let xp = self.ptr(x, n * 4, "x", OP)?;
        let p = AxpyParams {
            n: u32_of(n, "n", OP)?,
            alpha,
            _pad: [0; 2],
        };
        self.launch_1d("add", "axpy", n, BLOCK, &[arg(&yp), arg(&xp), arg(&p)])
    }

    fn sum_squares(&self, out: &mut Buf<Self>, x: &Buf<Self>, n: usize) -> Result<()> {
        const OP: &str = "sum_squares";
        let o = self.ptr(out, 4, "out", OP)?;
        let xp = self.ptr(x, n * 4, "x", OP)?;
        let p = elementwise(n, OP)?;
        let blocks = n.div_ceil(BLOCK as usize * 8).clamp(1, SUM_BLOCKS);
        let part = self.scratch(Scratch::TrainPartials, blocks * 4)?;
        let f = self.kernels.get("add", "sum_squares_partial")?;
        self.launch(
            &f,
            (blocks as u32, 1, 1),
            BLOCK,
            0,
            &[arg(&part), arg(&xp), arg(&p)],
        )?;
        let f = self.kernels.get("add", "sum_squares_finish")?;
        let nb = blocks as u32;
        self.launch(&f, (1, 1, 1), 1024, 0, &[arg(&o), arg(&part), arg(&nb)])
    }

    /// dx^T (k x rows) = alpha W^T-as-stored (k x n) . dy^T (n x rows) in cuBLAS's column-major
    /// terms: on bf16 tensor cores where half_dx says so (matmul_dx_half), else one SGEMM per
    /// widened row slice of W, the slices after the first adding in.
    fn matmul_dx(
        &self,
        dx: &mut Buf<Self>,
        dy: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "matmul_dx";
        let (n, k) = (w.rows, w.cols);
        let dxp = self.ptr(dx, rows * k * 4, "dx", OP)?;
        let dyp = self.ptr(dy, rows * n * 4, "dy", OP)?;
        if n == 0 {
            return self.zero(dx, rows * k);
        }
        if self.half_dx(w.dtype, n, k) {
            return self.matmul_dx_half((dxp, dyp), w, rows, alpha, false);
        }
        self.f32_weight_slices(w, OP, |n0, nc, wp| {
            let beta = if n0 == 0 { 0.0 } else { 1.0 };
            let dys = dyp + (n0 * 4) as u64;
            self.sgemm(
                (false, false),
                (k, rows, nc),
                alpha,
                (wp, k),
                (dys, n),
                beta,
                (dxp, k),
                OP,
            )
        })
    }

    /// f32 weights (LoRA's A): one SGEMM with beta = 1 into dx; weights on the bf16 path
    /// (half_dx) the same GEMMs as matmul_dx, all with beta = 1; others compose.
    fn matmul_dx_add(
        &self,
        dx: &mut Buf<Self>,
        tmp: &mut Buf<Self>,
        dy: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "matmul_dx_add";
        let (n, k) = (w.rows, w.cols);
        if n > 0 && self.half_dx(w.dtype, n, k) {
            let dxp = self.ptr(dx, rows * k * 4, "dx", OP)?;
            let dyp = self.ptr(dy, rows * n * 4, "dy", OP)?;
            return self.matmul_dx_half((dxp, dyp), w, rows, alpha, true);
        }
        if w.dtype != DType::F32 || n == 0 {
            self.matmul_dx(tmp, dy, w, rows, alpha)?;
            return self.add(dx, tmp, rows * k);
        }
        let dxp = self.ptr(dx, rows * k * 4, "dx", OP)?;
        let dyp = self.ptr(dy, rows * n * 4, "dy", OP)?;
        let wp = self.ptr(&w.buf, n * k * 4, "the weights", OP)?;
        let (a, b) = ((wp, k), (dyp, n));
        self.sgemm((false, false), (k, rows, n), alpha, a, b, 1.0, (dxp, k), OP)
    }

    /// dw (k x n column-major: row-major [n, k]) += alpha x^T-as-stored (k x rows) .
    /// dy (rows x n, the transpose of its stored n x rows): with x and dy rounded to bf16 on
    /// tensor cores where half_dw says so, else in f32.
    fn matmul_dw(
        &self,
        dw: &mut Buf<Self>,
        dy: &Buf<Self>,
        x: &Buf<Self>,
        rows: usize,
        n: usize,
        k: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "matmul_dw";
        let dwp = self.ptr(dw, n * k * 4, "dw", OP)?;
        let dyp = self.ptr(dy, rows * n * 4, "dy", OP)?;
        let xp = self.ptr(x, rows * k * 4, "x", OP)?;
        if self.half_dw(rows, n, k) {
            let xg = self.round_half(Scratch::GemmX, xp, rows * k, Elem::BF16, OP)?;
            let dyg = self.round_half(Scratch::GemmW, dyp, rows * n, Elem::BF16, OP)?;
            return self.half_gemm(
                Elem::BF16,
                (false, true),
                (k, n, rows),
                alpha,
                (xg, k),
                (dyg, n),
                1.0,
                (dwp, k),
                OP,
            );
        }
        self.sgemm(
            (false, true),
            (k, n, rows),
            alpha,
            (xp, k),
            (dyp, n),
            1.0,
            (dwp, k),
            OP,
        )
    }

    fn rms_norm_backward(
        &self,
        dx: &mut Buf<Self>,
        dweight: Option<&mut Buf<Self>>,
        dy: &Buf<Self>,
        x: &Buf<Self>,
        w: &Buf<Self>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rms_norm_backward";
        let dxp = self.ptr(dx, rows * dim * 4, "dx", OP)?;
        let dyp = self.ptr(dy, rows * dim * 4, "dy", OP)?;
        let xp = self.ptr(x, rows * dim * 4, "x", OP)?;
        let wp = self.ptr(w, dim * 4, "w", OP)?;
        let dwp = match &dweight {
            Some(d) => Some(self.ptr(d, dim * 4, "dweight", OP)?),
            None => None,
        };
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let p = RmsNormParams {
            rows: u32_of(rows, "rows", OP)?,
            dim: u32_of(dim, "dim", OP)?,
            eps,
            _pad: 0,
        };
        let rstd = self.scratch(Scratch::TrainRstd, rows * 4)?;
        let block = (dim / 4).next_power_of_two().clamp(32, 1024) as u32;
        let f = self.kernels.get("rms_norm", "rms_norm_backward")?;
        self.launch(
            &f,
            (p.rows, 1, 1),
            block,
            0,
            &[
                arg(&dxp),
                arg(&rstd),
                arg(&dyp),
                arg(&xp),
                arg(&wp),
                arg(&p),
            ],
        )?;
        let Some(dwp) = dwp else { return Ok(()) };
        let chunks = rows.div_ceil(DW_CHUNK_ROWS).min(DW_CHUNKS);
        let chunk_rows = rows.div_ceil(chunks) as u32;
        let part = self.scratch(Scratch::TrainPartials, chunks * dim * 4)?;
        let cols = u32_of(dim.div_ceil(BLOCK as usize), "dim", OP)?;
        let f = self.kernels.get("rms_norm", "rms_norm_dw_partial")?;
        self.launch(
            &f,
            (cols, chunks as u32, 1),
            BLOCK,
            0,
            &[
                arg(&part),
                arg(&dyp),
                arg(&xp),
                arg(&rstd),
                arg(&p),
                arg(&chunk_rows),
            ],
        )?;
        let f = self.kernels.get("rms_norm", "rms_norm_dw_finish")?;
        let nc = chunks as u32;
        self.launch(
            &f,
            (cols, 1, 1),
            BLOCK,
            0,
            &[arg(&dwp), arg(&part), arg(&p), arg(&nc)],
        )
    }

    fn rope_backward(
        &self,
        dx: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        pos: &Buf<Self>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        attn_scale: f32,
    ) -> Result<()> {
        self.rope_rows_kernel(
            "rope_backward",
            dx,
            inv_freq,
            pos,
            (rows, n_heads, head_dim),
            attn_scale,
        )
    }

    fn attention_backward(
        &self,
        dq: &mut Buf<Self>,
        dk: &mut Buf<Self>,
        dv: &mut Buf<Self>,
        dout: &Buf<Self>,
        q: &Buf<Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        out: &Buf<Self>,
        lse: &Buf<Self>,
        batch: BatchView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        self.attention_backward_kernels([dq, dk, dv], [dout, q, k, v, out, lse], batch, heads)
    }

    fn swiglu_backward(
        &self,
        dgate: &mut Buf<Self>,
        dup: &mut Buf<Self>,
        dout: &Buf<Self>,
        gate: &Buf<Self>,
        up: &Buf<Self>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu_backward";
        let dg = self.ptr(dgate, n * 4, "dgate", OP)?;
        let du = self.ptr(dup, n * 4, "dup", OP)?;
        let d = self.ptr(dout, n * 4, "dout", OP)?;
        let g = self.ptr(gate, n * 4, "gate", OP)?;
        let u = self.ptr(up, n * 4, "up", OP)?;
        let p = elementwise(n, OP)?;
        self.launch_1d(
            "swiglu",
            "swiglu_backward",
            n.div_ceil(4), // four elements a thread
            BLOCK,
            &[arg(&dg), arg(&du), arg(&d), arg(&g), arg(&u), arg(&p)],
        )
    }

    /// The table's rows are its buffer's length over the row's bytes: ids past them add
    /// nothing (the kernel cannot return an error; the CPU reference rejects them).
    fn embedding_backward(
        &self,
        dtable: &mut Buf<Self>,
        dout: &Buf<Self>,
        tokens: &Buf<Self>,
        n_tokens: usize,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let vocab = dtable.len() / (dim * 4).max(1);
        let dt = self.ptr(dtable, vocab * dim * 4, "dtable", OP)?;
        let d = self.ptr(dout, n_tokens * dim * 4, "dout", OP)?;
        let t = self.ptr(tokens, n_tokens * 4, "tokens", OP)?;
        let p = EmbeddingParams {
            n_tokens: u32_of(n_tokens, "n_tokens", OP)?,
            dim: u32_of(dim, "dim", OP)?,
            row0: 0,
            chunk_rows: u32_of(vocab, "vocab", OP)?,
            vocab: u32_of(vocab, "vocab", OP)?,
            _pad: [0; 3],
        };
        self.launch_1d(
            "embedding",
            "embedding_backward",
            n_tokens * dim,
            BLOCK,
            &[arg(&dt), arg(&d), arg(&t), arg(&p)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        loss: &mut Buf<Self>,
        dx: &mut Buf<Self>,
        dw: Option<&mut Buf<Self>>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        labels: &Buf<Self>,
        rows: usize,
        scale: f32,
    ) -> Result<()> {
        self.cross_entropy_chunks(loss, dx, dw, x, w, labels, rows, scale)
    }

    fn adamw(
        &self,
        param: &mut Buf<Self>,
        grad: &Buf<Self>,
        m: &mut Buf<Self>,
        v: &mut Buf<Self>,
        n: usize,
        h: AdamW,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let pp = self.ptr(param, n * 4, "param", OP)?;
        let mp = self.ptr(m, n * 4, "m", OP)?;
        let vp = self.ptr(v, n * 4, "v", OP)?;
        let gp = self.ptr(grad, n * 4, "grad", OP)?;
        // The bias corrections as the CPU reference computes them (f32).
        let t = h.step as i32;
        let p = AdamWParams {
            n: u32_of(n, "n", OP)?,
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            grad_scale: h.grad_scale,
            step_size: h.lr / (1.0 - h.beta1.powi(t)),
            bc2_sqrt: (1.0 - h.beta2.powi(t)).sqrt(),
            _pad: [0; 3],
        };
        self.launch_1d(
            "adamw",
            "adamw",
            n,
            BLOCK,
            &[arg(&pp), arg(&mp), arg(&vp), arg(&gp), arg(&p)],
        )
    }

    fn write_weight(&self, w: &mut Weight<Self>, src: &Buf<Self>) -> Result<()> {
        const OP: &str = "write_weight";
        let n = w.rows * w.cols;
        let s = self.ptr(src, n * 4, "src", OP)?;
        let name = match w.dtype {
            DType::F32 => return self.copy(&mut w.buf, 0, src, 0, n * 4),
            DType::F16 => "write_weight_f16",
            DType::BF16 => "write_weight_bf16",
            other => {
                return Err(Error::Usage(format!(
                    "a {other} weight cannot be trained directly (train LoRA adapters on it)"
                )))
            }
        };
        let d = self.ptr(&w.buf, n * 2, "the weight", OP)?;
        let p = elementwise(n, OP)?;
        self.launch_1d("adamw", name, n, BLOCK, &[arg(&d), arg(&s), arg(&p)])
    }
}
