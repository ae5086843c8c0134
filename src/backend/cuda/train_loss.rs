//! cross_entropy on CUDA, chunked over rows so that the logits of the whole batch never exist
//! at once (shaders/cuda/cross_entropy.cu describes the kernels). Per chunk of rows:
//! logits = x_c . W^T (SGEMM per widened slice of W) into scratch, cross_entropy_rows turns
//! them into dlogits in place and writes each row's loss, dx_c = dlogits . W, and with a
//! trained classifier dw += dlogits^T . x_c. The rows' losses are summed in order at the end.
//! The three GEMMs run on bf16 tensor cores with f32 accumulation and f32 logits where
//! `half_dx` allows (not exact mode, a classifier that is not f32, vocab and dim whole octets):
//! W as stored (bf16) or dequantized to bf16 slices, x_c and dlogits rounded to bf16, as the
//! forward's prefill GEMMs round their operands; elsewhere SGEMMs over W widened to f32. The
//! softmax, the loss and dlogits are f32 either way. Quantized classifiers are dequantized
//! per chunk of rows (twice: the logits and dx); a per-step copy would cost vocab x dim more
//! bytes of device memory.

use super::gemm::Elem;
use super::launch::{arg, Scratch};
use super::ops::u32_of;
use super::train_params::CrossEntropyParams;
use super::Cuda;
use crate::backend::Weight;
use crate::error::Result;
use crate::pool::Buf;

const OP: &str = "cross_entropy";
/// The half type of the tensor-core products.
const BF: Elem = Elem::BF16;
/// Most bytes of one chunk's logits.
const LOGITS_SCRATCH: usize = 256 << 20;

/// One chunk of rows of the loss: its logits' scratch, x_c, dx_c, dw, the chunk's rows.
struct Chunk {
    logits: u64,
    xc: u64,
    dxc: u64,
    dw: Option<u64>,
    rows: usize,
}

