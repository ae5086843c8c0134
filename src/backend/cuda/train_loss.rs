//! cross_entropy on CUDA, chunked over rows so that the logits of the whole batch never exist
//! at once (shaders/cuda/cross_entropy.cu describes the kernels). Per chunk of rows:
//! logits = x_c . W^T (SGEMM per widened slice of W) into scratch, cross_entropy_rows turns
//! them into dlogits in place and writes each row's loss, dx_c = dlogits . W, and with a
//! trained classifier dw += dlogits^T . x_c. The rows' losses are summed in order at the end.
//! Speed work goes here later: bf16 logits GEMMs on tensor cores, W widened once per step
//! rather than per chunk for quantized classifiers.

use super::launch::{arg, Scratch};
use super::ops::u32_of;
use super::train_params::CrossEntropyParams;
use super::Cuda;
use crate::backend::Weight;
use crate::error::Result;
use crate::pool::Buf;

/// Most bytes of one chunk's logits.
const LOGITS_SCRATCH: usize = 256 << 20;

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
        const OP: &str = "cross_entropy";
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
        let mut r0 = 0;
        while r0 < rows {
            let cr = chunk.min(rows - r0);
            let logits = self.scratch(Scratch::TrainLogits, cr * vocab * 4)?;
            let (xc, dxc) = (xp + (r0 * dim * 4) as u64, dxp + (r0 * dim * 4) as u64);
            // logits (vocab x cr column-major) = W_slice^T-as-stored . x_c, slice by slice.
            self.f32_weight_slices(w, OP, |n0, nc, wp| {
                let dst = logits + (n0 * 4) as u64;
                let ab = ((wp, dim), (xc, dim));
                self.sgemm(
                    (true, false),
                    (nc, cr, dim),
                    1.0,
                    ab.0,
                    ab.1,
                    0.0,
                    (dst, vocab),
                    OP,
                )
            })?;
            let p = CrossEntropyParams {
                rows: u32_of(cr, "rows", OP)?,
                vocab: u32_of(vocab, "vocab", OP)?,
                scale,
                _pad: 0,
            };
            let (lc, rl) = (lp + (r0 * 4) as u64, row_loss + (r0 * 4) as u64);
            self.launch(
                &rows_kernel,
                (p.rows, 1, 1),
                1024,
                0,
                &[arg(&logits), arg(&rl), arg(&lc), arg(&p)],
            )?;
            // dx_c (dim x cr) = W_slice-as-stored (dim x nc) . dlogits_slice (nc x cr).
            self.f32_weight_slices(w, OP, |n0, nc, wp| {
                let beta = if n0 == 0 { 0.0 } else { 1.0 };
                let dl = (logits + (n0 * 4) as u64, vocab);
                self.sgemm(
                    (false, false),
                    (dim, cr, nc),
                    1.0,
                    (wp, dim),
                    dl,
                    beta,
                    (dxc, dim),
                    OP,
                )
            })?;
            if let Some(dwp) = dwp {
                // dw (dim x vocab) += x_c (dim x cr) . dlogits^T (cr x vocab).
                let (a, b) = ((xc, dim), (logits, vocab));
                self.sgemm(
                    (false, true),
                    (dim, vocab, cr),
                    1.0,
                    a,
                    b,
                    1.0,
                    (dwp, dim),
                    OP,
                )?;
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
}
