//! `Backend` for wgpu: checks each op's sizes against its buffers (a bad size is an error here,
//! not an out-of-bounds read on the device), fills the kernel's params block and picks the
//! dispatch shape. The kernels themselves are in shaders/wgsl/.

use super::exec::{Bind, Scratch};
use super::pipelines::{Float, Kernel, Quant, Store};
use super::Wgpu;
use crate::backend::checks;
use crate::backend::params::*;
use crate::backend::{
    ffn_gate_up_unfused, matmul_residual_unfused, norm_qkv_unfused, rope_kv_append_unfused,
    Backend, Heads, KvSlot, KvView, PendingRead, RmsNormed, RopeArgs, SampleOp, Weight,
};
use crate::batch::RowsView;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::{Buf, Pool};
use std::sync::Arc;

/// Threads per workgroup of the one-thread-per-element kernels.
pub(super) const WG: u64 = 256;
/// Up to this many rows, matmul runs the mat-vec kernel (4 rows per pass over the weights);
/// the fused projections (matmul_residual, norm_qkv, ffn_gate_up) are fused on these rows.
pub(super) const MATVEC_MAX_ROWS: usize = 8;
/// Output features per mat-vec workgroup (TEAMS of matmul_plain.wgsl / matmul_norm.wgsl).
pub(super) const MATVEC_FEATURES: usize = 8;
/// Up to this many query rows, attention runs the split-KV decode kernel.
pub(super) const DECODE_MAX_ROWS: usize = 4;
/// attention_decode.wgsl: most positions per split, most query heads per workgroup.
pub(super) const SPLIT_MAX: usize = 128;
const HEADS_PER_WG_MAX: usize = 8;
/// Workgroups the split-KV kernel aims for, so that one query row still fills a big GPU.
const DECODE_TARGET_WORKGROUPS: usize = 256;
/// Contexts up to this long are attended in one split, whose workgroups write the output
/// directly and save the combine dispatch (each small dispatch costs ~9 us of GPU time on the
/// H100's Vulkan driver); longer ones are split so that enough workgroups run. The bound is a
/// judgement, not yet tuned by measurement.
const DECODE_ONE_SPLIT_MAX: usize = 64;

pub(super) fn dev(msg: String) -> Error {
    Error::Device(msg)
}

/// How the kernels read a weight dtype.
#[derive(Clone, Copy)]
enum Storage {
    Float(Float),
    Quant(Quant),
}

fn storage_of(dtype: DType) -> Storage {
    match dtype {
        DType::F32 => Storage::Float(Float::F32),
        DType::F16 => Storage::Float(Float::F16),
        DType::BF16 => Storage::Float(Float::BF16),
        DType::Q8_0 => Storage::Quant(Quant::Q8_0),
        DType::Q4_0 => Storage::Quant(Quant::Q4_0),
        DType::Q4_1 => Storage::Quant(Quant::Q4_1),
        DType::Q4K => Storage::Quant(Quant::Q4K),
        DType::Q6K => Storage::Quant(Quant::Q6K),
    }
}

/// What a matmul's epilogue does with the sums.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    /// out = x . w^T
    Write,
    /// out += x . w^T (+ bias)
    Add(Option<&'a Buf<Wgpu>>),
}

/// Query heads per decode workgroup: the largest divisor of the GQA group size <= 8 (mirrors
/// `heads_per_workgroup` in attention_decode.wgsl).
pub(super) fn heads_per_workgroup(group: usize) -> usize {
    (1..=HEADS_PER_WG_MAX.min(group))
        .rev()
        .find(|c| group % c == 0)
        .unwrap_or(1)
}

impl Wgpu {
    /// How the matmul kernels read weights of `dtype`.
    pub(super) fn store(&self, dtype: DType) -> Store {
        match storage_of(dtype) {
            Storage::Float(Float::F16) if self.native_f16 => Store::NativeF16,
            Storage::Float(d) => Store::Float(d),
            Storage::Quant(q) => Store::Quant(q),
        }
    }

