//! Times the wgpu kernels on shapes of real models: decode mat-vecs for every weight dtype
//! (Llama-3.1-8B's 14336 x 4096 FFN), a prefill GEMM, attention at long context (decode and
//! prefill), sampling over a 128k vocabulary, and small element-wise ops (dispatch overhead).
//! Each op is enqueued `reps` times back to back and timed to the end of a sync, which is what a
//! decode step pays. Run: `cargo run --release --example wgpu_bench [adapter index]`.

#[cfg(feature = "wgpu")]
fn main() -> anyllama::Result<()> {
    use anyllama::backend::params::KV_BLOCK;
    use anyllama::backend::wgpu::Wgpu;
    use anyllama::backend::{Backend, Heads, KvView, SampleOp, Weight};
    use anyllama::dtype::DType;
    use anyllama::pool::Buf;
    use std::time::Instant;

    let adapter = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let b = Wgpu::new(adapter)?;
    println!(
        "device: {} (native f16: {})",
        b.device_name(),
        b.uses_native_f16()
    );
    // Seconds per call of `op`, after one warm-up call.
    let time =
        |reps: usize, op: &mut dyn FnMut() -> anyllama::Result<()>| -> anyllama::Result<f64> {
            op()?;
            b.sync()?;
            let t = Instant::now();
            for _ in 0..reps {
                op()?;
            }
            b.sync()?;
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        };
    let weight = |dtype: DType, rows: usize, cols: usize| -> anyllama::Result<Weight<Wgpu>> {
        let bytes = dtype.bytes_for(rows * cols).unwrap();
        Ok(Weight {
            buf: Buf::exact(&b, bytes)?,
            dtype,
            rows,
            cols,
        })
    };

    let (n, k) = (14336, 4096);
    let x = b.alloc(512 * k * 4)?;
    let mut out = b.alloc(512 * n * 4)?;
    println!("\nmat-vec, 1 row, {n} x {k}:");
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q6K,
        DType::Q4K,
        DType::Q4_1,
        DType::Q4_0,
    ] {
        let w = weight(dtype, n, k)?;
        let s = time(50, &mut || b.matmul(&mut out, &x, &w, 1))?;
        let gb = dtype.bytes_for(n * k).unwrap() as f64 / 1e9;
        println!("  {dtype:>5}: {:8.1} us  {:7.1} GB/s", s * 1e6, gb / s);
    }
    println!("\ntiled GEMM, 512 x 4096 x 4096:");
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4K,
        DType::Q4_0,
    ] {
        let w = weight(dtype, 4096, 4096)?;
        let s = time(5, &mut || b.matmul(&mut out, &x, &w, 512))?;
        println!(
            "  {dtype:>5}: {:8.1} us  {:7.2} TFLOP/s",
            s * 1e6,
            2.0 * 512.0 * 4096.0 * 4096.0 / s / 1e12
        );
    }

    let h = Heads {
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
    };
    for kv in [DType::F16, DType::F32] {
        let ctx = 8192;
        let blocks = ctx / KV_BLOCK;
        let elt = if kv == DType::F16 { 2 } else { 4 };
        let cache = blocks * KV_BLOCK * h.n_kv_heads * h.head_dim * elt;
        let (kc, vc) = (Buf::exact(&b, cache)?, Buf::exact(&b, cache)?);
        let mut table = b.alloc(blocks * 4)?;
        let ids: Vec<u32> = (0..blocks as u32).collect();
        b.upload(&mut table, 0, bytemuck::cast_slice(&ids))?;
        let q = b.alloc(512 * h.n_heads * h.head_dim * 4)?;
        let mut o = b.alloc(512 * h.n_heads * h.head_dim * 4)?;
        println!("\nattention {kv} cache, 32 heads / 8 kv heads / 128 dims:");
        for pos in [511, 4095, 8191] {
            let view = || KvView {
                k: &kc,
                v: &vc,
                table: &table,
                dtype: kv,
            };
            let s = time(50, &mut || b.attention(&mut o, &q, view(), 1, pos, h))?;
            let gb = (2 * (pos + 1) * h.n_kv_heads * h.head_dim * elt) as f64 / 1e9;
            println!(
                "  decode at {:5}: {:8.1} us  {:7.1} GB/s of K+V",
                pos + 1,
                s * 1e6,
                gb / s
            );
        }
        let view = KvView {
            k: &kc,
            v: &vc,
            table: &table,
            dtype: kv,
        };
        let s = time(3, &mut || {
            b.attention(&mut o, &q, KvView { ..view }, 512, 0, h)
        })?;
        let flops = 4.0 * 512.0 * 512.0 / 2.0 * (h.n_heads * h.head_dim) as f64;
        println!(
            "  prefill 512 rows: {:8.1} us  {:7.2} TFLOP/s",
            s * 1e6,
            flops / s / 1e12
        );
    }

    let vocab = 128_256;
    // Logits like a language model's: a spread of small values and a few likely tokens.
    let mut seed = 12345u32;
    let mut next = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32
    };
    let host: Vec<f32> = (0..vocab)
        .map(|i| 4.0 * next() - 2.0 + if i % 4000 == 7 { 10.0 * next() } else { 0.0 })
        .collect();
    let mut logits = b.alloc(vocab * 4)?;
    b.upload(&mut logits, 0, bytemuck::cast_slice(&host))?;
    let mut ids = b.alloc(16)?;
    println!("\nsample over {vocab}:");
    for (name, s) in [
        (
            "greedy",
            SampleOp {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                uniform: 0.5,
            },
        ),
        (
            "top-k 40 top-p 0.95 min-p 0.05",
            SampleOp {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                uniform: 0.5,
            },
        ),
        (
            "top-p 0.9 only",
            SampleOp {
                temperature: 0.8,
                top_k: 0,
                top_p: 0.9,
                min_p: 0.0,
                uniform: 0.5,
            },
        ),
    ] {
        let t = time(20, &mut || b.sample(&mut ids, 0, &logits, vocab, s))?;
        println!("  {name}: {:8.1} us", t * 1e6);
    }

    let mut y = b.alloc(n * 4)?;
    let w = b.alloc(k * 4)?;
    println!("\nsmall ops (dispatch overhead included):");
    let t = time(200, &mut || b.rms_norm(&mut y, &x, &w, 1, k, 1e-5))?;
    println!("  rms_norm 1 x {k}: {:6.1} us", t * 1e6);
    let t = time(200, &mut || b.swiglu(&mut out, &x, &w, k))?;
    println!("  swiglu {k}: {:6.1} us", t * 1e6);
    let t = time(200, &mut || b.add(&mut y, &x, k))?;
    println!("  add {k}: {:6.1} us", t * 1e6);
    Ok(())
}

#[cfg(not(feature = "wgpu"))]
fn main() {
    eprintln!("wgpu_bench needs the `wgpu` feature");
}
