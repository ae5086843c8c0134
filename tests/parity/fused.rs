//! The fused projections (matmul_residual: x += h . w^T (+ b); norm_qkv: rms_norm(x) . (wq, wk,
//! wv)^T; ffn_gate_up: silu(rms_norm(x) . w1^T + b1) * (rms_norm(x) . w3^T + b3)) of a GPU
//! backend against the CPU's unfused ops, for weights in any stored form. Outputs are poisoned
//! first; the CPU runs the trait's default (unfused) methods.

use super::*;

/// One case: three weight matrices as stored bytes (a and b [n, k], c [n / 3 + 1, k]: the
/// narrower v of norm_qkv), and the float inputs.
pub struct FusedCase {
    pub dtype: DType,
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub with_bias: bool,
    pub wa: Vec<u8>,
    pub wb: Vec<u8>,
    pub wc: Vec<u8>,
    pub x: Vec<f32>,
    pub resid: Vec<f32>,
    /// The residual's and the gate's bias, and the up projection's.
    pub bias: Vec<f32>,
    pub bias_up: Vec<f32>,
    pub norm: Vec<f32>,
}

impl FusedCase {
    /// Random inputs around weights made by `weights(rows_of_matrix)` (bytes in `dtype`).
    pub fn new(
        r: &mut ChaCha8Rng,
        dtype: DType,
        [rows, n, k]: [usize; 3],
        with_bias: bool,
        mut weights: impl FnMut(&mut ChaCha8Rng, usize) -> Vec<u8>,
    ) -> FusedCase {
        let (wa, wb, wc) = (weights(r, n), weights(r, n), weights(r, n / 3 + 1));
        FusedCase {
            dtype,
            rows,
            n,
            k,
            with_bias,
            wa,
            wb,
            wc,
            x: randn(r, rows * k, 1.0),
            resid: randn(r, rows * n, 2.0),
            bias: randn(r, n, 1.0),
            bias_up: randn(r, n, 1.0),
            norm: randn(r, k, 0.2).iter().map(|v| 1.0 + v).collect(),
        }
    }

    /// [residual, norm + gate/up, norm + q/k/v (concatenated)] on backend `b`.
    fn run<B: Backend>(&self, b: &B) -> [Vec<f32>; 3] {
        let FusedCase {
            dtype, rows, n, k, ..
        } = *self;
        let nv = n / 3 + 1;
        let wa = raw_weight(b, dtype, n, k, &self.wa);
        let wb = raw_weight(b, dtype, n, k, &self.wb);
        let wc = raw_weight(b, dtype, nv, k, &self.wc);
        let xb = f32_buf(b, &self.x);
        let bb = f32_buf(b, &self.bias);
        let bu = f32_buf(b, &self.bias_up);
        let gb = f32_buf(b, &self.norm);
        let (bias, bias_up) = (self.with_bias.then_some(&bb), self.with_bias.then_some(&bu));
        let mut res = f32_buf(b, &self.resid);
        let mut tmp = poisoned(b, rows * n);
        b.matmul_residual(&mut res, &mut tmp, &xb, &wa, bias, rows)
            .unwrap();
        let normed = RmsNormed {
            x: &xb,
            weight: &gb,
            eps: 1e-5,
        };
        let mut out = poisoned(b, rows * n);
        let (mut g, mut u) = (poisoned(b, rows * n), poisoned(b, rows * n));
        let mut h = poisoned(b, rows * k);
        let scratch = [&mut g, &mut u, &mut h];
        b.ffn_gate_up(&mut out, scratch, normed, (&wa, &wb), (bias, bias_up), rows)
            .unwrap();
        let (mut q, mut kk) = (poisoned(b, rows * n), poisoned(b, rows * n));
        let mut v = poisoned(b, rows * nv);
        b.norm_qkv(
            [&mut q, &mut kk, &mut v],
            &mut h,
            normed,
            [&wa, &wb, &wc],
            rows,
        )
        .unwrap();
        [
            read_f32(b, &res, rows * n),
            read_f32(b, &out, rows * n),
            [
                read_f32(b, &q, rows * n),
                read_f32(b, &kk, rows * n),
                read_f32(b, &v, rows * nv),
            ]
            .concat(),
        ]
    }

    /// Runs the case on the CPU and on `gpu` and compares the three results.
    pub fn check<B: Backend>(&self, name: &str, gpu: &B) {
        let FusedCase {
            dtype,
            rows,
            n,
            k,
            with_bias,
            ..
        } = *self;
        let what = format!("{name} fused {dtype} rows {rows} n {n} k {k} bias {with_bias}");
        let cpu = self.run(&Cpu::new());
        let got = self.run(gpu);
        // CUDA's default variant runs rows past its mat-vec through half-precision GEMMs.
        let tol = if name == CUDA_HALF_GEMM && rows > CUDA_MATVEC_MAX_ROWS && dtype != DType::F32 {
            TOL_BF16_GEMM
        } else {
            TOL_F32
        };
        for (i, part) in ["residual", "norm + gate/up", "norm + q/k/v"]
            .iter()
            .enumerate()
        {
            assert_close(&format!("{what} {part}"), &cpu[i], &got[i], tol);
        }
    }
}
