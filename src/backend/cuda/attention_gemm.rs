//! Long-prefill attention on cuBLAS (shaders/cuda/attention.cu describes the kernels): gather
//! the paged K/V into contiguous matrices, S = Q K^T per kv head as strided-batched GEMMs (one
//! call per query head of the GQA group: the group's heads are `group * head_dim` apart in a q
//! row, so each call's batch stride is constant), causal softmax, O = P V written straight into
//! the output rows. Two precisions:
//! - exact (`CudaOptions::exact`): all f32 (SGEMM), the exact parity of the tiled kernel at
//!   GEMM speed.
//! - default: K, V, Q and the weights P in f16 on tensor cores, accumulated in f32; scores and
//!   output stay f32. An f16 cache is gathered bit for bit; Q and P (and an f32 cache) are
//!   rounded to f16, a relative error of at most 2^-11 each.
//!
//! The per-query-head calls keep the score matrix at `n_kv * rows * n_pos` values: one call
//! over the whole group would need `group` times that memory (2 GB for an 8B model at 32k
//! positions and 512-row chunks), and one call's scores (32 MB for a 512-row chunk at 2048
//! positions) can stay in an H100's L2 (50 MB) from the QK^T GEMM through the softmax to the
//! P V GEMM.

use super::launch::{arg, Scratch};
use super::Cuda;
use crate::backend::params::AttentionParams;
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::sys::CUfunction_attribute;
use std::ffi::c_void;

/// The f16 weights are softmax * P_SCALE (attention_softmax_f16 says why); the P V GEMM's alpha
/// is its inverse, a power of two, so the scaling costs no rounding.
const P_SCALE: f32 = 32768.0;

impl Cuda {
    /// out[rows, n_heads * hd] of attention over positions 0..pos0 + rows (p holds the shape).
    pub(super) fn attention_gemm(
        &self,
        out: u64,
        q: u64,
        cache: (u64, u64, u64),
        p: AttentionParams,
    ) -> Result<()> {
        let too_big = |v: usize| i32::try_from(v).is_err();
        let (rows, hd, n_heads) = (p.rows as usize, p.head_dim as usize, p.n_heads as usize);
        // Score rows are at most 2 * ld f16 values wide (the f16 path's view of them).
        let ld = (p.pos0 as usize + rows).next_multiple_of(8);
        if too_big(2 * ld) || too_big(n_heads * hd) || too_big(rows) {
            return Err(Error::Device("attention: GEMM dimensions past i32".into()));
        }
        if self.exact {
            self.attention_gemm_f32(out, q, cache, p)
        } else if hd == 64 || hd == 128 {
            self.attention_flash(out, q, cache, p)
        } else {
            self.attention_gemm_f16(out, q, cache, p)
        }
    }

    /// The default path for head sizes 64 and 128: shaders/cuda/attention_flash.cu, reading q
    /// and the paged cache as they are (no gather, no score matrix).
    fn attention_flash(
        &self,
        out: u64,
        q: u64,
        (k_cache, v_cache, table): (u64, u64, u64),
        p: AttentionParams,
    ) -> Result<()> {
        let name = if p.head_dim == 64 {
            "attention_flash_64"
        } else {
            "attention_flash_128"
        };
        let f = self.kernels.get("attention_flash", name)?;
        // Two stages of K and V tiles, 64 positions of head_dim + 8 f16 each; past 48 KiB a
        // kernel must opt in (once per function would do; the call costs far less than the
        // kernel).
        let shared = 4 * 64 * (p.head_dim + 8) * 2;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .map_err(|e| Error::Device(format!("attention: shared memory of {shared} bytes: {e}")))?;
        let grid = (p.rows.div_ceil(64), p.n_heads, 1);
        self.launch(
            &f,
            grid,
            128,
            shared,
            &[
                arg(&out),
                arg(&q),
                arg(&k_cache),
                arg(&v_cache),
                arg(&table),
                arg(&p),
            ],
        )
    }

