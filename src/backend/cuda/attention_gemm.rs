//! Long-prefill attention on cuBLAS (shaders/cuda/attention.cu describes the kernels): gather
//! the paged K/V into contiguous f32 matrices, S = Q K^T per kv head as strided-batched SGEMMs
//! (one call per query head of the GQA group: the group's heads are `group * head_dim` apart in
//! a q row, so each call's batch stride is constant), causal softmax in place, O = S V. All f32,
//! so it keeps the exact parity of the tiled kernel while running at GEMM speed.

use super::launch::{arg, Scratch};
use super::Cuda;
use crate::backend::params::AttentionParams;
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas, sys as bsys};

impl Cuda {
    /// out[rows, n_heads * hd] of attention over positions 0..pos0 + rows (p holds the shape).
    pub(super) fn attention_gemm(
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
        let too_big = |v: usize| i32::try_from(v).is_err();
        if too_big(n_pos) || too_big(n_heads * hd) || too_big(rows) {
            return Err(Error::Device("attention: GEMM dimensions past i32".into()));
        }
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
}
