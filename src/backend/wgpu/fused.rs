//! The fused decode ops: RMSNorm + q/k/v projections and RMSNorm + gate/up projections + swiglu
//! in one mat-vec dispatch each (shaders/wgsl/matmul_norm.wgsl, appended to the weight-storage
//! file), and RoPE + KV-cache append in one (rope_kv_append.wgsl). The mat-vec ones stage the
//! normed input rows in workgroup memory; they run where `matmul` runs its mat-vec (up to
//! MATVEC_MAX_ROWS rows), where every matrix fits one storage binding, and where a padded input
//! row fits the staging memory the device offers. Elsewhere ops.rs falls back to the separate
//! ops.

use super::ops::{dev, MATVEC_FEATURES, MATVEC_MAX_ROWS, WG};
use super::pipelines::Kernel;
use super::Wgpu;
use crate::backend::checks;
use crate::backend::params::{NormMatvecParams, RopeParams, KV_BLOCK};
use crate::backend::{Heads, KvSlot, RmsNormed, RopeArgs, Weight};
use crate::error::Result;
use crate::pool::Buf;

/// Widest input row whose norm is folded into the mat-vecs. On the H100 the staging prologue
/// pays off at 576 and 2048 (SmolLM2-135M decode 337 -> 510 tok/s, Llama-3.2-1B 335 -> 410)
/// but not at 4096: the 8B shape's norm-folded gate/up ran at 195 us per launch (1.2 TB/s),
/// and its decode fell from 90 to 83 tok/s; wider rows take rms_norm and the plain mat-vecs.
const NORM_FOLD_MAX_K: usize = 2048;

/// How a norm-folded mat-vec runs: the staging size of its pipeline and the input rows each
/// workgroup takes (matmul_norm.wgsl's group_rows for that size).
#[derive(Clone, Copy, Debug)]
pub(super) struct NormPlan {
    stage: u32,
    group_rows: usize,
}

impl Wgpu {
    /// The staging size for `rows` input rows of `k` values: the smallest that holds the rows
    /// one workgroup takes (up to 4), else the largest; None when not even one row fits.
    fn norm_plan(&self, rows: usize, k: usize) -> Option<NormPlan> {
        if k > NORM_FOLD_MAX_K {
            return None;
        }
        // matvec_qkv and matvec_gate_up_bias bind 8 storage buffers (WebGPU's minimum limit;
        // some GL adapters offer fewer).
        if self.exec.limits.max_storage_buffers_per_shader_stage < 8 {
            return None;
        }
        let stride = k.div_ceil(8) * 8;
        let stages = self.pipelines.tuning.norm_stages;
        let group_rows = |stage: u32| 4.min(stage as usize / stride);
        let want = rows.clamp(1, 4);
        let stage = stages
            .into_iter()
            .find(|&s| s > 0 && group_rows(s) >= want)
            .or_else(|| stages.into_iter().filter(|&s| s > 0).max())?;
        (group_rows(stage) > 0).then(|| NormPlan {
            stage,
            group_rows: group_rows(stage),
        })
    }

    /// Whether (and how) `norm_qkv` runs fused: mat-vec rows, three matrices of one dtype and
    /// width, each within one storage binding.
    pub(super) fn norm_qkv_plan(
        &self,
        w: [&Weight<Wgpu>; 3],
        rows: usize,
    ) -> Result<Option<NormPlan>> {
        if rows == 0 || rows > MATVEC_MAX_ROWS {
            return Ok(None);
        }
        let (dtype, k) = (w[0].dtype, w[0].cols);
        if w.iter().any(|m| m.dtype != dtype || m.cols != k) {
            return Ok(None);
        }
        if !self.one_binding(&w)? {
            return Ok(None);
        }
        Ok(self.norm_plan(rows, k))
    }

    /// Whether (and how) `ffn_gate_up` runs fused: mat-vec rows, gate and up alike and within
    /// one storage binding, both biases or none.
    pub(super) fn gate_up_plan(
        &self,
        (w1, w3): (&Weight<Wgpu>, &Weight<Wgpu>),
        bias: (Option<&Buf<Wgpu>>, Option<&Buf<Wgpu>>),
        rows: usize,
    ) -> Result<Option<NormPlan>> {
        if rows == 0 || rows > MATVEC_MAX_ROWS || bias.0.is_some() != bias.1.is_some() {
            return Ok(None);
        }
        if (w1.dtype, w1.rows, w1.cols) != (w3.dtype, w3.rows, w3.cols) {
            return Ok(None);
        }
        if !self.one_binding(&[w1, w3])? {
            return Ok(None);
        }
        Ok(self.norm_plan(rows, w1.cols))
    }