    fn attention_gemm_f32(
        &self,
        out: u64,
        q: u64,
        cache: (u64, u64, u64),
        p: AttentionParams,
    ) -> Result<()> {
        let (k_cache, v_cache, table) = cache;
        let (rows, hd) = (p.rows as usize, p.head_dim as usize);
        let (n_heads, n_kv) = (p.n_heads as usize, p.n_kv_heads as usize);
        let group = n_heads / n_kv;
        let n_pos = p.pos0 as usize + rows;
        let kv_elems = n_kv * n_pos * hd;
        let kc = self.scratch(Scratch::AttnK, kv_elems * 4)?;
        let vc = self.scratch(Scratch::AttnV, kv_elems * 4)?;
        let s = self.scratch(Scratch::AttnScores, n_kv * rows * n_pos * 4)?;
        let np = n_pos as u32;
        self.launch_1d(
            "attention",
            "attention_gather",
            kv_elems,
            256,
            &[
                arg(&kc),
                arg(&vc),
                arg(&k_cache),
                arg(&v_cache),
                arg(&table),
                arg(&p),
                arg(&np),
            ],
        )?;
        let softmax = self.kernels.get("attention", "attention_softmax")?;
        let e = |e: blas::CublasError| Error::Device(format!("cuBLAS attention GEMM: {e:?}"));
        let (one, zero) = (1.0f32, 0.0f32);
        let (t, n) = (
            bsys::cublasOperation_t::CUBLAS_OP_T,
            bsys::cublasOperation_t::CUBLAS_OP_N,
        );
        for g in 0..group {
            let qg = q + (g * hd * 4) as u64;
            let og = out + (g * hd * 4) as u64;
            // S[kvh] (rows x n_pos, row-major) = Q_g[kvh] (rows x hd, row stride n_heads*hd)
            // . K[kvh]^T: column-major C (n_pos x rows) = op_T(K (hd x n_pos)) . Q (hd x rows).
            {
                let _exclusive = self.graphs.exclusive();
                self.timed("cublas attention QK^T", || unsafe {
                    blas::sgemm_strided_batched(
                        self.blas.handle,
                        t,
                        n,
                        n_pos as i32,
                        rows as i32,
                        hd as i32,
                        &one,
                        kc as *const f32,
                        hd as i32,
                        (n_pos * hd) as i64,
                        qg as *const f32,
                        (n_heads * hd) as i32,
                        (group * hd) as i64,
                        &zero,
                        s as *mut f32,
                        n_pos as i32,
                        (rows * n_pos) as i64,
                        n_kv as i32,
                    )
                })
                .map_err(e)?;
            }
            self.launch(
                &softmax,
                (rows as u32, n_kv as u32, 1),
                256,
                0,
                &[arg(&s), arg(&p), arg(&np)],
            )?;
            // O_g[kvh] (rows x hd, row stride n_heads*hd) = S[kvh] . V[kvh]:
            // column-major C (hd x rows) = V (hd x n_pos) . S (n_pos x rows).
            let _exclusive = self.graphs.exclusive();
            self.timed("cublas attention PV", || unsafe {
                blas::sgemm_strided_batched(
                    self.blas.handle,
                    n,
                    n,
                    hd as i32,
                    rows as i32,
                    n_pos as i32,
                    &one,
                    vc as *const f32,
                    hd as i32,
                    (n_pos * hd) as i64,
                    s as *const f32,
                    n_pos as i32,
                    (rows * n_pos) as i64,
                    &zero,
                    og as *mut f32,
                    (n_heads * hd) as i32,
                    (group * hd) as i64,
                    n_kv as i32,
                )
            })
            .map_err(e)?;
        }
        Ok(())
    }

