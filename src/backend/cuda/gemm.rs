//! Prefill GEMMs on cuBLAS. Row-major out[rows, n] = x[rows, k] . w[n, k]^T is, in cuBLAS's
//! column-major terms, C (n x rows) = W^T-as-stored (op T on a k x n matrix) times X (k x rows).
//! Exact path: f32 weights as they are, others widened to f32 (SGEMM, no TF32), matching the
//! CPU reference to f32 rounding. Tensor-core path: f16/bf16 weights as they are (quantized ones
//! widened to f16), activations rounded to the same type, f32 accumulate and output.
//! Widened weights go through a scratch matrix in row chunks of at most GEMM_SCRATCH bytes.
//! Projections that share an input (q/k/v, gate/up) round it once (`norm_for_gemm`: the
//! rms_norm kernel writes the rounded copy itself), and a projection into the residual stream
//! adds into it through the GEMM's beta = 1 (`accumulate`) instead of a temporary and an add.
//! `round_half` and `half_gemm` serve training's matmul backward (train.rs) the same way.

use super::launch::{arg, Scratch};
use super::ops::u32_of;
use super::Cuda;
use crate::backend::params::RmsNormParams;
use crate::backend::Weight;
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::CudaStream;
use std::ffi::c_void;
use std::sync::Arc;

/// Most bytes of widened weights staged at once.
const GEMM_SCRATCH: usize = 256 << 20;

pub struct Blas {
    pub(super) handle: bsys::cublasHandle_t,
}

// The handle is only used from calls that hold &Cuda, in order on one stream.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Blas {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Blas> {
        let e = |e: blas::CublasError| Error::Device(format!("cuBLAS: {e:?}"));
        let handle = blas::create_handle().map_err(e)?;
        unsafe {
            blas::set_stream(handle, stream.cu_stream() as _).map_err(e)?;
            // Default math: SGEMM stays f32 (TF32 only with CUBLAS_TF32_TENSOR_OP_MATH), f16/bf16
            // GEMMs use tensor cores.
            let r = bsys::cublasSetMathMode(handle, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH);
            if r != bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(Error::Device(format!("cuBLAS math mode: {r:?}")));
            }
        }
        Ok(Blas { handle })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        unsafe {
            let _ = blas::destroy_handle(self.handle);
        }
    }
}

/// The GEMM's element type.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Elem {
    F32,
    F16,
    BF16,
}

/// Weights a GEMM reads: device address, stored dtype, rows (n) and columns (k), bytes per row.
pub(super) struct GemmW {
    pub ptr: u64,
    pub dtype: DType,
    pub n: usize,
    pub k: usize,
    pub row_bytes: usize,
}

impl Cuda {
    /// The element type of the GEMM of weights in `dtype`: f32 for f32 weights and in exact
    /// mode, else the weights' half type (f16 for block formats, widened to it).
    pub(super) fn gemm_elem(&self, dtype: DType) -> Elem {
        match dtype {
            DType::F32 => Elem::F32,
            _ if self.exact => Elem::F32,
            DType::BF16 => Elem::BF16,
            _ => Elem::F16,
        }
    }

    /// The half type (f16 / bf16) that the prefill GEMMs of every matrix in `ws` round their
    /// input to, when they share one and all take the cuBLAS path with it (same k, a multiple
    /// of 8); None when any would run in f32 (exact mode, f32 weights) or on the mat-vec.
    pub(super) fn shared_half_input(&self, ws: &[&Weight<Cuda>]) -> Option<Elem> {
        let (elem, k) = (self.gemm_elem(ws[0].dtype), ws[0].cols);
        let shared = ws
            .iter()
            .all(|w| w.cols == k && self.gemm_elem(w.dtype) == elem);
        (elem != Elem::F32 && k % 8 == 0 && shared).then_some(elem)
    }