    /// Whether every matrix is bound whole (the fused kernels take no row chunks).
    fn one_binding(&self, w: &[&Weight<Wgpu>]) -> Result<bool> {
        for m in w {
            let row_bytes = checks::row_bytes(m.dtype, m.cols, "matmul")? as u64;
            if self.rows_per_chunk(m.rows, row_bytes, "matmul")? < m.rows {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Binds weight `w` whole, checking its size.
    fn bind_weight<'a>(&self, w: &'a Weight<Wgpu>, op: &str) -> Result<super::exec::Bind<'a>> {
        let row_bytes = checks::row_bytes(w.dtype, w.cols, op)?;
        self.bind(&w.buf, w.rows * row_bytes, "the weight", op)
    }

    /// q, k, v = rms_norm(x) . (wq, wk, wv)^T in one dispatch.
    pub(super) fn norm_qkv_fused(
        &self,
        [q, k, v]: [&mut Buf<Wgpu>; 3],
        x: RmsNormed<'_, Wgpu>,
        w: [&Weight<Wgpu>; 3],
        rows: usize,
        plan: NormPlan,
    ) -> Result<()> {
        const OP: &str = "norm_qkv";
        let dim = w[0].cols;
        let binds = [
            self.bind(q, rows * w[0].rows * 4, "q", OP)?,
            self.bind(x.x, rows * dim * 4, "x", OP)?,
            self.bind_weight(w[0], OP)?,
            self.bind_weight(w[1], OP)?,
            self.bind_weight(w[2], OP)?,
            self.bind(x.weight, dim * 4, "the norm weight", OP)?,
            self.bind(k, rows * w[1].rows * 4, "k", OP)?,
            self.bind(v, rows * w[2].rows * 4, "v", OP)?,
        ];
        let params = NormMatvecParams {
            rows: rows as u32,
            k: dim as u32,
            n0: w[0].rows as u32,
            n1: w[1].rows as u32,
            n2: w[2].rows as u32,
            eps: x.eps,
            _pad: [0; 2],
        };
        // Each matrix starts a new workgroup, so that a workgroup reads one matrix.
        let groups: usize = w.iter().map(|m| m.rows.div_ceil(MATVEC_FEATURES)).sum();
        let kernel = Kernel::NormQkv {
            store: self.store(w[0].dtype),
            stage: plan.stage,
        };
        let grid = [groups as u32, rows.div_ceil(plan.group_rows) as u32, 1];
        self.run(kernel, &params, &binds, grid)
    }

    /// out = silu(h . w1^T + b1) * (h . w3^T + b3), h = rms_norm(x), in one dispatch.
    pub(super) fn gate_up_fused(
        &self,
        out: &mut Buf<Wgpu>,
        x: RmsNormed<'_, Wgpu>,
        (w1, w3): (&Weight<Wgpu>, &Weight<Wgpu>),
        bias: (Option<&Buf<Wgpu>>, Option<&Buf<Wgpu>>),
        rows: usize,
        plan: NormPlan,
    ) -> Result<()> {
        const OP: &str = "ffn_gate_up";
        let (n, dim) = (w1.rows, w1.cols);
        let (wg, wu) = (self.bind_weight(w1, OP)?, self.bind_weight(w3, OP)?);
        // Binding 5 (the third matrix, which the shared weight reader names) repeats w3.
        let mut binds = vec![
            self.bind(out, rows * n * 4, "out", OP)?,
            self.bind(x.x, rows * dim * 4, "x", OP)?,
            wg,
            wu,
            wu,
            self.bind(x.weight, dim * 4, "the norm weight", OP)?,
        ];
        if let (Some(b1), Some(b3)) = bias {
            binds.push(self.bind(b1, n * 4, "the gate bias", OP)?);
            binds.push(self.bind(b3, n * 4, "the up bias", OP)?);
        }
        let params = NormMatvecParams {
            rows: rows as u32,
            k: dim as u32,
            n0: n as u32,
            eps: x.eps,
            ..Default::default()
        };
        let kernel = Kernel::NormGateUp {
            store: self.store(w1.dtype),
            bias: bias.0.is_some(),
            stage: plan.stage,
        };
        let grid = [
            n.div_ceil(MATVEC_FEATURES) as u32,
            rows.div_ceil(plan.group_rows) as u32,
            1,
        ];
        self.run(kernel, &params, &binds, grid)
    }

    /// rope then kv_append in one dispatch (head_dim a multiple of 4).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_kv_append_fused(
        &self,
        q: &mut Buf<Wgpu>,
        k: &mut Buf<Wgpu>,
        v: &Buf<Wgpu>,
        cache: KvSlot<'_, Wgpu>,
        rope: RopeArgs<'_, Wgpu>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "rope_kv_append";
        let f16 = checks::kv_is_f16(cache.dtype, OP)?;
        checks::heads(h, OP, usize::MAX)?;
        if h.head_dim % 4 != 0 {
            return Err(dev(format!(
                "{OP}: head_dim {} is not a multiple of 4",
                h.head_dim
            )));
        }
        let width = h.n_kv_heads * h.head_dim;
        let blocks = (pos0 + rows).div_ceil(KV_BLOCK);
        let binds = [
            self.bind(q, rows * h.n_heads * h.head_dim * 4, "q", OP)?,
            self.bind(k, rows * width * 4, "k", OP)?,
            self.bind(cache.k, 0, "the K cache", OP)?,
            self.bind(cache.v, 0, "the V cache", OP)?,
            self.bind(cache.table, blocks * 4, "the block table", OP)?,
            self.bind(v, rows * width * 4, "v", OP)?,
            self.bind(rope.inv_freq, h.head_dim / 2 * 4, "inv_freq", OP)?,
        ];
        let params = RopeParams {
            rows: rows as u32,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: pos0 as u32,
            attn_scale: rope.attn_scale,
            _pad: [0; 2],
        };
        let threads = rows * (h.n_heads + h.n_kv_heads) * h.head_dim / 4;
        let groups = self.grid(threads as u64, WG);
        self.run(Kernel::RopeKvAppend { f16 }, &params, &binds, groups)
    }
}
