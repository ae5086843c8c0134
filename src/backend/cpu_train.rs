//! The reference of every training op: plain f32 loops, the backward of each forward op in
//! cpu.rs written the way its formula in train.rs reads. The GPU backends are tested against
//! these, and these against finite differences (tests/train_grad.rs).

use super::cpu::{bytes, dot, f32s, f32s_mut, par_chunks, rotate_rows, seq_starts, u32s, Cpu};
use super::train::{AdamW, TrainBackend};
use super::{Heads, Weight};
use crate::batch::BatchView;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::Buf;
use crate::quant::dequantize;
use half::{bf16, f16};

/// The whole weight matrix widened to f32 [rows, cols].
fn widen(w: &Weight<Cpu>) -> Vec<f32> {
    let mut out = vec![0.0f32; w.rows * w.cols];
    let row_bytes = w
        .dtype
        .bytes_for(w.cols)
        .expect("weight row of whole blocks");
    let wb = bytes(&w.buf);
    for (o, row) in out.chunks_exact_mut(w.cols).enumerate() {
        dequantize(w.dtype, &wb[o * row_bytes..(o + 1) * row_bytes], row);
    }
    out
}

/// Rows of logits a `cross_entropy` chunk holds at once.
const CE_CHUNK: usize = 64;

impl TrainBackend for Cpu {
    fn zero(&self, x: &mut Buf<Self>, n: usize) -> Result<()> {
        f32s_mut(x)[..n].fill(0.0);
        Ok(())
    }

    fn axpy(&self, y: &mut Buf<Self>, x: &Buf<Self>, alpha: f32, n: usize) -> Result<()> {
        let x = &f32s(x)[..n];
        for (y, x) in f32s_mut(y)[..n].iter_mut().zip(x) {
            *y += alpha * x;
        }
        Ok(())
    }

    fn sum_squares(&self, out: &mut Buf<Self>, x: &Buf<Self>, n: usize) -> Result<()> {
        // f64 so that the norm of a whole model's gradients does not lose its small terms.
        let s: f64 = f32s(x)[..n].iter().map(|&v| v as f64 * v as f64).sum();
        f32s_mut(out)[0] += s as f32;
        Ok(())
    }