    /// The tensor-core path. Layouts (all row-major as the kernels see them; cuBLAS sees each
    /// row-major matrix as its column-major transpose):
    /// - K, V: f16 [kv head][n_pos][hd] (batch stride n_pos * hd);
    /// - Q: f16 [rows][n_heads][hd], q's own layout; head kvh * group + g of row r at
    ///   (r * n_heads + kvh * group + g) * hd;
    /// - S: f32 [kv head][rows][ld], ld = n_pos rounded up to 8, so that every row starts 32
    ///   bytes after the last and both S and P rows are 16-byte aligned (tensor-core kernels
    ///   load 16 bytes at a time); only columns 0..n_pos are computed or read;
    /// - P: f16 over the same bytes, row r of kv head b at f16 offset (b * rows + r) * 2 * ld.
    ///
    /// Alignment: K and V start at their scratch buffer (256-byte aligned) and batches are
    /// n_pos * hd * 2 bytes apart; Q_g starts g * hd * 2 bytes into q16 and O_g g * hd * 4 bytes
    /// into out. With hd a multiple of 8 every matrix, row and batch is 16-byte aligned; other
    /// head sizes still run (cuBLAS has no alignment requirement), only on slower kernels.
    fn attention_gemm_f16(
        &self,
        out: u64,
        q: u64,
        cache: (u64, u64, u64),
        p: AttentionParams,
    ) -> Result<()> {
        let (k_cache, v_cache, table) = cache;
        let (rows, hd) = (p.rows as usize, p.head_dim as usize);
        let (n_heads, n_kv) = (p.n_heads as usize, p.n_kv_heads as usize);
        let group = n_heads / n_kv;
        let n_pos = p.pos0 as usize + rows;
        let ld = n_pos.next_multiple_of(8);
        let kv_elems = n_kv * n_pos * hd;
        let q_elems = rows * n_heads * hd;
        let kc = self.scratch(Scratch::AttnK, kv_elems * 2)?;
        let vc = self.scratch(Scratch::AttnV, kv_elems * 2)?;
        let q16 = self.scratch(Scratch::AttnQ, q_elems * 2)?;
        let s = self.scratch(Scratch::AttnScores, n_kv * rows * ld * 4)?;
        let (np, ld32, p_scale) = (n_pos as u32, ld as u32, P_SCALE);
        self.launch_1d(
            "attention",
            "attention_gather_f16",
            kv_elems.max(q_elems),
            256,
            &[
                arg(&kc),
                arg(&vc),
                arg(&q16),
                arg(&k_cache),
                arg(&v_cache),
                arg(&table),
                arg(&q),
                arg(&p),
                arg(&np),
            ],
        )?;
        let softmax = self.kernels.get("attention", "attention_softmax_f16")?;
        let e = |e: blas::CublasError| Error::Device(format!("cuBLAS attention GEMM: {e:?}"));
        let (one, zero, unscale) = (1.0f32, 0.0f32, 1.0 / P_SCALE);
        let (t, n) = (
            bsys::cublasOperation_t::CUBLAS_OP_T,
            bsys::cublasOperation_t::CUBLAS_OP_N,
        );
        let (f16, f32) = (
            bsys::cudaDataType::CUDA_R_16F,
            bsys::cudaDataType::CUDA_R_32F,
        );
        let compute = bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let host = |v: &f32| v as *const f32 as *const c_void;
        for g in 0..group {
            let qg = q16 + (g * hd * 2) as u64;
            let og = out + (g * hd * 4) as u64;
            // S[kvh] (rows x n_pos of row-major rows x ld) = Q_g[kvh] . K[kvh]^T, batch kvh.
            // Column-major: C (n_pos x rows, ldc ld) = op_T(A) . B with
            // A = K[kvh] as hd x n_pos (element (d, j) at j * hd + d: lda hd, op T),
            // B = Q_g[kvh] as hd x rows (element (d, r) at r * n_heads * hd + d from
            //     q16 + g * hd, batch kvh a further kvh * group * hd: ldb n_heads * hd),
            // C element (j, r) at r * ld + j: score of row r against position j.
            // m = n_pos, n = rows, k = hd; batch strides n_pos * hd, group * hd, rows * ld.
            {
                let _exclusive = self.graphs.exclusive();
                self.timed("cublas attention QK^T", || unsafe {
                    blas::gemm_strided_batched_ex(
                        self.blas.handle,
                        t,
                        n,
                        n_pos as i32,
                        rows as i32,
                        hd as i32,
                        host(&one),
                        kc as *const c_void,
                        f16,
                        hd as i32,
                        (n_pos * hd) as i64,
                        qg as *const c_void,
                        f16,
                        (n_heads * hd) as i32,
                        (group * hd) as i64,
                        host(&zero),
                        s as *mut c_void,
                        f32,
                        ld as i32,
                        (rows * ld) as i64,
                        n_kv as i32,
                        compute,
                        algo,
                    )
                })
                .map_err(e)?;
            }
            self.launch(
                &softmax,
                (rows as u32, n_kv as u32, 1),
                256,
                0,
                &[arg(&s), arg(&p), arg(&np), arg(&ld32), arg(&p_scale)],
            )?;
            // O_g[kvh] (rows x hd, row stride n_heads * hd) = P[kvh] . V[kvh] / P_SCALE.
            // Column-major: C (hd x rows, ldc n_heads * hd) = A . B with
            // A = V[kvh] as hd x n_pos (element (d, j) at j * hd + d: lda hd, op N),
            // B = P[kvh] as n_pos x rows (element (j, r) at f16 offset r * 2 * ld + j: ldb 2 ld),
            // C element (d, r) at og + r * n_heads * hd + d, batch kvh a further
            //     kvh * group * hd: output head kvh * group + g of row r.
            // m = hd, n = rows, k = n_pos; batch strides n_pos * hd, 2 * rows * ld, group * hd.
            let _exclusive = self.graphs.exclusive();
            self.timed("cublas attention PV", || unsafe {
                blas::gemm_strided_batched_ex(
                    self.blas.handle,
                    n,
                    n,
                    hd as i32,
                    rows as i32,
                    n_pos as i32,
                    host(&unscale),
                    vc as *const c_void,
                    f16,
                    hd as i32,
                    (n_pos * hd) as i64,
                    s as *const c_void,
                    f16,
                    (2 * ld) as i32,
                    (2 * rows * ld) as i64,
                    host(&zero),
                    og as *mut c_void,
                    f32,
                    (n_heads * hd) as i32,
                    (group * hd) as i64,
                    n_kv as i32,
                    compute,
                    algo,
                )
            })
            .map_err(e)?;
        }
        Ok(())
    }
}