    /// rms_norm of x [rows, k] (x and the norm weight g are checked device addresses) rounded
    /// to `elem` (f16 or bf16) into the GemmX scratch, which it returns: the input of GEMMs
    /// that share it (gemm_input). The same values round_x gives for rms_norm's f32 output.
    pub(super) fn norm_for_gemm(
        &self,
        (x, g, eps): (u64, u64, f32),
        rows: usize,
        k: usize,
        elem: Elem,
        op: &str,
    ) -> Result<u64> {
        let name = match elem {
            Elem::F16 => "rms_norm_f16",
            Elem::BF16 => "rms_norm_bf16",
            Elem::F32 => {
                return Err(Error::Device(format!(
                    "{op}: the norm is rounded only for half GEMMs"
                )))
            }
        };
        let p = RmsNormParams {
            rows: u32_of(rows, "rows", op)?,
            dim: u32_of(k, "k", op)?,
            eps,
            _pad: 0,
        };
        let buf = self.scratch(Scratch::GemmX, rows * k * 2)?;
        let block = (k / 4).next_power_of_two().clamp(32, 1024) as u32;
        let f = self.kernels.get("rms_norm", name)?;
        self.launch(
            &f,
            (p.rows, 1, 1),
            block,
            0,
            &[arg(&buf), arg(&x), arg(&g), arg(&p)],
        )?;
        Ok(buf)
    }

    /// The `count` f32 values at `x` rounded (to nearest even) to `elem` (f16 or bf16) in
    /// scratch buffer `which`, whose address it returns: the half operand of a tensor-core GEMM.
    pub(super) fn round_half(
        &self,
        which: Scratch,
        x: u64,
        count: usize,
        elem: Elem,
        op: &str,
    ) -> Result<u64> {
        let name = match elem {
            Elem::F16 => "round_x_f16",
            Elem::BF16 => "round_x_bf16",
            Elem::F32 => return Err(Error::Device(format!("{op}: f32 operands are not rounded"))),
        };
        let buf = self.scratch(which, count * 2)?;
        let n = u32_of(count, "elements", op)?;
        // One thread per four values (round_x4).
        let threads = count.div_ceil(4);
        self.launch_1d("matmul", name, threads, 256, &[arg(&buf), arg(&x), arg(&n)])?;
        Ok(buf)
    }

    /// C (m x n, f32) = alpha op(A) op(B) + beta C, column-major, with A and B in `elem`
    /// (f16 or bf16): cublasGemmEx on tensor cores, f32 accumulation. `trans` says which of
    /// A, B are transposed; operands are (device address, leading dimension) as in `sgemm`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn half_gemm(
        &self,
        elem: Elem,
        trans: (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        beta: f32,
        (c, ldc): (u64, usize),
        op: &str,
    ) -> Result<()> {
        if self.graphs.recording() {
            self.graphs.not_graphable();
            return Ok(());
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let ty = match elem {
            Elem::F16 => bsys::cudaDataType::CUDA_R_16F,
            Elem::BF16 => bsys::cudaDataType::CUDA_R_16BF,
            Elem::F32 => return Err(Error::Device(format!("{op}: half_gemm of f32 operands"))),
        };
        let dim = |v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::Device(format!("{op}: GEMM dimension {v} past i32")))
        };
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        let (la, lb, lc) = (dim(lda)?, dim(ldb)?, dim(ldc)?);
        let t = |yes: bool| {
            if yes {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let _exclusive = self.graphs.exclusive();
        let name = self.profile_name("cublas bf16", op);
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
                ty,
                la,
                b as *const c_void,
                ty,
                lb,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                bsys::cudaDataType::CUDA_R_32F,
                lc,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
        .map_err(|e| Error::Device(format!("{op}: cuBLAS GEMM: {e:?}")))
    }

    /// out[rows, n] = x[rows, k] . w^T on cuBLAS; `w` is `row_bytes` per row in `dtype`.
    /// `accumulate`: out += instead (beta = 1).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        out: u64,
        x: u64,
        w: u64,
        dtype: DType,
        rows: usize,
        n: usize,
        k: usize,
        row_bytes: usize,
        accumulate: bool,
    ) -> Result<()> {
        if self.graphs.recording() {
            self.graphs.not_graphable();
            return Ok(());
        }
        // Activations in the GEMM's type.
        let elem = self.gemm_elem(dtype);
        let xg = match elem {
            Elem::F32 => x,
            _ => self.round_half(Scratch::GemmX, x, rows * k, elem, "matmul")?,
        };
        let w = GemmW {
            ptr: w,
            dtype,
            n,
            k,
            row_bytes,
        };
        self.gemm_input(out, xg, &w, rows, accumulate)
    }