    fn matmul_dx(
        &self,
        dx: &mut Buf<Self>,
        dy: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        alpha: f32,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        let wf = widen(w);
        let dy = &f32s(dy)[..rows * n];
        // dx[r, :] = alpha * sum_o dy[r, o] * W[o, :], one chunk per row.
        par_chunks(self.threads, &mut f32s_mut(dx)[..rows * k], k, |r, dxr| {
            dxr.fill(0.0);
            for (o, wrow) in wf.chunks_exact(k).enumerate() {
                let g = dy[r * n + o];
                if g != 0.0 {
                    dxr.iter_mut().zip(wrow).for_each(|(d, w)| *d += g * w);
                }
            }
            dxr.iter_mut().for_each(|d| *d *= alpha);
        });
        Ok(())
    }

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
        let (dy, x) = (&f32s(dy)[..rows * n], &f32s(x)[..rows * k]);
        // dw[o, :] += alpha * sum_r dy[r, o] * x[r, :], one chunk per output feature.
        par_chunks(self.threads, &mut f32s_mut(dw)[..n * k], k, |o, dwo| {
            let mut acc = vec![0.0f32; k];
            for (r, xr) in x.chunks_exact(k).enumerate() {
                let g = dy[r * n + o];
                if g != 0.0 {
                    acc.iter_mut().zip(xr).for_each(|(a, x)| *a += g * x);
                }
            }
            dwo.iter_mut().zip(&acc).for_each(|(d, a)| *d += alpha * a);
        });
        Ok(())
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
        let (dy, x, w) = (
            &f32s(dy)[..rows * dim],
            &f32s(x)[..rows * dim],
            &f32s(w)[..dim],
        );
        let rstd: Vec<f32> = x
            .chunks_exact(dim)
            .map(|xr| 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / dim as f32 + eps).sqrt())
            .collect();
        let dxs = &mut f32s_mut(dx)[..rows * dim];
        for r in 0..rows {
            let (xr, dyr) = (&x[r * dim..(r + 1) * dim], &dy[r * dim..(r + 1) * dim]);
            let s = rstd[r];
            // mean over the row of (dy * w) * x
            let m: f32 = (0..dim).map(|i| dyr[i] * w[i] * xr[i]).sum::<f32>() / dim as f32;
            for i in 0..dim {
                dxs[r * dim + i] = s * (dyr[i] * w[i] - xr[i] * s * s * m);
            }
        }
        if let Some(dw) = dweight {
            let dw = &mut f32s_mut(dw)[..dim];
            for r in 0..rows {
                for i in 0..dim {
                    dw[i] += dy[r * dim + i] * x[r * dim + i] * rstd[r];
                }
            }
        }
        Ok(())
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
        let (pos, inv_freq) = (&u32s(pos)[..rows], &f32s(inv_freq)[..head_dim / 2]);
        let dx = &mut f32s_mut(dx)[..rows * n_heads * head_dim];
        rotate_rows(dx, inv_freq, pos, n_heads, head_dim, attn_scale, -1.0);
        Ok(())
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
        h: Heads,
    ) -> Result<()> {
        let (rows, hd, nh, nkv) = (batch.rows, h.head_dim, h.n_heads, h.n_kv_heads);
        let (qw, kvw, group) = (nh * hd, nkv * hd, nh / nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let (q, k, v) = (f32s(q), f32s(k), f32s(v));
        let (dout, out, lse) = (f32s(dout), f32s(out), f32s(lse));
        let starts = seq_starts(batch);
        // One chunk per kv head: its dk and dv rows, then dq of its group's query heads; the
        // heads of a group add into the same dk, dv.
        let chunk = 2 * rows * hd + group * rows * hd;
        let mut tmp = vec![0.0f32; nkv * chunk];
        par_chunks(self.threads, &mut tmp, chunk, |kvh, c| {
            c.fill(0.0);
            let (dkc, rest) = c.split_at_mut(rows * hd);
            let (dvc, dqc) = rest.split_at_mut(rows * hd);
            for g in 0..group {
                let head = kvh * group + g;
                for r in 0..rows {
                    let qr = &q[r * qw + head * hd..][..hd];
                    let dor = &dout[r * qw + head * hd..][..hd];
                    let d = dot(dor, &out[r * qw + head * hd..][..hd]); // D = rowsum(dO * O)
                    let l = lse[r * nh + head];
                    let dqr = &mut dqc[(g * rows + r) * hd..][..hd];
                    for j in starts[r]..=r {
                        let (kj, vj) = (
                            &k[j * kvw + kvh * hd..][..hd],
                            &v[j * kvw + kvh * hd..][..hd],
                        );
                        let p = (dot(qr, kj) * scale - l).exp(); // P recomputed from lse
                        let ds = p * (dot(dor, vj) - d); // dS = P * (dP - D)
                        for i in 0..hd {
                            dqr[i] += ds * scale * kj[i];
                            dkc[j * hd + i] += ds * scale * qr[i];
                            dvc[j * hd + i] += p * dor[i];
                        }
                    }
                }
            }
        });
        let (dq, dk, dv) = (f32s_mut(dq), f32s_mut(dk), f32s_mut(dv));
        for (kvh, c) in tmp.chunks_exact(chunk).enumerate() {
            for r in 0..rows {
                let dst = r * kvw + kvh * hd;
                dk[dst..dst + hd].copy_from_slice(&c[r * hd..][..hd]);
                dv[dst..dst + hd].copy_from_slice(&c[(rows + r) * hd..][..hd]);
                for g in 0..group {
                    let dst = r * qw + (kvh * group + g) * hd;
                    dq[dst..dst + hd].copy_from_slice(&c[(2 * rows + g * rows + r) * hd..][..hd]);
                }
            }
        }
        Ok(())
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
        let (dout, g, u) = (&f32s(dout)[..n], &f32s(gate)[..n], &f32s(up)[..n]);
        let (dg, du) = (&mut f32s_mut(dgate)[..n], &mut f32s_mut(dup)[..n]);
        for i in 0..n {
            let s = 1.0 / (1.0 + (-g[i]).exp());
            // d silu(g) / dg = s * (1 + g * (1 - s))
            dg[i] = dout[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            du[i] = dout[i] * g[i] * s;
        }
        Ok(())
    }

    fn embedding_backward(
        &self,
        dtable: &mut Buf<Self>,
        dout: &Buf<Self>,
        tokens: &Buf<Self>,
        n_tokens: usize,
        dim: usize,
    ) -> Result<()> {
        let (dout, tokens) = (&f32s(dout)[..n_tokens * dim], &u32s(tokens)[..n_tokens]);
        let dt = f32s_mut(dtable);
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &mut dt[tok as usize * dim..(tok as usize + 1) * dim];
            row.iter_mut()
                .zip(&dout[t * dim..(t + 1) * dim])
                .for_each(|(d, g)| *d += g);
        }
        Ok(())
    }

    fn cross_entropy(
        &self,
        loss: &mut Buf<Self>,
        dx: &mut Buf<Self>,
        mut dw: Option<&mut Buf<Self>>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        labels: &Buf<Self>,
        rows: usize,
        scale: f32,
    ) -> Result<()> {
        let (vocab, dim) = (w.rows, w.cols);
        let wf = widen(w);
        let x = &f32s(x)[..rows * dim];
        let labels: &[i32] = bytemuck::cast_slice(&u32s(labels)[..rows]);
        if let Some(&bad) = labels.iter().find(|&&l| l >= vocab as i32) {
            return Err(Error::Usage(format!(
                "label {bad} is past the vocabulary of {vocab} tokens"
            )));
        }
        let mut total = 0.0f64;
        let dxs = &mut f32s_mut(dx)[..rows * dim];
        for c0 in (0..rows).step_by(CE_CHUNK) {
            let n = CE_CHUNK.min(rows - c0);
            // dlogits of the chunk's rows, then the row's loss in the last slot.
            let mut dl = vec![0.0f32; n * (vocab + 1)];
            par_chunks(self.threads, &mut dl, vocab + 1, |i, d| {
                let (r, label) = (c0 + i, labels[c0 + i]);
                if label < 0 {
                    d.fill(0.0);
                    return;
                }
                let xr = &x[r * dim..(r + 1) * dim];
                for (o, wrow) in wf.chunks_exact(dim).enumerate() {
                    d[o] = dot(xr, wrow);
                }
                let logits = &mut d[..vocab];
                let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
                let lse = max + sum.ln();
                let row_loss = lse - logits[label as usize];
                for l in logits.iter_mut() {
                    *l = (*l - lse).exp() * scale; // softmax, scaled
                }
                logits[label as usize] -= scale;
                d[vocab] = row_loss;
            });
            for i in 0..n {
                let d = &dl[i * (vocab + 1)..(i + 1) * (vocab + 1)];
                total += d[vocab] as f64;
                let dxr = &mut dxs[(c0 + i) * dim..(c0 + i + 1) * dim];
                dxr.fill(0.0);
                for (o, wrow) in wf.chunks_exact(dim).enumerate() {
                    if d[o] != 0.0 {
                        dxr.iter_mut().zip(wrow).for_each(|(a, w)| *a += d[o] * w);
                    }
                }
            }
            if let Some(dw) = dw.as_deref_mut() {
                let xc = &x[c0 * dim..(c0 + n) * dim];
                par_chunks(
                    self.threads,
                    &mut f32s_mut(dw)[..vocab * dim],
                    dim,
                    |o, dwo| {
                        for (i, xr) in xc.chunks_exact(dim).enumerate() {
                            let g = dl[i * (vocab + 1) + o];
                            if g != 0.0 {
                                dwo.iter_mut().zip(xr).for_each(|(a, x)| *a += g * x);
                            }
                        }
                    },
                );
            }
        }
        f32s_mut(loss)[0] = total as f32;
        Ok(())
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
        let g = &f32s(grad)[..n];
        let (p, m, v) = (
            &mut f32s_mut(param)[..n],
            &mut f32s_mut(m)[..n],
            &mut f32s_mut(v)[..n],
        );
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        let step_size = h.lr / bc1;
        for i in 0..n {
            let gi = g[i] * h.grad_scale;
            p[i] *= 1.0 - h.lr * h.weight_decay;
            m[i] += (gi - m[i]) * (1.0 - h.beta1);
            v[i] = v[i] * h.beta2 + (1.0 - h.beta2) * gi * gi;
            p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + h.eps);
        }
        Ok(())
    }

    fn write_weight(&self, w: &mut Weight<Self>, src: &Buf<Self>) -> Result<()> {
        let n = w.rows * w.cols;
        let src = &f32s(src)[..n];
        match w.dtype {
            DType::F32 => f32s_mut(&mut w.buf)[..n].copy_from_slice(src),
            DType::F16 | DType::BF16 => {
                let halves: &mut [u16] = bytemuck::cast_slice_mut(w.buf.raw_mut());
                for (d, &s) in halves[..n].iter_mut().zip(src) {
                    *d = if w.dtype == DType::F16 {
                        f16::from_f32(s).to_bits()
                    } else {
                        bf16::from_f32(s).to_bits()
                    };
                }
            }
            other => {
                return Err(Error::Usage(format!(
                    "a {other} weight cannot be trained directly (train LoRA adapters on it)"
                )))
            }
        }
        Ok(())
    }
}