    /// Checks that `b` holds `need` bytes.
    pub(super) fn check_len(&self, b: &Buf<Wgpu>, need: usize, what: &str, op: &str) -> Result<()> {
        let cap = b.raw().size();
        if need as u64 > cap {
            return Err(dev(format!(
                "{op}: {what} holds {cap} bytes, the op needs {need}"
            )));
        }
        Ok(())
    }

    /// Binds all of `b` (up to the storage binding limit), checking that `need` bytes are there.
    pub(super) fn bind<'a>(
        &self,
        b: &'a Buf<Wgpu>,
        need: usize,
        what: &str,
        op: &str,
    ) -> Result<Bind<'a>> {
        self.check_len(b, need, what, op)?;
        let buf = b.raw();
        let cap = buf.size();
        let need = need as u64;
        let size = cap.min(self.max_binding());
        if need > size {
            return Err(dev(format!(
                "{op}: {what} needs {need} bytes bound, over the device's storage binding \
                 limit of {size}"
            )));
        }
        Ok(Bind {
            buf,
            offset: 0,
            size,
        })
    }

    pub(super) fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// Workgroups for `threads` threads of `wg` each, as a 2D grid when one dimension is short.
    pub(super) fn grid(&self, threads: u64, wg: u64) -> [u32; 3] {
        let groups = threads.div_ceil(wg);
        let max = self.exec.limits.max_compute_workgroups_per_dimension as u64;
        let x = groups.min(max);
        let y = if x == 0 { 0 } else { groups.div_ceil(x) };
        [x as u32, y.min(u32::MAX as u64) as u32, 1]
    }

    /// Rows of a `[rows, row_bytes]` weight bound per dispatch: all of them when the tensor
    /// fits one storage binding, else the most whose bytes fit with every chunk starting on
    /// the storage offset alignment.
    pub(super) fn rows_per_chunk(&self, rows: usize, row_bytes: u64, op: &str) -> Result<usize> {
        let max = self.max_binding();
        if rows as u64 * row_bytes <= max {
            return Ok(rows.max(1));
        }
        let align = self.exec.limits.min_storage_buffer_offset_alignment as u64;
        let unit = align / gcd(row_bytes, align);
        let chunk = (max / row_bytes) / unit * unit;
        if chunk == 0 {
            return Err(dev(format!(
                "{op}: one weight row of {row_bytes} bytes exceeds the storage binding limit"
            )));
        }
        Ok(chunk as usize)
    }

    /// Binding of weight rows [row0, row0 + n) (16-byte rounded, within the buffer).
    fn bind_rows<'a>(
        &self,
        w: &'a Buf<Wgpu>,
        rows: usize,
        row0: usize,
        n: usize,
        row_bytes: u64,
    ) -> Bind<'a> {
        let buf = w.raw();
        if row0 == 0 && n == rows {
            return Bind {
                buf,
                offset: 0,
                size: buf.size().min(self.max_binding()),
            };
        }
        let offset = row0 as u64 * row_bytes;
        let size = (n as u64 * row_bytes)
            .next_multiple_of(16)
            .min(buf.size() - offset);
        Bind { buf, offset, size }
    }

    /// out (+)= x . w^T: the mat-vec kernel for up to MATVEC_MAX_ROWS rows (the only one with
    /// an adding epilogue), else the tiled one; weights over the binding limit in row chunks.
    fn matmul_with(
        &self,
        out: &mut Buf<Wgpu>,
        x: &Buf<Wgpu>,
        w: &Weight<Wgpu>,
        rows: usize,
        epilogue: Epilogue,
    ) -> Result<()> {
        const OP: &str = "matmul";
        let (n, k) = (w.rows, w.cols);
        let row_bytes = checks::row_bytes(w.dtype, k, OP)? as u64;
        self.check_len(&w.buf, n * row_bytes as usize, "the weight", OP)?;
        let o = self.bind(out, rows * n * 4, "out", OP)?;
        let xb = self.bind(x, rows * k * 4, "x", OP)?;
        let matvec = rows <= MATVEC_MAX_ROWS;
        let store = self.store(w.dtype);
        let (kernel, bias) = match (epilogue, matvec) {
            (Epilogue::Write, true) => (Kernel::MatVec(store), None),
            (Epilogue::Write, false) => (Kernel::MatTiled(store), None),
            (Epilogue::Add(bias), true) => {
                let b = bias.map(|b| self.bind(b, n * 4, "bias", OP)).transpose()?;
                let bias = b.is_some();
                (Kernel::MatVecAdd { store, bias }, b)
            }
            (Epilogue::Add(_), false) => {
                return Err(dev(format!(
                    "{OP}: the adding epilogue is a mat-vec of at most {MATVEC_MAX_ROWS} rows"
                )))
            }
        };
        let chunk = self.rows_per_chunk(n, row_bytes, OP)?;
        let mut col0 = 0;
        while col0 < n {
            let nc = chunk.min(n - col0);
            let params = MatmulParams {
                rows: rows as u32,
                n: nc as u32,
                k: k as u32,
                out_stride: n as u32,
                col0: col0 as u32,
                accumulate: matches!(epilogue, Epilogue::Add(_)) as u32,
                _pad: [0; 2],
            };
            let wb = self.bind_rows(&w.buf, n, col0, nc, row_bytes);
            // matvec: 8 output features per workgroup, 4 rows per grid row; tiled: 64 rows x
            // 128 features.
            let groups = if matvec {
                [
                    nc.div_ceil(MATVEC_FEATURES) as u32,
                    rows.div_ceil(4) as u32,
                    1,
                ]
            } else {
                [nc.div_ceil(128) as u32, rows.div_ceil(64) as u32, 1]
            };
            match bias {
                None => self.run(kernel, &params, &[o, xb, wb], groups)?,
                Some(b) => self.run(kernel, &params, &[o, xb, wb, b], groups)?,
            }
            col0 += nc;
        }
        Ok(())
    }

    pub(super) fn run<P: bytemuck::Pod>(
        &self,
        k: Kernel,
        params: &P,
        binds: &[Bind],
        groups: [u32; 3],
    ) -> Result<()> {
        let p = self.pipelines.get(k)?;
        self.exec
            .dispatch(&p, bytemuck::bytes_of(params), binds, groups)
    }
}