impl Cuda {
    /// TrainBackend::cross_entropy (train.rs has the contract).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cross_entropy_chunks(
        &self,
        loss: &mut Buf<Cuda>,
        dx: &mut Buf<Cuda>,
        dw: Option<&mut Buf<Cuda>>,
        x: &Buf<Cuda>,
        w: &Weight<Cuda>,
        labels: &Buf<Cuda>,
        rows: usize,
        scale: f32,
    ) -> Result<()> {
        let (vocab, dim) = (w.rows, w.cols);
        let lossp = self.ptr(loss, 4, "loss", OP)?;
        let dxp = self.ptr(dx, rows * dim * 4, "dx", OP)?;
        let xp = self.ptr(x, rows * dim * 4, "x", OP)?;
        let lp = self.ptr(labels, rows * 4, "labels", OP)?;
        let dwp = match &dw {
            Some(d) => Some(self.ptr(d, vocab * dim * 4, "dw", OP)?),
            None => None,
        };
        let row_loss = self.scratch(Scratch::TrainRowLoss, rows.max(1) * 4)?;
        let chunk = (LOGITS_SCRATCH / (vocab * 4).max(1)).clamp(1, rows.max(1));
        let rows_kernel = self.kernels.get("cross_entropy", "cross_entropy_rows")?;
        let half = self.half_dx(w.dtype, vocab, dim);
        let mut r0 = 0;
        while r0 < rows {
            let cr = chunk.min(rows - r0);
            let c = Chunk {
                logits: self.scratch(Scratch::TrainLogits, cr * vocab * 4)?,
                xc: xp + (r0 * dim * 4) as u64,
                dxc: dxp + (r0 * dim * 4) as u64,
                dw: dwp,
                rows: cr,
            };
            let p = CrossEntropyParams {
                rows: u32_of(cr, "rows", OP)?,
                vocab: u32_of(vocab, "vocab", OP)?,
                scale,
                _pad: 0,
            };
            let (lc, rl) = (lp + (r0 * 4) as u64, row_loss + (r0 * 4) as u64);
            // logits -> dlogits in place, and each row's loss.
            let softmax = || {
                let args = [arg(&c.logits), arg(&rl), arg(&lc), arg(&p)];
                self.launch(&rows_kernel, (p.rows, 1, 1), 1024, 0, &args)
            };
            if half {
                self.loss_chunk_bf16(w, &c, softmax)?;
            } else {
                self.loss_chunk_f32(w, &c, softmax)?;
            }
            r0 += cr;
        }
        let f = self.kernels.get("cross_entropy", "cross_entropy_sum")?;
        let n = u32_of(rows, "rows", OP)?;
        self.launch(
            &f,
            (1, 1, 1),
            1024,
            0,
            &[arg(&lossp), arg(&row_loss), arg(&n)],
        )
    }

    /// A chunk's three products on bf16 tensor cores (f32 accumulation, f32 results).
    fn loss_chunk_bf16(
        &self,
        w: &Weight<Cuda>,
        c: &Chunk,
        softmax: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let (vocab, dim, cr) = (w.rows, w.cols, c.rows);
        let xg = self.round_half(Scratch::GemmX, c.xc, cr * dim, BF, OP)?;
        // logits (vocab x cr column-major) = W_slice^T-as-stored . x_c, slice by slice.
        self.bf16_weight_slices(w, OP, |n0, nc, wg| {
            let dst = (c.logits + (n0 * 4) as u64, vocab);
            let (a, b) = ((wg, dim), (xg, dim));
            self.half_gemm(BF, (true, false), (nc, cr, dim), 1.0, a, b, 0.0, dst, OP)
        })?;
        softmax()?;
        let dl = self.round_half(Scratch::TrainHalfLogits, c.logits, cr * vocab, BF, OP)?;
        // dx_c (dim x cr) = W_slice-as-stored (dim x nc) . dlogits_slice (nc x cr).
        self.bf16_weight_slices(w, OP, |n0, nc, wg| {
            let beta = if n0 == 0 { 0.0 } else { 1.0 };
            let (a, b) = ((wg, dim), (dl + (n0 * 2) as u64, vocab));
            let dst = (c.dxc, dim);
            self.half_gemm(BF, (false, false), (dim, cr, nc), 1.0, a, b, beta, dst, OP)
        })?;
        let Some(dwp) = c.dw else { return Ok(()) };
        // dw (dim x vocab) += x_c (dim x cr) . dlogits^T (cr x vocab).
        let (a, b) = ((xg, dim), (dl, vocab));
        self.half_gemm(
            BF,
            (false, true),
            (dim, vocab, cr),
            1.0,
            a,
            b,
            1.0,
            (dwp, dim),
            OP,
        )
    }

    /// A chunk's three products as f32 SGEMMs over W widened to f32 slice by slice.
    fn loss_chunk_f32(
        &self,
        w: &Weight<Cuda>,
        c: &Chunk,
        softmax: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let (vocab, dim, cr) = (w.rows, w.cols, c.rows);
        // logits (vocab x cr column-major) = W_slice^T-as-stored . x_c, slice by slice.
        self.f32_weight_slices(w, OP, |n0, nc, wp| {
            let dst = (c.logits + (n0 * 4) as u64, vocab);
            let (a, b) = ((wp, dim), (c.xc, dim));
            self.sgemm((true, false), (nc, cr, dim), 1.0, a, b, 0.0, dst, OP)
        })?;
        softmax()?;
        // dx_c (dim x cr) = W_slice-as-stored (dim x nc) . dlogits_slice (nc x cr).
        self.f32_weight_slices(w, OP, |n0, nc, wp| {
            let beta = if n0 == 0 { 0.0 } else { 1.0 };
            let (a, b) = ((wp, dim), (c.logits + (n0 * 4) as u64, vocab));
            self.sgemm(
                (false, false),
                (dim, cr, nc),
                1.0,
                a,
                b,
                beta,
                (c.dxc, dim),
                OP,
            )
        })?;
        let Some(dwp) = c.dw else { return Ok(()) };
        // dw (dim x vocab) += x_c (dim x cr) . dlogits^T (cr x vocab).
        let (a, b) = ((c.xc, dim), (c.logits, vocab));
        self.sgemm(
            (false, true),
            (dim, vocab, cr),
            1.0,
            a,
            b,
            1.0,
            (dwp, dim),
            OP,
        )
    }
}
