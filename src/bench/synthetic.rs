//! Models of real shapes with random weights, made directly on the device: no checkpoint to
//! download or read. One chunk of random values (or of valid quantized blocks) is made on the
//! host and uploaded once; every weight buffer is then filled with device-side copies of it, so
//! an 8B model takes seconds and never 16 GB of host memory.
//!
//! The shapes match bench/make_synthetic.py (the HF peer builds the same models from it).

use crate::backend::{Backend, Weight};
use crate::config::{ModelConfig, RopeScaling};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::pool::Buf;
use crate::quant_blocks::quantize_blocks;
use crate::weights::{LayerWeights, Weights};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The dimensions of a Llama-family model, as its config.json gives them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub dim: usize,
    pub ffn_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub tie_embeddings: bool,
    pub rope_theta: f64,
    pub max_seq_len: usize,
    /// Llama 3's RoPE scaling factor (low 1, high 4, original 8192), None for plain RoPE.
    pub llama3_rope_factor: Option<f64>,
}

/// The shapes `--synthetic` knows; `tiny` is for tests (every dtype fits its rows).
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "smollm2-135m",
        dim: 576,
        ffn_dim: 1536,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        vocab_size: 49152,
        tie_embeddings: true,
        rope_theta: 100000.0,
        max_seq_len: 8192,
        llama3_rope_factor: None,
    },
    Shape {
        name: "llama-3.2-1b",
        dim: 2048,
        ffn_dim: 8192,
        n_layers: 16,
        n_heads: 32,
        n_kv_heads: 8,
        vocab_size: 128256,
        tie_embeddings: true,
        rope_theta: 500000.0,
        max_seq_len: 131072,
        llama3_rope_factor: Some(32.0),
    },
    Shape {
        name: "llama-3.1-8b",
        dim: 4096,
        ffn_dim: 14336,
        n_layers: 32,
        n_heads: 32,
        n_kv_heads: 8,
        vocab_size: 128256,
        tie_embeddings: false,
        rope_theta: 500000.0,
        max_seq_len: 131072,
        llama3_rope_factor: Some(8.0),
    },
    Shape {
        name: "tiny",
        dim: 256,
        ffn_dim: 512,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        vocab_size: 1024,
        tie_embeddings: true,
        rope_theta: 10000.0,
        max_seq_len: 16384,
        llama3_rope_factor: None,
    },
];

/// The shape called `name`.
pub fn shape(name: &str) -> Result<&'static Shape> {
    SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
        Error::Usage(format!(
            "unknown synthetic shape {name:?}; known: {}",
            names.join(", ")
        ))
    })
}

impl Shape {
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            vocab_size: self.vocab_size,
            dim: self.dim,
            ffn_dim: self.ffn_dim,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.dim / self.n_heads,
            norm_eps: 1e-5,
            max_seq_len: self.max_seq_len,
            tie_embeddings: self.tie_embeddings,
            arch: crate::arch::Arch::Llama,
            attention_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
            rope_theta: self.rope_theta,
            rope_scaling: match self.llama3_rope_factor {
                Some(factor) => RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                },
                None => RopeScaling::Default,
            },
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            torch_dtype: None,
        }
    }
}

/// Standard deviation of the random weights (HF's `initializer_range`).
const INIT_STD: f32 = 0.02;
/// Host bytes of the random chunk (rounded to whole blocks and 4-byte words).
const CHUNK_BYTES: usize = 8 << 20;

/// Device copies move whole 4-byte words (wgpu) and must not split a quantized block, so a
/// chunk is a whole number of `lcm(block_bytes, 4)` units.
fn copy_unit(dtype: DType) -> usize {
    let b = dtype.block_bytes();
    b * 4 / gcd(b, 4)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `bytes` bytes (a whole number of `copy_unit`s) of random weights stored as `dtype`: uniform
/// values of standard deviation INIT_STD, quantized by the reference quantizer where there is
/// one; K-quant blocks get random codes under small finite scales.
pub fn random_chunk(dtype: DType, bytes: usize, seed: u64) -> Result<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let half_width = INIT_STD * 3f32.sqrt();
    let values = |n: usize, rng: &mut ChaCha8Rng| -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-half_width..half_width))
            .collect()
    };
    let n = bytes / dtype.block_bytes() * dtype.block_elems();
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(&values(n, &mut rng)).to_vec(),
        DType::F16 => values(n, &mut rng)
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values(n, &mut rng)
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
            quantize_blocks(dtype, &values(n, &mut rng)).expect("whole 32-value blocks")
        }
        DType::Q4K | DType::Q6K => {
            let mut out = vec![0u8; bytes];
            rng.fill(&mut out[..]);
            // Q4_K: d and dmin at bytes 0..4; Q6_K: d at bytes 208..210. A value is at most
            // d * 63 * 15 (Q4_K) or d * 128 * 32 (Q6_K), near INIT_STD's range with these.
            for block in out.chunks_exact_mut(dtype.block_bytes()) {
                if dtype == DType::Q4K {
                    block[0..2].copy_from_slice(&f16::from_f32(6e-5).to_le_bytes());
                    block[2..4].copy_from_slice(&f16::from_f32(3e-5).to_le_bytes());
                } else {
                    block[208..210].copy_from_slice(&f16::from_f32(1e-5).to_le_bytes());
                }
            }
            out
        }
    })
}