impl Wgpu {
    /// attention_decode.wgsl over `n_splits` splits of `params.split_len` positions: one split
    /// writes the output directly, more write partials that attention_combine merges. `rows`:
    /// the ROWS variants (batch.rs RowsView). Binds are [out, q, K cache, V cache, table].
    pub(super) fn attention_decode(
        &self,
        op: &str,
        params: &AttentionParams,
        n_splits: usize,
        rows: bool,
        [o, q, k, v, t]: [Bind<'_>; 5],
    ) -> Result<()> {
        let (n, h) = (params.rows as usize, params.n_heads as usize);
        let group = h / params.n_kv_heads as usize;
        let head_groups = h / heads_per_workgroup(group);
        let groups = [n_splits as u32, head_groups as u32, n as u32];
        let f16 = params.kv_f16 != 0;
        if n_splits == 1 {
            // One split: its workgroups write the output, no partials and no combine.
            let kernel = Kernel::AttentionDecode {
                f16,
                direct: true,
                rows,
            };
            return self.run(kernel, params, &[o, q, k, v, t], groups);
        }
        let _exclusive = self.exec.exclusive();
        let part_bytes = (n * h * n_splits * (params.head_dim as usize + 2) * 4) as u64;
        let partials = self.exec.scratch(Scratch::AttentionPartials, part_bytes)?;
        let part = Bind {
            buf: &partials,
            offset: 0,
            size: partials.size().min(self.max_binding()),
        };
        if part_bytes > part.size {
            return Err(dev(format!(
                "{op}: {part_bytes} bytes of split partials exceed the storage binding limit \
                 (fewer query rows per call: a smaller prefill chunk or --max-seqs)"
            )));
        }
        let kernel = Kernel::AttentionDecode {
            f16,
            direct: false,
            rows,
        };
        self.run(kernel, params, &[part, q, k, v, t], groups)?;
        let combine = Kernel::AttentionCombine { rows };
        self.run(combine, params, &[o, part], [h as u32, n as u32, 1])
    }
}

/// (positions per split, splits) of the decode kernel for `rows` query rows over `n_ctx`
/// positions: one split for short contexts, else enough splits that about
/// DECODE_TARGET_WORKGROUPS workgroups run.
pub(super) fn decode_plan(rows: usize, n_ctx: usize, h: Heads) -> (usize, usize) {
    let split_len = if n_ctx <= DECODE_ONE_SPLIT_MAX {
        n_ctx.next_multiple_of(KV_BLOCK)
    } else {
        let head_groups = h.n_heads / heads_per_workgroup(h.n_heads / h.n_kv_heads);
        let wanted = DECODE_TARGET_WORKGROUPS.div_ceil(head_groups * rows).max(1);
        n_ctx
            .div_ceil(wanted)
            .next_multiple_of(KV_BLOCK)
            .clamp(KV_BLOCK, SPLIT_MAX)
    };
    (split_len, n_ctx.div_ceil(split_len))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Backend for Wgpu {
    type Raw = wgpu::Buffer;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn device_name(&self) -> String {
        let a = &self.adapter;
        format!(
            "{} ({}, {}, driver {})",
            a.name, a.device_type, a.backend, a.driver
        )
    }

    /// wgpu reports the largest buffer an adapter takes, but has no query for the device's
    /// total or free memory: an allocation past it fails as an out-of-memory error instead.
    fn memory_limits(&self) -> crate::backend::MemoryLimits {
        crate::backend::MemoryLimits {
            total: None,
            available: None,
            max_buffer: Some(self.adapter.max_buffer_size),
        }
    }

    fn alloc_raw(&self, bytes: usize) -> Result<wgpu::Buffer> {
        match self.exec.create_buffer(bytes as u64, "anyllama") {
            Ok(b) => Ok(b),
            Err(_) => {
                // Cached bind groups and pooled buffers may hold what is needed: free, retry.
                self.trim();
                self.exec.sync()?;
                self.exec.create_buffer(bytes as u64, "anyllama")
            }
        }
    }

    fn pool(&self) -> &Arc<Pool<Self>> {
        &self.pool
    }

    fn upload(&self, dst: &mut Buf<Self>, offset: usize, data: &[u8]) -> Result<()> {
        self.exec.upload(dst.raw(), offset as u64, data)
    }

    fn copy(
        &self,
        dst: &mut Buf<Self>,
        dst_offset: usize,
        src: &Buf<Self>,
        src_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        self.exec.copy(
            dst.raw(),
            dst_offset as u64,
            src.raw(),
            src_offset as u64,
            bytes as u64,
        )
    }

    fn read(&self, src: &Buf<Self>, offset: usize, out: &mut [u8]) -> Result<()> {
        self.exec.read(src.raw(), offset as u64, out)
    }

    fn read_start(&self, src: &Buf<Self>, offset: usize, bytes: usize) -> Result<PendingRead> {
        if bytes == 0 {
            return Ok(PendingRead::Done(Vec::new()));
        }
        let ticket = self
            .exec
            .read_start(src.raw(), offset as u64, bytes as u64)?;
        Ok(PendingRead::InFlight { ticket, bytes })
    }

    fn read_finish(&self, read: PendingRead, out: &mut [u8]) -> Result<()> {
        match read {
            PendingRead::InFlight { ticket, bytes } => {
                let mut data = vec![0; bytes];
                self.exec.read_finish(ticket, &mut data)?;
                PendingRead::Done(data).take_done(out)
            }
            done => done.take_done(out),
        }
    }

    fn sync(&self) -> Result<()> {
        self.exec.sync()
    }

    fn embedding(
        &self,
        out: &mut Buf<Self>,
        tokens: &Buf<Self>,
        table: &Weight<Self>,
        n_tokens: usize,
    ) -> Result<()> {
        const OP: &str = "embedding";
        let dim = table.cols;
        let row_bytes = checks::row_bytes(table.dtype, dim, OP)? as u64;
        let (kernel, per_thread) = match storage_of(table.dtype) {
            Storage::Float(d) => (Kernel::Embedding(d), 1),
            // One thread per 8 values (rows are whole 32-value blocks).
            Storage::Quant(q) => (Kernel::EmbeddingQ(q), 8),
        };
        self.check_len(&table.buf, table.rows * row_bytes as usize, "the table", OP)?;
        let o = self.bind(out, n_tokens * dim * 4, "out", OP)?;
        let t = self.bind(tokens, n_tokens * 4, "tokens", OP)?;
        let chunk = self.rows_per_chunk(table.rows, row_bytes, OP)?;
        let mut row0 = 0;
        loop {
            let n = chunk.min(table.rows - row0);
            let params = EmbeddingParams {
                n_tokens: n_tokens as u32,
                dim: dim as u32,
                row0: row0 as u32,
                chunk_rows: n as u32,
                vocab: table.rows as u32,
                _pad: [0; 3],
            };
            let w = self.bind_rows(&table.buf, table.rows, row0, n, row_bytes);
            let groups = self.grid((n_tokens * dim / per_thread) as u64, WG);
            self.run(kernel, &params, &[o, t, w], groups)?;
            row0 += n;
            if row0 >= table.rows {
                return Ok(());
            }
        }
    }

    fn rms_norm(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Buf<Self>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rms_norm";
        let binds = [
            self.bind(out, rows * dim * 4, "out", OP)?,
            self.bind(x, rows * dim * 4, "x", OP)?,
            self.bind(w, dim * 4, "w", OP)?,
        ];
        let params = RmsNormParams {
            rows: rows as u32,
            dim: dim as u32,
            eps,
            _pad: 0,
        };
        self.run(Kernel::RmsNorm, &params, &binds, self.grid(rows as u64, 1))
    }

    fn matmul(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
    ) -> Result<()> {
        self.matmul_with(out, x, w, rows, Epilogue::Write)
    }

    fn matmul_residual(
        &self,
        resid: &mut Buf<Self>,
        tmp: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        bias: Option<&Buf<Self>>,
        rows: usize,
    ) -> Result<()> {
        if rows > MATVEC_MAX_ROWS {
            return matmul_residual_unfused(self, resid, tmp, x, w, bias, rows);
        }
        // The mat-vec adds its sums (and the bias) into the residual stream itself.
        self.matmul_with(resid, x, w, rows, Epilogue::Add(bias))
    }

    fn norm_qkv(
        &self,
        qkv: [&mut Buf<Self>; 3],
        xb: &mut Buf<Self>,
        x: RmsNormed<'_, Self>,
        w: [&Weight<Self>; 3],
        rows: usize,
    ) -> Result<()> {
        match self.norm_qkv_plan(w, rows)? {
            Some(plan) => self.norm_qkv_fused(qkv, x, w, rows, plan),
            None => norm_qkv_unfused(self, qkv, xb, x, w, rows),
        }
    }

    fn ffn_gate_up(
        &self,
        out: &mut Buf<Self>,
        scratch: [&mut Buf<Self>; 3],
        x: RmsNormed<'_, Self>,
        w: (&Weight<Self>, &Weight<Self>),
        bias: (Option<&Buf<Self>>, Option<&Buf<Self>>),
        rows: usize,
    ) -> Result<()> {
        match self.gate_up_plan(w, bias, rows)? {
            Some(plan) => self.gate_up_fused(out, x, w, bias, rows, plan),
            None => ffn_gate_up_unfused(self, out, scratch, x, w, bias, rows),
        }
    }

    fn rope_kv_append(
        &self,
        q: &mut Buf<Self>,
        k: &mut Buf<Self>,
        v: &Buf<Self>,
        cache: KvSlot<'_, Self>,
        rope: RopeArgs<'_, Self>,
        rows: usize,
        pos0: usize,
        heads: Heads,
    ) -> Result<()> {
        // One thread owns four values of a head: head_dim must split into quarters; the
        // kernel binds 7 storage buffers.
        if heads.head_dim % 4 != 0 || self.exec.limits.max_storage_buffers_per_shader_stage < 7 {
            return rope_kv_append_unfused(self, q, k, v, cache, rope, rows, pos0, heads);
        }
        self.rope_kv_append_fused(q, k, v, cache, rope, rows, pos0, heads)
    }

    fn add_bias(&self, x: &mut Buf<Self>, bias: &Buf<Self>, rows: usize, n: usize) -> Result<()> {
        const OP: &str = "add_bias";
        let binds = [
            self.bind(x, rows * n * 4, "x", OP)?,
            self.bind(bias, n * 4, "bias", OP)?,
        ];
        let params = AddBiasParams {
            rows: rows as u32,
            n: n as u32,
            _pad: [0; 2],
        };
        self.run(
            Kernel::AddBias,
            &params,
            &binds,
            self.grid((rows * n) as u64, WG),
        )
    }

    fn rope(
        &self,
        q: &mut Buf<Self>,
        k: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
        attn_scale: f32,
    ) -> Result<()> {
        const OP: &str = "rope";
        checks::heads(h, OP, usize::MAX)?;
        let binds = [
            self.bind(q, rows * h.n_heads * h.head_dim * 4, "q", OP)?,
            self.bind(k, rows * h.n_kv_heads * h.head_dim * 4, "k", OP)?,
            self.bind(inv_freq, h.head_dim / 2 * 4, "inv_freq", OP)?,
        ];
        let params = RopeParams {
            rows: rows as u32,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: pos0 as u32,
            attn_scale,
            _pad: [0; 2],
        };
        let threads = rows * (h.n_heads + h.n_kv_heads) * h.head_dim / 2;
        self.run(Kernel::Rope, &params, &binds, self.grid(threads as u64, WG))
    }

    fn kv_append(
        &self,
        k_cache: &mut Buf<Self>,
        v_cache: &mut Buf<Self>,
        kv_dtype: DType,
        table: &Buf<Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "kv_append";
        let f16 = checks::kv_is_f16(kv_dtype, OP)?;
        checks::heads(h, OP, usize::MAX)?;
        let width = h.n_kv_heads * h.head_dim;
        let blocks = (pos0 + rows).div_ceil(KV_BLOCK);
        let binds = [
            self.bind(k_cache, 0, "the K cache", OP)?,
            self.bind(v_cache, 0, "the V cache", OP)?,
            self.bind(table, blocks * 4, "the block table", OP)?,
            self.bind(k, rows * width * 4, "k", OP)?,
            self.bind(v, rows * width * 4, "v", OP)?,
        ];
        let params = KvAppendParams {
            rows: rows as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: pos0 as u32,
            kv_f16: f16 as u32,
            _pad: [0; 3],
        };
        let groups = self.grid((rows * width / 2) as u64, WG);
        let kernel = Kernel::KvAppend { f16, rows: false };
        self.run(kernel, &params, &binds, groups)
    }

    fn attention(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        const OP: &str = "attention";
        let f16 = checks::kv_is_f16(kv.dtype, OP)?;
        checks::heads(h, OP, self.max_head_dim())?;
        if rows == 0 {
            return Ok(());
        }
        let n_ctx = pos0 + rows;
        let width = rows * h.n_heads * h.head_dim * 4;
        let o = self.bind(out, width, "out", OP)?;
        let inputs = [
            self.bind(q, width, "q", OP)?,
            self.bind(kv.k, 0, "the K cache", OP)?,
            self.bind(kv.v, 0, "the V cache", OP)?,
            self.bind(
                kv.table,
                n_ctx.div_ceil(KV_BLOCK) * 4,
                "the block table",
                OP,
            )?,
        ];
        let mut params = AttentionParams {
            rows: rows as u32,
            n_heads: h.n_heads as u32,
            n_kv_heads: h.n_kv_heads as u32,
            head_dim: h.head_dim as u32,
            pos0: pos0 as u32,
            kv_f16: f16 as u32,
            scale: 1.0 / (h.head_dim as f32).sqrt(),
            split_len: 0,
        };
        if rows > DECODE_MAX_ROWS {
            let groups = [rows.div_ceil(16) as u32, h.n_heads as u32, 1];
            let [q, k, v, t] = inputs;
            return self.run(
                Kernel::AttentionPrefill { f16 },
                &params,
                &[o, q, k, v, t],
                groups,
            );
        }
        let (split_len, n_splits) = decode_plan(rows, n_ctx, h);
        params.split_len = split_len as u32;
        let [q, k, v, t] = inputs;
        self.attention_decode(OP, &params, n_splits, false, [o, q, k, v, t])
    }

    fn swiglu(
        &self,
        out: &mut Buf<Self>,
        gate: &Buf<Self>,
        up: &Buf<Self>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu";
        let binds = [
            self.bind(out, n * 4, "out", OP)?,
            self.bind(gate, n * 4, "gate", OP)?,
            self.bind(up, n * 4, "up", OP)?,
        ];
        let params = ElementwiseParams {
            n: n as u32,
            _pad: [0; 3],
        };
        self.run(Kernel::Swiglu, &params, &binds, self.grid(n as u64, WG))
    }

    fn add(&self, x: &mut Buf<Self>, y: &Buf<Self>, n: usize) -> Result<()> {
        self.add_scaled(x, y, 1.0, n)
    }

    /// add.wgsl with alpha: LoRA's scaled update, and the plain add at alpha 1.
    fn add_scaled(&self, x: &mut Buf<Self>, y: &Buf<Self>, alpha: f32, n: usize) -> Result<()> {
        const OP: &str = "add";
        let binds = [self.bind(x, n * 4, "x", OP)?, self.bind(y, n * 4, "y", OP)?];
        let params = AddParams {
            n: n as u32,
            alpha,
            _pad: [0; 2],
        };
        self.run(Kernel::Add, &params, &binds, self.grid(n as u64, WG))
    }

    fn rope_rows(
        &self,
        x: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        pos: &Buf<Self>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        attn_scale: f32,
    ) -> Result<()> {
        self.rope_rows_kernel(x, inv_freq, pos, rows, n_heads, head_dim, attn_scale)
    }

    fn kv_append_rows(
        &self,
        cache: KvSlot<'_, Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        rows: RowsView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        self.kv_append_rows_kernel(cache, k, v, rows, heads)
    }

    fn attention_rows(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: RowsView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        self.attention_rows_kernel(out, q, kv, rows, heads)
    }

    fn sample(
        &self,
        out: &mut Buf<Self>,
        out_index: usize,
        logits: &Buf<Self>,
        vocab: usize,
        s: SampleOp,
    ) -> Result<()> {
        const OP: &str = "sample";
        if vocab == 0 {
            return Err(dev(format!("{OP}: empty vocabulary")));
        }
        let o = self.bind(out, (out_index + 1) * 4, "out", OP)?;
        let l = self.bind(logits, vocab * 4, "logits", OP)?;
        let _exclusive = self.exec.exclusive();
        // Probabilities, then one word telling sample_walk whether the token is chosen.
        let probs = self
            .exec
            .scratch(Scratch::SampleProbs, (vocab as u64 + 1) * 4)?;
        let p = Bind {
            buf: &probs,
            offset: 0,
            size: probs.size().min(self.max_binding()),
        };
        let params = SampleParams {
            vocab: vocab as u32,
            top_k: s.top_k.min(u32::MAX as usize) as u32,
            top_p: s.top_p,
            min_p: s.min_p,
            temperature: s.temperature,
            uniform: s.uniform,
            out_index: out_index as u32,
            _pad: 0,
        };
        self.run(Kernel::Sample, &params, &[o, l, p], [1, 1, 1])?;
        self.run(Kernel::SampleWalk, &params, &[o, p], [1, 1, 1])
    }
}
