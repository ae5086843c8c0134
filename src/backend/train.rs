//! The training half of the seam: the backward of every forward op, the fused loss, the
//! optimizer, and the small vector ops a training step needs.
//!
//! Contract (on top of `Backend`'s; tests/train_grad.rs checks `cpu` against finite differences,
//! tests/train_parity.rs every other backend against `cpu`):
//! - Gradients are f32. Gradients of activations overwrite their output buffer; gradients of
//!   parameters (`dw`, `dweight`, `dtable`) accumulate into it (`+=`), so gradient
//!   accumulation over micro-batches needs nothing but not zeroing between them.
//! - A backward op reads the forward's inputs (and, for attention, its output and logsumexp)
//!   as the forward left them; it never writes them.
//! - Rows of packed batches follow `BatchView`: attention is causal inside each sequence.

use super::{Backend, Heads, Weight};
use crate::batch::BatchView;
use crate::error::Result;
use crate::pool::Buf;

/// One AdamW update (PyTorch's `torch.optim.AdamW`, decoupled weight decay):
/// p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), with g = grad * grad_scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number (bias correction).
    pub step: u32,
    /// Multiplies the gradient first (gradient clipping's factor, 1 when not clipped).
    pub grad_scale: f32,
}

pub trait TrainBackend: Backend {
    /// x[i] = 0 for i < n (f32 elements).
    fn zero(&self, x: &mut Buf<Self>, n: usize) -> Result<()>;
    /// y[i] += alpha * x[i] for i < n.
    fn axpy(&self, y: &mut Buf<Self>, x: &Buf<Self>, alpha: f32, n: usize) -> Result<()>;
    /// out[0] += sum(x[i]^2) for i < n (the gradient norm for clipping, summed over tensors).
    fn sum_squares(&self, out: &mut Buf<Self>, x: &Buf<Self>, n: usize) -> Result<()>;

    /// dx[rows, w.cols] = alpha * dy[rows, w.rows] . W, for every stored dtype of W (the
    /// backward of `matmul` through a frozen or trained weight, quantized blocks included).
    fn matmul_dx(
        &self,
        dx: &mut Buf<Self>,
        dy: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        alpha: f32,
    ) -> Result<()>;
    /// dx[rows, w.cols] += alpha * dy[rows, w.rows] . W: matmul_dx adding into dx (a LoRA
    /// adapter's input gradient into its frozen projection's). The default runs matmul_dx into
    /// `tmp`, then add; a backend may run it as one GEMM that accumulates into dx.
    fn matmul_dx_add(
        &self,
        dx: &mut Buf<Self>,
        tmp: &mut Buf<Self>,
        dy: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        alpha: f32,
    ) -> Result<()> {
        self.matmul_dx(tmp, dy, w, rows, alpha)?;
        self.add(dx, tmp, rows * w.cols)
    }
    /// dw[n, k] += alpha * dy[rows, n]^T . x[rows, k] (f32 gradient of a trained weight).
    #[allow(clippy::too_many_arguments)]
    fn matmul_dw(
        &self,
        dw: &mut Buf<Self>,
        dy: &Buf<Self>,
        x: &Buf<Self>,
        rows: usize,
        n: usize,
        k: usize,
        alpha: f32,
    ) -> Result<()>;

    /// Backward of `rms_norm` (y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps)):
    /// dx = rstd * (dy * w - x * rstd^2 * mean(dy * w * x)) overwrites `dx`;
    /// dweight[i] += sum_r dy[r, i] * x[r, i] * rstd[r] when given.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    /// Backward of `rope_rows`: the rotation is orthogonal, so dx = attn_scale * R(-angle) dy,
    /// in place on `dx` ([rows, n_heads, head_dim]; row r at position pos[r]).
    #[allow(clippy::too_many_arguments)]
    fn rope_backward(
        &self,
        dx: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        pos: &Buf<Self>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        attn_scale: f32,
    ) -> Result<()>;

    /// Backward of `attention_packed` (FlashAttention-2): probabilities are recomputed from q,
    /// k and the forward's logsumexp tile by tile; D = rowsum(dout * out);
    /// dS = P * (dout . V^T - D); dq = dS . K * scale, dk = dS^T . q * scale, dv = P^T . dout,
    /// dk and dv summed over the query heads of each kv head. All three overwrite.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    /// Backward of `swiglu` (out = silu(gate) * up): dgate, dup overwrite (n elements).
    fn swiglu_backward(
        &self,
        dgate: &mut Buf<Self>,
        dup: &mut Buf<Self>,
        dout: &Buf<Self>,
        gate: &Buf<Self>,
        up: &Buf<Self>,
        n: usize,
    ) -> Result<()>;

    /// Backward of `embedding`: dtable[tokens[t], :] += dout[t, :] (f32 [vocab, dim]).
    fn embedding_backward(
        &self,
        dtable: &mut Buf<Self>,
        dout: &Buf<Self>,
        tokens: &Buf<Self>,
        n_tokens: usize,
        dim: usize,
    ) -> Result<()>;

    /// The classifier, softmax and cross-entropy fused, chunked over rows so that the logits
    /// of the whole batch never exist at once. x [rows, w.cols] is the final norm's output,
    /// labels i32 [rows] (negative: ignored). Writes loss[0] = sum over labelled rows of
    /// (logsumexp(logits) - logits[label]) and dx = scale * dloss/dx (overwrites); with `dw`,
    /// dw += scale * dlogits^T . x (a trained classifier). `scale` is 1 / labelled rows of the
    /// whole step, so that micro-batches add up to the mean.
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
    ) -> Result<()>;

    /// One fused AdamW step over n f32 parameters with their f32 moments.
    fn adamw(
        &self,
        param: &mut Buf<Self>,
        grad: &Buf<Self>,
        m: &mut Buf<Self>,
        v: &mut Buf<Self>,
        n: usize,
        h: AdamW,
    ) -> Result<()>;

    /// Stores f32 values (a master copy) into a weight of dtype f32, f16 or bf16 (rounded to
    /// nearest even), so the next forward sees the updated parameters.
    fn write_weight(&self, w: &mut Weight<Self>, src: &Buf<Self>) -> Result<()>;
}