    /// As `gemm`, with the activations `xg` already in the GEMM's element type
    /// (`gemm_elem(w.dtype)`: f32, or rounded by round_x / norm_for_gemm).
    pub(super) fn gemm_input(
        &self,
        out: u64,
        xg: u64,
        w: &GemmW,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        if self.graphs.recording() {
            self.graphs.not_graphable();
            return Ok(());
        }
        let (dtype, n, k, row_bytes) = (w.dtype, w.n, w.k, w.row_bytes);
        let elem = self.gemm_elem(dtype);
        let widen = dtype != DType::F32
            && !(elem == Elem::F16 && dtype == DType::F16)
            && !(elem == Elem::BF16 && dtype == DType::BF16);
        let esize = if elem == Elem::F32 { 4 } else { 2 };
        if widen && k % 8 != 0 {
            return Err(Error::Device(format!(
                "matmul: rows of {k} values cannot be widened in octets"
            )));
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let w = w.ptr;
        let chunk = if widen {
            (GEMM_SCRATCH / (k * esize).max(1)).clamp(1, n)
        } else {
            n
        };
        let mut n0 = 0;
        while n0 < n {
            let nc = chunk.min(n - n0);
            let wc = w + (n0 * row_bytes) as u64;
            let wg = if widen {
                let buf = self.scratch(Scratch::GemmW, nc * k * esize)?;
                let name = if elem == Elem::F32 {
                    by_dtype!("widen_", dtype, "_f32")
                } else {
                    by_dtype!("widen_", dtype, "_f16")
                };
                let (nn, kk) = (nc as u32, k as u32);
                self.launch_1d(
                    "matmul",
                    name,
                    nc * k / 8,
                    256,
                    &[arg(&buf), arg(&wc), arg(&nn), arg(&kk)],
                )?;
                buf
            } else {
                wc
            };
            let c = out + (n0 * 4) as u64;
            self.blas_gemm(c, xg, wg, elem, rows, nc, k, n, accumulate)?;
            n0 += nc;
        }
        Ok(())
    }

    /// C[rows, ldc] (columns 0..n) (+)= X[rows, k] . W[n, k]^T, raw cuBLAS call (beta 1 when
    /// `accumulate`, else 0).
    #[allow(clippy::too_many_arguments)]
    fn blas_gemm(
        &self,
        out: u64,
        x: u64,
        w: u64,
        elem: Elem,
        rows: usize,
        n: usize,
        k: usize,
        ldc: usize,
        accumulate: bool,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let too_big = |v: usize| i32::try_from(v).is_err();
        if too_big(rows) || too_big(n) || too_big(k) || too_big(ldc) {
            return Err(Error::Device("matmul: GEMM dimensions past i32".into()));
        }
        let e = |e: blas::CublasError| Error::Device(format!("cuBLAS GEMM: {e:?}"));
        let _exclusive = self.graphs.exclusive();
        let t = bsys::cublasOperation_t::CUBLAS_OP_T;
        let nn = bsys::cublasOperation_t::CUBLAS_OP_N;
        let name = match elem {
            Elem::F32 => "cublas gemm f32",
            _ => "cublas gemm half",
        };
        self.timed(name, || unsafe {
            match elem {
                Elem::F32 => blas::sgemm(
                    self.blas.handle,
                    t,
                    nn,
                    n as i32,
                    rows as i32,
                    k as i32,
                    &alpha,
                    w as *const f32,
                    k as i32,
                    x as *const f32,
                    k as i32,
                    &beta,
                    out as *mut f32,
                    ldc as i32,
                )
                .map_err(e),
                Elem::F16 | Elem::BF16 => {
                    let ty = if elem == Elem::F16 {
                        bsys::cudaDataType::CUDA_R_16F
                    } else {
                        bsys::cudaDataType::CUDA_R_16BF
                    };
                    blas::gemm_ex(
                        self.blas.handle,
                        t,
                        nn,
                        n as i32,
                        rows as i32,
                        k as i32,
                        &alpha as *const f32 as *const c_void,
                        w as *const c_void,
                        ty,
                        k as i32,
                        x as *const c_void,
                        ty,
                        k as i32,
                        &beta as *const f32 as *const c_void,
                        out as *mut c_void,
                        bsys::cudaDataType::CUDA_R_32F,
                        ldc as i32,
                        bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                    .map_err(e)
                }
            }
        })
    }
}