/// Fills device buffers from one uploaded random chunk.
struct Filler<'a, B: Backend> {
    b: &'a B,
    dtype: DType,
    chunk: Buf<B>,
}

impl<B: Backend> Filler<'_, B> {
    /// A `[rows, cols]` weight in `dtype`, filled by device copies of the chunk.
    fn matrix(&self, rows: usize, cols: usize) -> Result<Weight<B>> {
        let row_bytes = self.dtype.bytes_for(cols).ok_or_else(|| {
            Error::Usage(format!(
                "{} weights need rows of whole {}-value blocks; this shape has rows of {cols}",
                self.dtype,
                self.dtype.block_elems()
            ))
        })?;
        let bytes = rows * row_bytes;
        let mut buf = Buf::exact(self.b, bytes)?;
        let mut done = 0;
        while done < bytes {
            // The last copy is rounded up to a whole word: both buffers have room (16-byte
            // rounded allocations) and the bytes past `bytes` are never read.
            let n = (bytes - done).min(self.chunk.len()).next_multiple_of(4);
            self.b.copy(&mut buf, done, &self.chunk, 0, n)?;
            done += n;
        }
        Ok(Weight {
            buf,
            dtype: self.dtype,
            rows,
            cols,
        })
    }

    /// A norm weight: f32 ones, as the loader stores norms.
    fn ones(&self, n: usize) -> Result<Buf<B>> {
        let mut buf = Buf::exact(self.b, n * 4)?;
        self.b
            .upload(&mut buf, 0, bytemuck::cast_slice(&vec![1f32; n]))?;
        Ok(buf)
    }
}

/// One random `[rows, cols]` weight in `dtype` made on the device (for per-op benchmarks).
pub fn random_weight<B: Backend>(
    b: &B,
    rows: usize,
    cols: usize,
    dtype: DType,
    seed: u64,
) -> Result<Weight<B>> {
    let unit = copy_unit(dtype);
    let host = random_chunk(dtype, (1 << 20) / unit * unit, seed)?;
    let mut chunk = Buf::exact(b, host.len())?;
    b.upload(&mut chunk, 0, &host)?;
    let w = Filler { b, dtype, chunk }.matrix(rows, cols)?;
    b.sync()?;
    Ok(w)
}

/// A model of `shape` whose matrices (embedding and output included) are random `dtype` weights
/// made on the device; norms are f32 ones.
pub fn synthetic_model<B: Backend>(
    b: &B,
    shape: &Shape,
    dtype: DType,
    seed: u64,
) -> Result<Model<B>> {
    let cfg = shape.config();
    cfg.validate()?;
    let unit = copy_unit(dtype);
    let host = random_chunk(dtype, CHUNK_BYTES / unit * unit, seed)?;
    let mut chunk = Buf::exact(b, host.len())?;
    b.upload(&mut chunk, 0, &host)?;
    let f = Filler { b, dtype, chunk };
    let (dim, ffn, q, kv) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim());
    let tok_embeddings = f.matrix(cfg.vocab_size, dim)?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for _ in 0..cfg.n_layers {
        layers.push(LayerWeights {
            attn_norm: f.ones(dim)?,
            wq: f.matrix(q, dim)?,
            wk: f.matrix(kv, dim)?,
            wv: f.matrix(kv, dim)?,
            wo: f.matrix(dim, q)?,
            bq: None,
            bk: None,
            bv: None,
            bo: None,
            q_norm: None,
            k_norm: None,
            ffn_norm: f.ones(dim)?,
            w1: f.matrix(ffn, dim)?,
            w2: f.matrix(dim, ffn)?,
            w3: f.matrix(ffn, dim)?,
            b1: None,
            b2: None,
            b3: None,
        });
    }
    let norm = f.ones(dim)?;
    let output = if cfg.tie_embeddings {
        None
    } else {
        Some(f.matrix(cfg.vocab_size, dim)?)
    };
    // Every copy from the chunk is enqueued before it is dropped (in-order queue).
    b.sync()?;
    drop(f);
    let w = Weights {
        tok_embeddings,
        layers,
        norm,
        output,
    };
    Model::new(b, cfg, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize;

    #[test]
    fn chunks_decode_to_finite_values_of_the_intended_spread() {
        for dtype in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q4K,
            DType::Q6K,
        ] {
            let unit = copy_unit(dtype);
            assert_eq!(unit % 4, 0);
            assert_eq!(unit % dtype.block_bytes(), 0);
            let bytes = 64 * unit;
            let chunk = random_chunk(dtype, bytes, 1).unwrap();
            assert_eq!(chunk.len(), bytes, "{dtype}");
            let n = bytes / dtype.block_bytes() * dtype.block_elems();
            let mut x = vec![0f32; n];
            dequantize(dtype, &chunk, &mut x);
            assert!(x.iter().all(|v| v.is_finite()), "{dtype}");
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / n as f32).sqrt();
            assert!(rms > 0.002 && rms < 0.1, "{dtype}: rms {rms}");
        }
    }

    #[test]
    fn shapes_validate() {
        for s in SHAPES {
            s.config().validate().unwrap();
        }
        assert_eq!(shape("llama-3.1-8b").unwrap().config().head_dim, 128);
        assert!(shape("gpt-2").is_err());
    }
}
